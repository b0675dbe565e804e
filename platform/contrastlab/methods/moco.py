"""MoCo v1 / v2 (He et al. 2019, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297).

A query encoder trained by InfoNCE against the key of another view, produced by a momentum
(EMA) copy of the encoder, and a queue of K earlier keys as negatives. v1: linear 128-d head,
v2: MLP head and blur in the augmentation (the head follows ``model.head``, whose default is
resolved from ``method.variant``). Reference code: facebookresearch/moco (builder.py, and the
CIFAR-10 demo notebook for one GPU).

Shuffle-BN (``method.bn_mode``). With plain BatchNorm the key encoder normalises the same
images as the query encoder, and the batch statistics let the model tell the positive key by
the batch it came from rather than by its content (the paper, section 3.3).

* ``shuffle`` (default), several workers: as upstream ``_batch_shuffle_ddp`` /
  ``_batch_unshuffle_ddp``, the key images of all workers are gathered and shuffled, each
  worker encodes its slice with per-worker BatchNorm, and the keys are gathered and unshuffled.
  Unlike upstream, the permutation is drawn from a generator seeded with (``train.seed``, draw
  count) whose count is checkpointed, so a resumed run draws the same permutations; it is
  still broadcast from rank 0 so workers cannot disagree.
* ``shuffle``, one worker: as the CIFAR demo, every BatchNorm layer of the encoder (query and
  key, backbone and head) normalises ``method.bn_splits`` groups of the batch separately
  (:class:`~contrastlab.models.SplitBatchNorm`, still one forward pass of the encoder); keys
  are shuffled across the groups. Where we differ from the demo: the BatchNorm of the MLP
  head is split too, and the permutation is seeded as above instead of the global RNG.
* ``sync``: SyncBatchNorm over all workers (GPU only), plain BatchNorm on one worker. The
  weaker alternative in the MoCo authors' view: a query and its positive key are still
  normalised with statistics of the same (global) batch, while the queued negatives come from
  earlier batches, so the leak is diluted rather than removed.
* ``none``: plain BatchNorm per worker, i.e. no protection.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from contrastlab.config import Config, ConfigError, MoCoConfig
from contrastlab.distributed import (
    broadcast_tensor,
    gather_cat_nograd,
    shuffle_rows,
    unshuffle_rows,
    world_size,
)
from contrastlab.losses import info_nce_loss
from contrastlab.methods.base import Method
from contrastlab.models import BatchShuffler, MomentumEncoder, Queue, convert_split_batchnorm


class MoCo(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        m = cfg.method
        assert isinstance(m, MoCoConfig)
        self.temperature, self.momentum, self.symmetric = m.temperature, m.momentum, m.symmetric
        self.n_views = 2
        world = world_size()
        if m.bn_mode == "sync" and world > 1:
            device = cfg.train.device
            if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
                raise ConfigError(
                    f"method.bn_mode='sync' needs GPUs: SyncBatchNorm does not run on CPU "
                    f"(here {world} workers on train.device={device!r}); use "
                    "method.bn_mode='shuffle'"
                )
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
            self.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.head)
        if m.bn_mode == "shuffle" and world == 1 and m.bn_splits > 1:
            # the query encoder normalises the same groups, unshuffled (as the CIFAR demo)
            self.backbone = convert_split_batchnorm(self.backbone, m.bn_splits)
            self.head = convert_split_batchnorm(self.head, m.bn_splits)
        # the permutation source exists whenever bn_mode='shuffle', so that state dicts of
        # single- and multi-worker runs have the same keys
        self.shuffler = BatchShuffler(cfg.train.seed) if m.bn_mode == "shuffle" else None
        self._shuffle_keys = m.bn_mode == "shuffle" and (world > 1 or m.bn_splits > 1)
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

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] key images -> [B, D] L2-normalised keys, with shuffle-BN if enabled."""
        if not self._shuffle_keys:
            return nn.functional.normalize(self.key_encoder(x).float(), dim=1)
        assert self.shuffler is not None
        # one permutation of the global batch, the same on every worker: [world*B]
        perm = broadcast_tensor(self.shuffler.permutation(x.shape[0] * world_size(), x.device))
        k = self.key_encoder(shuffle_rows(x, perm)).float()  # [B, D], shuffled rows
        return nn.functional.normalize(unshuffle_rows(k, perm), dim=1)

    def training_step(self, views, labels, index):  # type: ignore[override]
        x_q, x_k = views[0], views[1]  # [B, 3, H, W] each
        with torch.no_grad():
            # update the key encoder before computing keys, as in the reference
            self.key_encoder.update(self._online(), self.momentum)
            k = self._keys(x_k)  # [B, D]
        q = self.project(x_q).float()  # [B, D]
        # the queue is rewritten in place below: give the loss a snapshot for backward
        queue = self.queue.keys.clone()  # [K, D]
        loss, logits = self._contrast(q, k, queue)  # logits: [B, 1+K]
        keys_out = [k]
        if self.symmetric:
            k2 = self._keys(x_q)
            loss2, _ = self._contrast(self.project(x_k).float(), k2, queue)
            loss = 0.5 * (loss + loss2)
            keys_out.append(k2)
        for kk in keys_out:
            self.queue.enqueue(gather_cat_nograd(kk))
        acc = (logits.argmax(dim=1) == 0).float().mean()
        return loss, {"loss": loss.detach(), "moco_acc": acc.detach()}
