"""CPC for images, v2-style (Henaff et al. 2019, arXiv:1905.09272; van den Oord et al. 2018,
arXiv:1807.03748).

The augmented image is cut into a ``G x G`` grid of overlapping square patches
(``method.patch_size`` at ``method.patch_stride``); the backbone encodes every patch (one
forward over ``[B*G*G, 3, p, p]``) into a vector ``z``. A causal, PixelCNN-style context
network over the grid turns ``z`` into context vectors ``c`` whose row ``r`` depends on rows
``<= r`` only; a linear predictor per row offset ``k`` maps ``c[r, col]`` to a prediction of the
target ``t[r + k, col]``, where the targets are ``model.head`` (linear, 64-d by default, v2's
``target_dim``) of the patch encodings. The loss is InfoNCE with raw dot products divided by
``method.temperature`` (10: v2's ``emb_scale = 0.1``): the positive is the true target, the
negatives every other patch of every image in the global batch (targets are gathered over DDP
workers with a differentiable all-gather); see :func:`contrastlab.losses.cpc_loss`.
Reference code: the pseudo-code in the v2 paper's appendix (``pixelCNN``, ``CPC``) and
Lightning-Universe/lightning-bolts (``CPCTask``, ``PixelCNN``).

Evaluation features are the mean over the grid of the patch encodings:
:class:`PatchGridBackbone` maps whole images to them, so the kNN monitor and linear probe work
unchanged.

Where we deliberately differ from v2:

* The augmentation is the trainer's, per image; v2 augments every patch independently (and
  drops colour channels per patch). Patches of one image therefore share colour jitter.
* The backbone is the configured one, with BatchNorm over all patches of the batch; v2
  replaces BatchNorm by LayerNorm in its ResNet-161 encoder.
* Only top-to-bottom prediction (v2 also predicts bottom-up and sideways).
* Steps ``k = skip_steps + 1 .. prediction_steps`` are averaged, not summed (v2 predicts one
  step, k = 3 with 2 skipped, where both agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.config import Config, CPCConfig
from contrastlab.distributed import gather_cat, rank
from contrastlab.losses import cpc_loss
from contrastlab.methods.base import Method


def patch_grid(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """[N, C, H, W] images -> [N, G_h, G_w, C, size, size] patches (row-major grid)."""
    # unfold: [N, C, G_h, G_w, size, size]
    return x.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


class PatchGridBackbone(nn.Module):
    """Encode every patch of a grid with ``encoder``; ``forward`` averages over the grid.

    Args:
        encoder: maps ``[M, 3, p, p]`` patches to ``[M, F]``.
        patch_size: ``p``.
        stride: pixels between neighbouring patches.
    """

    def __init__(self, encoder: nn.Module, patch_size: int, stride: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size, self.stride = patch_size, stride

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, G_h, G_w, F] patch encodings, all patches in one forward."""
        patches = patch_grid(x, self.patch_size, self.stride)  # [N, Gh, Gw, 3, p, p]
        n, gh, gw = patches.shape[:3]
        z = self.encoder(patches.reshape(n * gh * gw, *patches.shape[3:]))  # [N*Gh*Gw, F]
        return z.view(n, gh, gw, -1)

    def forward(self, x: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """[N, 3, H, W] -> the mean patch encoding [N, F], or with ``pool=False`` the grid."""
        z = self.grid(x)
        return z.mean(dim=(1, 2)) if pool else z


class _CausalBlock(nn.Sequential):
    """Residual branch of the context network: ``[B, D, G, G] -> [B, D, G, G]``.

    1x1 (D -> hidden), ReLU, 1x3 along the row, ReLU, 2x1 over the row above and this row
    (top-padded by one row), ReLU, 1x1 (hidden -> D). Output row r sees input rows r-1 and r.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(
            nn.Conv2d(dim, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1)),
            nn.ReLU(inplace=True),
            nn.ZeroPad2d((0, 0, 1, 0)),  # (left, right, top, bottom)
            nn.Conv2d(hidden, hidden, (2, 1)),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1),
        )


class CausalContext(nn.Module):
    """PixelCNN-style context network (CPC v2): residual causal blocks, then a ReLU.

    Maps ``[B, G_h, G_w, D]`` patch encodings to ``[B, G_h, G_w, D]`` context vectors whose row
    ``r`` depends on input rows ``<= r`` only (receptive field: ``layers`` rows up, the whole
    row sideways after enough layers).

    Args:
        dim: ``D``, width of the encodings.
        hidden: bottleneck width of each block.
        layers: number of residual blocks.
    """

    def __init__(self, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_CausalBlock(dim, hidden) for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.permute(0, 3, 1, 2)  # [B, D, Gh, Gw]
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x).permute(0, 2, 3, 1)


class CPC(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        m = cfg.method
        assert isinstance(m, CPCConfig)
        self.n_views = 1
        self.temperature, self.normalize = m.temperature, m.normalize
        self.steps = list(range(m.skip_steps + 1, m.prediction_steps + 1))
        self.backbone = PatchGridBackbone(self.backbone, m.patch_size, m.patch_stride)
        self.context = CausalContext(self.feature_dim, m.context_hidden_dim, m.context_layers)
        # one linear predictor per row offset k: context [.., F] -> prediction [.., proj_dim]
        self.predictors = nn.ModuleList(
            nn.Linear(self.feature_dim, self.proj_dim) for _ in self.steps
        )

    def training_step(self, views, labels, index):  # type: ignore[override]
        # through the backbone's forward, so that train.compile covers training too
        z = self.backbone(views[0], pool=False)  # [B, G, G, F]
        targets = self.head(z.flatten(0, 2)).view(*z.shape[:3], -1).float()  # [B, G, G, D]
        ctx = self.context(z)  # [B, G, G, F]
        preds = torch.stack([p(ctx) for p in self.predictors]).float()  # [K, B, G, G, D]
        # negatives: every patch of every worker's images; the local ones start at rank * B
        all_targets = gather_cat(targets, dim=0)
        loss, acc = cpc_loss(
            preds, all_targets, self.steps, self.temperature, self.normalize, rank() * z.shape[0]
        )
        return loss, {"loss": loss.detach(), "cpc_acc": acc}
