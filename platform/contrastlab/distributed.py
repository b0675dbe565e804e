"""Thin helpers over ``torch.distributed`` that are identities in a single process.

Contrastive losses need every worker's negatives. ``gather_cat`` concatenates a tensor from all
workers with a *differentiable* all-gather, so gradients flow back to the worker that produced
each row (SupContrast issue #26: a plain ``all_gather`` silently cuts them).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

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


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every worker (identical start everywhere)."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def average_gradients(module: torch.nn.Module) -> None:
    """Average gradients over workers in one flat all-reduce.

    Together with :func:`gather_cat` (whose backward sums each worker's contribution to every
    gathered row) this gives exactly the gradient of the global-batch loss: every worker
    computes the loss over all gathered embeddings, so its local gradient is ``world_size``
    times its share, and the mean over workers is the full gradient. Used instead of the DDP
    wrapper because methods call ``training_step`` rather than ``forward``.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_tensor(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``src``'s value of ``x`` on every worker (in place); ``x`` itself in a single process."""
    if is_distributed():
        dist.broadcast(x, src)
    return x


def _like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s memory format (channels_last image batches stay channels_last)."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return y.contiguous(memory_format=torch.channels_last)
    return y


@torch.no_grad()
def shuffle_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """This worker's share of the global batch, taken in shuffled order (MoCo's shuffle-BN).

    Global row ``g`` is local row ``g % b`` of worker ``g // b`` (rank-ordered, as
    :func:`gather_cat` concatenates). Worker ``r`` gets global rows ``perm[r*b:(r+1)*b]``.
    In a single process this is ``x[perm]``. Images are gathered from every worker, as in
    facebookresearch/moco's ``_batch_shuffle_ddp``.

    Args:
        x: [b, ...] this worker's rows (same b on every worker).
        perm: [world*b] int64 permutation of the global rows, identical on every worker
            (draw it from a shared seed and/or :func:`broadcast_tensor` it).

    Returns:
        [b, ...] the rows this worker encodes, in ``x``'s memory format.
    """
    b, r = x.shape[0], rank()
    # [world*b, ...]; the collective needs a contiguous tensor, a single process does not
    x_all = gather_cat_nograd(x.contiguous()) if is_distributed() else x
    return _like_input(x_all[perm[r * b : (r + 1) * b]], x)


@torch.no_grad()
def unshuffle_rows(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`shuffle_rows`: outputs for this worker's own rows, in their order.

    Args:
        y: [b, ...] outputs for the rows :func:`shuffle_rows` gave this worker.
        perm: the same [world*b] permutation.

    Returns:
        [b, ...] outputs for this worker's original rows ``r*b .. (r+1)*b - 1``.
    """
    b, r = y.shape[0], rank()
    # [world*b, ...]; y_all[j] is the output for global row perm[j]
    y_all = gather_cat_nograd(y.contiguous()) if is_distributed() else y
    inverse = torch.argsort(perm)  # inverse[g]: where global row g went
    return _like_input(y_all[inverse[r * b : (r + 1) * b]], y)


def exit_spawned_worker() -> NoReturn:
    """End a ``torch.multiprocessing.spawn`` worker whose work is done: wait for every rank,
    leave the process group, flush, and exit with status 0 at once.

    Skipping the interpreter's teardown is the point: after gloo collectives with a backward
    pass, a worker that had already left the group still aborted at exit in 6 of 100
    two-process runs ('terminate called without an active exception', SIGABRT; torch 2.14.1),
    which ``spawn`` reports as a failure of a finished job; with ``os._exit`` 0 of 100 did.
    Call it only on success: an error should propagate, so that ``spawn`` reports it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
