"""CMC, Contrastive Multiview Coding (Tian, Krishnan, Isola 2019, arXiv:1906.05849).

An image is converted to a colour space (CIE Lab by default) and split into channel groups,
the "views" (L and ab by default). Each view has its own encoder and projection head, and the
embeddings of the views of one image are pulled together against the other images' embeddings
of the other view: for two views the loss is ``L_L^ab + L_ab^L``; for more views, all pairs
("full" graph) or view 0 against each other ("core"). Reference code: HobbitLong/CMC
(``train_CMC.py``, ``dataset.py`` ``RGB2Lab``, ``models/resnet.py`` ``is_half``).

Where we deliberately differ:

* Negatives are the other images of the batch (of the other view), gathered from every DDP
  worker with a differentiable all-gather, and the criterion is a softmax cross-entropy
  (InfoNCE), not the paper's NCE against a memory bank of 16384 stored embeddings. Upstream's
  later scripts already swap NCE for the softmax loss (``train_moco_ins.py --softmax``, its
  MoCo-style variant with a queue of momentum-encoded keys); we also drop the stored
  negatives: a bank holds embeddings from older encoders, needs per-image state as large as
  the dataset, and NCE freezes its normalising constant after the first batch. In-batch
  negatives are always current and need no state; the price is fewer negatives per step (the
  global batch rather than 16384), which larger batches buy back.
* The colour conversion runs on the device, on the whole augmented batch (``colorspace.py``),
  and each channel is scaled to about [-1, 1] with fixed constants of the colour space (as
  upstream's Lab normalisation). The augmentation therefore hands over un-normalised [0, 1]
  RGB: ``augment.normalize`` is false for CMC (a resolved default; setting it true is
  rejected), and so the evaluation input is [0, 1] RGB as well.
* ``method.width_mult`` scales every view's encoder (0.5 as the paper's half-width
  encoders; upstream keeps a ResNet's 64-channel stem, and so do we).
* ``method.shared_crop=false`` cuts each view from its own augmented crop (the trainer then
  draws one crop per view), as the later InfoMin work does; the default is upstream's one crop.

Evaluation features (kNN monitor, linear probe) are the concatenation of all views' encoder
features, as the paper evaluates: :class:`ColorViewsBackbone` maps RGB images to them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from contrastlab.colorspace import to_colorspace
from contrastlab.config import CMCConfig, Config
from contrastlab.distributed import gather_cat
from contrastlab.losses import cmc_loss
from contrastlab.methods.base import Method
from contrastlab.models import build_backbone, build_head


class ColorViewsBackbone(nn.Module):
    """RGB in [0, 1] -> colour space -> one encoder per channel group -> concatenated features.

    Args:
        encoders: one encoder per view, taking ``len(group)`` input channels.
        groups: channel indices of each view in the converted image.
        colorspace: ``lab``, ``ycbcr`` or ``rgb`` (see ``colorspace.to_colorspace``).
        dims: feature width of each encoder.
    """

    def __init__(
        self,
        encoders: list[nn.Module],
        groups: tuple[tuple[int, ...], ...],
        colorspace: str,
        dims: list[int],
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.groups = [list(g) for g in groups]
        self.colorspace = colorspace
        self.dims = list(dims)

    def split(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] RGB -> one [N, len(group), H, W] tensor per view."""
        x = to_colorspace(rgb, self.colorspace)
        return [x[:, g] for g in self.groups]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """Concatenated features of all views: ``[N, sum_v F_v]``.

        Args:
            rgb: ``[N, 3, H, W]`` images (every view is cut from the same image), or
                ``[V, N, 3, H, W]``, one crop per view (view ``v``'s channels from ``rgb[v]``).
        """
        if rgb.ndim == 5:
            parts = [self.split(crop)[v] for v, crop in enumerate(rgb)]
        else:
            parts = self.split(rgb)
        return torch.cat([enc(x) for enc, x in zip(self.encoders, parts, strict=True)], dim=1)


class CMC(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        m = cfg.method
        assert isinstance(m, CMCConfig)
        self.temperature, self.graph, self.shared_crop = m.temperature, m.graph, m.shared_crop
        self.n_views = m.views_per_sample  # crops drawn per image: 1, or one per view
        chroma_only = [g for g in m.views if m.colorspace != "rgb" and 0 not in g]
        if cfg.data.dataset == "digits" and chroma_only:
            warnings.warn(
                f"data.dataset='digits' is grayscale: in method.colorspace={m.colorspace!r} the "
                f"view(s) {chroma_only} hold only chroma channels, which are constant on gray "
                "images, so they carry no information; use method.colorspace='rgb' there",
                stacklevel=2,
            )
        mc = cfg.model
        # The base class's single RGB encoder and head are replaced by one per view.
        encoders, heads, dims = [], [], []
        for group in m.views:
            enc, dim = build_backbone(mc.backbone, mc.width, len(group), m.width_mult)
            head, self.proj_dim = build_head(
                mc.head, dim, mc.head_hidden_dim, mc.proj_dim, mc.head_layers, mc.head_batchnorm
            )
            encoders.append(enc)
            heads.append(head)
            dims.append(dim)
        self.backbone = ColorViewsBackbone(encoders, m.views, m.colorspace, dims)
        self.head = nn.ModuleList(heads)
        self.feature_dim = sum(dims)

    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """[n_views, B, 3, H, W] RGB crops -> [V, B, proj_dim], V = number of channel groups."""
        # through the backbone's forward, so that train.compile covers training too
        feats = self.backbone(views[0] if self.shared_crop else views)  # [B, sum_v F_v]
        parts = feats.split(self.backbone.dims, dim=1)
        return torch.stack([head(f) for head, f in zip(self.head, parts, strict=True)])

    def training_step(self, views, labels, index):  # type: ignore[override]
        z = self.embed(views).float()  # [V, B, D]; loss in fp32 under autocast
        z = gather_cat(z, dim=1)  # negatives from every worker
        loss, acc = cmc_loss(z, self.temperature, self.graph)
        return loss, {"loss": loss.detach(), "cmc_acc": acc}
