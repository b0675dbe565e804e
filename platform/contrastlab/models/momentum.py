"""Reusable pieces for momentum-contrast style methods: an EMA encoder and a key queue."""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumEncoder(nn.Module):
    """An exponential-moving-average copy of a module, never trained by gradients.

    ``update(source, m)`` does ``theta_k <- m * theta_k + (1 - m) * theta_q`` for parameters;
    buffers (BatchNorm running statistics) are copied, as in MoCo.

    Args:
        source: the online module to copy at construction.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(source)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module, momentum: float) -> None:
        ema = [p for p in self.module.parameters()]
        online = [p.detach() for p in source.parameters()]
        # one fused kernel per dtype group instead of a Python loop of small ops
        torch._foreach_lerp_(ema, online, 1.0 - momentum)
        for b_ema, b in zip(self.module.buffers(), source.buffers(), strict=True):
            b_ema.copy_(b)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)


class Queue(nn.Module):
    """A FIFO ring buffer of ``size`` L2-normalised ``dim``-d keys (MoCo's negatives).

    Stored as a buffer, so it moves with ``.to(device)`` and is saved in checkpoints.

    Args:
        size: K, number of keys held.
        dim: key width D.
        generator: RNG for the random initial keys.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        init = torch.randn(size, dim, generator=generator)
        self.register_buffer("keys", nn.functional.normalize(init, dim=1))  # [K, D]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` entries. keys: [N, D], N must divide K."""
        n, size = keys.shape[0], self.keys.shape[0]
        if size % n != 0:
            raise ValueError(f"queue size {size} is not a multiple of the key batch {n}")
        # ptr stays on device; a slice by a device scalar would force a host sync, so use
        # index_copy_ with a device index range instead.
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % size
        self.keys.index_copy_(0, idx, keys.detach().to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % size)
