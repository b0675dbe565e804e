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

    Row ``i`` of a batch of ``N`` rows belongs to group ``i % num_splits`` (interleaved, as in
    the MoCo CIFAR demo). Each group is normalised with its own mean and biased variance, then
    scaled by the shared affine weight and bias. The running statistics (used in eval mode,
    i.e. by the kNN monitor and linear probe) move towards the mean over groups of each
    group's mean and unbiased variance, which is what the demo does and what averaging
    per-GPU running statistics would give.

    How (the demo's trick): ``[N, C, *]`` is reshaped to ``[N/S, S*C, *]``, so one fused
    ``batch_norm`` call normalises every group. That is a free view for contiguous NCHW and
    ``[N, C]`` inputs; channels_last activations (our default) are copied in and out. We also
    tried one ``batch_norm`` call per group on slices (no copies). On the digits MoCo step
    (CPU) it was faster with one thread (166 vs 209 ms; plain BatchNorm 152 ms) but twice
    as slow with two threads on a busy machine, and it multiplies the op count per layer
    (kernel launches and Python overhead on a GPU) by S. The reshape keeps that count fixed.

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
        n, c, s = x.shape[0], x.shape[1], self.num_splits
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
        # one copy of the running statistics per group, [S*C] each, updated by batch_norm
        per_group = [t.repeat(s) for t in running]
        mean_g, var_g = per_group if per_group else (None, None)
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        # [N, C, *] -> [N/S, S*C, *]: channel j*C + k of row a is channel k of row a*S + j.
        # A view for contiguous inputs; channels_last inputs are copied (and restored below).
        grouped = x.reshape(n // s, s * c, *x.shape[2:])
        y = F.batch_norm(grouped, mean_g, var_g, weight, bias, True, factor, self.eps)
        y = y.reshape(x.shape)
        with torch.no_grad():  # running stats: the mean over groups of each group's update
            for buf, grp in zip(running, per_group, strict=True):
                buf.copy_(grp.view(s, c).mean(dim=0))
        if (
            x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            y = y.contiguous(memory_format=torch.channels_last)
        return y


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
