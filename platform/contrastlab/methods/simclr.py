"""SimCLR (Chen et al. 2020, arXiv:2002.05709): NT-Xent over n_views augmentations.

Reference code: google-research/simclr (TF), sthalles/SimCLR (PyTorch).
"""

from __future__ import annotations

from contrastlab.config import Config, SimCLRConfig
from contrastlab.distributed import gather_cat
from contrastlab.losses import nt_xent_loss
from contrastlab.methods.base import Method


class SimCLR(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        assert isinstance(cfg.method, SimCLRConfig)
        self.temperature = cfg.method.temperature
        self.n_views = cfg.method.n_views

    def training_step(self, views, labels, index):  # type: ignore[override]
        z = self.project_views(views).float()  # [V, B, D]; loss in fp32 under autocast
        z = gather_cat(z, dim=1)  # negatives from every worker
        loss = nt_xent_loss(z, self.temperature)
        return loss, {"loss": loss.detach()}
