"""What every method shares: a backbone and a projection head built from the config.

Methods compose reusable pieces (``MomentumEncoder``, ``Queue``) rather than inheriting a
large base class; this one only builds the encoder and declares the protocol the trainer uses.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastlab.config import Config
from contrastlab.models import build_backbone, build_head


class Method(nn.Module):
    """A self-supervised method: the trainer calls :meth:`training_step` once per batch.

    Subclasses set ``n_views`` and implement ``training_step``. ``backbone`` is what the
    evaluation protocols (kNN, linear probe) read features from.

    Args:
        cfg: the full run config.
        num_train: number of training images (for methods with per-image memory).
    """

    n_views: int = 2

    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__()
        m = cfg.model
        self.backbone, self.feature_dim = build_backbone(m.backbone, m.width)
        self.head, self.proj_dim = build_head(
            m.head,
            self.feature_dim,
            m.head_hidden_dim,
            m.proj_dim,
            m.head_layers,
            m.head_batchnorm,
        )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images -> [N, proj_dim] projections."""
        return self.head(self.backbone(x))

    def project_views(self, views: torch.Tensor) -> torch.Tensor:
        """[V, B, 3, H, W] -> [V, B, proj_dim] in one forward pass.

        All views share one batch, so BatchNorm statistics are taken over V*B images as in
        SimCLR's reference implementation.
        """
        V, B = views.shape[:2]
        return self.project(views.flatten(0, 1)).view(V, B, -1)

    def training_step(
        self, views: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's loss.

        Args:
            views: [V, B, 3, H, W] augmented views, view-major.
            labels: [B] class labels (-1 where unknown); only supervised methods read them.
            index: [B] dataset row of each image (for per-image memories).

        Returns:
            ``(loss, metrics)``: a scalar to backpropagate and detached scalar tensors to log
            (kept on device: the trainer reads them once per log interval).
        """
        raise NotImplementedError

    def on_step_end(self) -> None:
        """Called after the optimizer step (momentum updates, memory writes)."""
