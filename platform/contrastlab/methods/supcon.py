"""Supervised contrastive learning (Khosla et al. 2020, arXiv:2004.11362).

``contrast_count`` views per image; every view is an anchor; positives are all views of all
images with the same label. Reference code: HobbitLong/SupContrast. Its silent
``temperature / base_temperature`` rescaling is the explicit, default-off
``method.base_temperature`` here.
"""

from __future__ import annotations

from contrastlab.config import Config, SupConConfig
from contrastlab.distributed import gather_cat, gather_cat_nograd
from contrastlab.losses import supcon_loss
from contrastlab.methods.base import Method


class SupCon(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        assert isinstance(cfg.method, SupConConfig)
        self.temperature = cfg.method.temperature
        self.base_temperature = cfg.method.base_temperature
        self.n_views = cfg.method.contrast_count

    def training_step(self, views, labels, index):  # type: ignore[override]
        if bool((labels < 0).any()):
            raise ValueError(
                "method.name=supcon needs a label for every training image, but the batch "
                "holds unlabeled rows (label -1); set data.unlabeled=false"
            )
        z = gather_cat(self.project_views(views).float(), dim=1)  # [V, B_all, D]
        y = gather_cat_nograd(labels)  # [B_all]
        loss = supcon_loss(z, y, self.temperature, self.base_temperature)
        return loss, {"loss": loss.detach()}
