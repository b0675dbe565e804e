"""EMP-SSL (Tong et al. 2023, arXiv:2304.03977): self-supervised learning in one epoch.

Each image is cut into ``num_patches`` fixed-scale (0.25 area) augmented crops; the loss
maximises the Total Coding Rate of each patch group (spreading embeddings) and pulls every
patch embedding to the image's mean patch embedding. Reference code: tsb0601/EMP-SSL.
Evaluation uses the mean of backbone features over patches (``eval.feature=patch_avg``).
"""

from __future__ import annotations

from contrastlab.config import Config, EMPSSLConfig
from contrastlab.losses import emp_ssl_loss
from contrastlab.methods.base import Method


class EMPSSL(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        m = cfg.method
        assert isinstance(m, EMPSSLConfig)
        self.n_views = m.num_patches
        self.eps, self.inv_w, self.tcr_w = m.eps, m.invariance_weight, m.tcr_weight

    def training_step(self, views, labels, index):  # type: ignore[override]
        # The coding rate is a per-worker batch statistic, as in the reference code.
        z = self.project_views(views).float()  # [P, B, D]
        loss, parts = emp_ssl_loss(z, self.eps, self.inv_w, self.tcr_w)
        return loss, {"loss": loss.detach(), **parts}
