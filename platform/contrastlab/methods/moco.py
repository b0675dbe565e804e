"""MoCo v1 / v2 (He et al. 2019, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297).

A query encoder trained by InfoNCE against the key of another view, produced by a momentum
(EMA) copy of the encoder, and a queue of K earlier keys as negatives. v1: linear 128-d head,
v2: MLP head and blur in the augmentation (the head follows ``model.head``, whose default is
resolved from ``method.variant``). Reference code: facebookresearch/moco (builder.py).

Not yet here: shuffle-BN across workers. Without it the key encoder's BatchNorm sees the whole
key batch at once, which MoCo's authors report lets the model cheat a little; see the README.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from contrastlab.config import Config, MoCoConfig
from contrastlab.distributed import gather_cat_nograd
from contrastlab.losses import info_nce_loss
from contrastlab.methods.base import Method
from contrastlab.models import MomentumEncoder, Queue


class MoCo(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        m = cfg.method
        assert isinstance(m, MoCoConfig)
        self.temperature, self.momentum, self.symmetric = m.temperature, m.momentum, m.symmetric
        self.n_views = 2
        self.key_encoder = MomentumEncoder(nn.Sequential(self.backbone, self.head))
        if m.queue_size >= num_train:
            warnings.warn(
                f"method.queue_size ({m.queue_size}) >= the {num_train} training images: the "
                "queue holds older keys of the very images used as queries, so some "
                "'negatives' are positives; use a smaller queue for this dataset",
                stacklevel=2,
            )
        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.queue = Queue(m.queue_size, self.proj_dim, generator=gen)

    def _online(self) -> nn.Module:
        return nn.Sequential(self.backbone, self.head)

    def _contrast(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor):
        return info_nce_loss(q, k, queue, self.temperature)

    def training_step(self, views, labels, index):  # type: ignore[override]
        x_q, x_k = views[0], views[1]  # [B, 3, H, W] each
        with torch.no_grad():
            # update the key encoder before computing keys, as in the reference
            self.key_encoder.update(self._online(), self.momentum)
            k = nn.functional.normalize(self.key_encoder(x_k).float(), dim=1)  # [B, D]
        q = self.project(x_q).float()  # [B, D]
        # the queue is rewritten in place below: give the loss a snapshot for backward
        queue = self.queue.keys.clone()  # [K, D]
        loss, logits = self._contrast(q, k, queue)  # logits: [B, 1+K]
        keys_out = [k]
        if self.symmetric:
            with torch.no_grad():
                k2 = nn.functional.normalize(self.key_encoder(x_q).float(), dim=1)
            loss2, _ = self._contrast(self.project(x_k).float(), k2, queue)
            loss = 0.5 * (loss + loss2)
            keys_out.append(k2)
        for kk in keys_out:
            self.queue.enqueue(gather_cat_nograd(kk))
        acc = (logits.argmax(dim=1) == 0).float().mean()
        return loss, {"loss": loss.detach(), "moco_acc": acc.detach()}
