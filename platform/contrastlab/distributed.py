"""Thin helpers over ``torch.distributed`` that are identities in a single process.

Contrastive losses need every worker's negatives. ``gather_cat`` concatenates a tensor from all
workers with a *differentiable* all-gather, so gradients flow back to the worker that produced
each row (SupContrast issue #26: a plain ``all_gather`` silently cuts them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_cat(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``x`` from every worker along ``dim``, keeping the autograd graph.

    Args:
        x: local tensor, same shape on every worker.
        dim: dimension to concatenate along.

    Returns:
        ``x`` unchanged in a single process; else the rank-ordered concatenation.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=dim)


def gather_cat_nograd(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Like :func:`gather_cat` for tensors that need no gradient (labels, keys, indices)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=dim)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over workers (a copy); ``x`` itself in a single process."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()
