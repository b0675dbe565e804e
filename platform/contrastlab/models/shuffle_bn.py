"""Shuffle-BN building blocks (MoCo, He et al. 2019, arXiv:1911.05722, section 3.3).

BatchNorm statistics are shared by every image of a BatchNorm group. If a query and the key of
the same image sit in groups with the same membership, the key encoder's statistics leak
which images are in the batch, and the model can lower InfoNCE by recognising that "signature"
instead of learning good features. MoCo trains on several GPUs (each a BatchNorm group) and
shuffles the key batch across them before the key encoder, unshuffling after.

On one worker, facebookresearch/moco's CIFAR-10 demo simulates several GPUs with a BatchNorm
that normalises ``num_splits`` groups of the batch separately (``SplitBatchNorm``): this file
holds our version of that layer, a converter, and a seeded, checkpointed source of the
shuffle permutations. The cross-worker collectives live in :mod:`contrastlab.distributed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class SplitBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are computed per group of the batch.

    The ``N`` rows form ``num_splits`` contiguous groups of ``N / num_splits`` rows, as the
    workers of a DDP run each hold a contiguous slice of the global batch (and as
    :func:`contrastlab.distributed.shuffle_rows` hands them out). Each group is normalised
    with its own mean and biased variance, then scaled by the shared affine weight and bias.
    The running statistics (used in eval mode, i.e. by the kNN monitor and linear probe) move
    towards the mean over groups of each group's mean and unbiased variance, which is what the
    MoCo CIFAR demo does and what averaging per-GPU running statistics would give.

    How: one ``batch_norm`` call per group on a slice of the input (a view in any memory
    format), outputs concatenated. The demo instead reshapes ``[N, C, H, W]`` to
    ``[N/S, S*C, H, W]`` (interleaved groups) for one fused call; that reshape is free for
    contiguous NCHW only, and with channels_last activations (our default) it costs two copies
    forward and two backward. Measured on the digits MoCo step (CPU, 1 thread): plain BN
    152 ms, the demo's reshape 209 ms, per-group calls 166 ms (NCHW: 261 vs 233 ms).

    In eval mode, or with ``num_splits == 1``, this is exactly ``nn.BatchNorm{1,2,3}d``. The
    parameter and buffer names are those of BatchNorm, so state dicts are interchangeable.

    Args:
        num_features: C, the channel count of ``[N, C, ...]`` inputs.
        num_splits: S, the number of groups; ``N`` must be a multiple of it in training mode.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features: int,
        num_splits: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, s = x.shape[0], self.num_splits
        if n % s != 0:
            raise ValueError(
                f"SplitBatchNorm: a batch of {n} rows does not split into {s} equal BatchNorm "
                "groups (method.bn_splits must divide the batch)"
            )
        factor = 0.0
        running: list[torch.Tensor] = []  # the running mean and variance buffers, [C] each
        if self.track_running_stats:
            assert self.num_batches_tracked is not None  # set whenever stats are tracked
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            running = [t for t in (self.running_mean, self.running_var) if t is not None]
        outs: list[torch.Tensor] = []
        updated: list[list[torch.Tensor]] = []
        for group in x.chunk(s):  # [N/S, C, *] views, in x's memory format
            # each group updates its own copy of the running statistics
            mean, var = copies = [t.clone() for t in running] if running else [None, None]
            outs.append(
                F.batch_norm(group, mean, var, self.weight, self.bias, True, factor, self.eps)
            )
            updated.append([t for t in copies if t is not None])
        with torch.no_grad():  # running stats: the mean over groups of each group's update
            for i, buf in enumerate(running):
                buf.copy_(torch.stack([u[i] for u in updated]).mean(dim=0))
        return torch.cat(outs)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a :class:`SplitBatchNorm`.

    Parameters and buffers are carried over (the same tensors), as are the train/eval mode and
    the hyperparameters. ``SyncBatchNorm`` layers are left alone.

    Args:
        module: a model; converted in place where it has BatchNorm children.
        num_splits: S, BatchNorm groups per batch.

    Returns:
        ``module`` (or its replacement, if ``module`` is itself a BatchNorm layer).
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm | SplitBatchNorm):
        new = SplitBatchNorm(
            module.num_features,
            num_splits,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_split_batchnorm(child, num_splits)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class BatchShuffler(nn.Module):
    """A reproducible stream of random permutations for shuffle-BN.

    Draw ``d`` is ``randperm(n)`` from a generator seeded with ``(seed, d)``, on the device
    where it is used (no host-device copy, no host sync). The draw count is a host-side int
    saved in the module's state dict (``_extra_state``), so a run resumed from a checkpoint
    continues with exactly the permutations the uninterrupted run would have drawn, and
    workers that start from the same state draw the same permutations.

    Args:
        seed: the run seed (``train.seed``).
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.draws = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def permutation(self, n: int, device: torch.device) -> torch.Tensor:
        """The next permutation of ``range(n)``: [n] int64 on ``device``."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        # a fixed odd constant keeps this stream apart from the trainer's (seed, epoch) streams
        gen.manual_seed((self.seed * 1_000_003 + self.draws) * 2_654_435_761 % (2**63))
        self.draws += 1
        return torch.randperm(n, generator=gen, device=device)

    def get_extra_state(self) -> torch.Tensor:
        # a tensor (not a dict) so that state dicts compare with torch.equal like the rest
        return torch.tensor(self.draws, dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.draws = int(state)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, draws={self.draws}"
