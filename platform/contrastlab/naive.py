"""A naive SimCLR loop, independent of the platform's trainer: the sanity baseline.

Plain torch, every piece written out: per-image zoom-in crops, a random permutation of the
RGB channels and a per-channel gain, a small convnet, NT-Xent, Adam. It shares nothing with
:mod:`contrastlab.train`, :mod:`contrastlab.augment`, the model zoo or the losses, so when it
learns a task and a platform method does not, the task is learnable and the method's recipe
or defaults are what fails. Only the evaluation is the platform's
(:func:`contrastlab.evaluate.knn_accuracy`), so the numbers compare.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import EvalConfig
from .data.core import DatasetSplits
from .evaluate import knn_accuracy


def _convnet(width: int) -> nn.Sequential:
    """``[B, 3, S, S]`` -> ``[B, 4 * width]``: three conv stages, global average pool."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _augment(
    x: torch.Tensor, crop_scale: tuple[float, float], gain: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """One random view of each image of ``x`` (``float [B, 3, S, S]`` in [0, 1]).

    A square crop covering a random share in ``crop_scale`` of the image area, at a random
    place, zoomed back to ``S`` (bilinear); then the three channels in a random order; then
    each channel times a random gain in ``gain``.
    """
    b = x.shape[0]
    side = torch.empty(b).uniform_(crop_scale[0], crop_scale[1], generator=g).sqrt()  # [B]
    # centre offsets in grid units [-1, 1], keeping the crop inside the image
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (1 - side[:, None])  # [B, 2]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
    perm = torch.rand(b, 3, generator=g).argsort(dim=1)  # [B, 3]
    x = x[torch.arange(b)[:, None], perm]
    g_lo, g_hi = gain
    return x * (g_lo + (g_hi - g_lo) * torch.rand(b, 3, 1, 1, generator=g))


def _nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss; ``z`` ``[2B, D]``, rows i and i + B are two views of one image."""
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    logits = (z @ z.T / temperature).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    partner = torch.arange(n).roll(n // 2)  # i <-> i + B
    return F.cross_entropy(logits, partner)


def naive_simclr(
    splits: DatasetSplits,
    epochs: int,
    eval_cfg: EvalConfig,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    temperature: float = 0.2,
    crop_scale: tuple[float, float] = (0.25, 1.0),
    gain: tuple[float, float] = (0.6, 1.4),
    width: int = 16,
    proj_dim: int = 64,
    seed: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Train the naive SimCLR on ``splits.train`` (CPU) and kNN-evaluate it every epoch.

    Args:
        splits: train (memory) and test (queries) images, ``uint8 [N, 3, S, S]``.
        epochs: passes over the training set (``N // batch_size`` steps each; the last,
            partial batch is dropped).
        eval_cfg: the kNN protocol (``knn_k``, ``knn_t``); features are the convnet's
            pooled output on the un-augmented images.
        batch_size: images per step (two views each).
        lr: Adam's learning rate.
        temperature: NT-Xent temperature.
        crop_scale: share of the image area a zoom-in crop covers.
        gain: range of the per-channel gain.
        width: channels of the first conv stage (then 2x, 4x); 16 keeps an epoch of the
            1400-image tasks at a few seconds on 2 CPU cores.
        proj_dim: output of the 2-layer MLP projection head.
        seed: weights, batch order and augmentation draws.
        log: called with one line per epoch, if given (e.g. ``print``).

    Returns:
        ``init_knn_top1`` (the random-init encoder), ``knn_top1`` (after the last epoch),
        ``best_knn_top1`` (over epochs 1..N), ``history`` (kNN per epoch, 0 = init),
        ``elapsed_s`` (seconds since the start when each ``history`` entry was measured),
        ``wall_s`` (training and evaluation), ``settings`` (every argument above).
    """
    settings = dict(batch_size=batch_size, lr=lr, temperature=temperature, crop_scale=crop_scale)
    settings.update(gain=gain, width=width, proj_dim=proj_dim, seed=seed, epochs=epochs)
    settings.update(knn_k=eval_cfg.knn_k, knn_t=eval_cfg.knn_t)
    start = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    memory, test = splits.labeled_train(), splits.test
    x_train = splits.train.images.cpu().float() / 255  # [N, 3, S, S] in [0, 1]
    n = x_train.shape[0]
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size > n or batch_size < 2:
        raise ValueError(f"batch_size must be in 2..{n} (the training images), got {batch_size}")
    backbone = _convnet(width)
    head = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.ReLU(), nn.Linear(4 * width, proj_dim))
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)

    def normalise(x: torch.Tensor) -> torch.Tensor:  # [0, 1] -> about [-1, 1]
        return (x - 0.5) / 0.5

    @torch.no_grad()
    def knn() -> float:
        backbone.eval()
        feats = [
            torch.cat(
                [backbone(normalise(x[i : i + 256].float() / 255)) for i in range(0, len(x), 256)]
            )
            for x in (memory.images.cpu(), test.images.cpu())
        ]
        backbone.train()
        labels = memory.labels.cpu(), test.labels.cpu()
        acc = knn_accuracy(feats[0], labels[0], feats[1], labels[1], memory.num_classes, eval_cfg)
        return acc["knn_top1"]

    history = [knn()]
    elapsed = [time.perf_counter() - start]  # wall time when each history entry was measured
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=g)
        losses = []
        for s in range(n // batch_size):
            x = x_train[order[s * batch_size : (s + 1) * batch_size]]
            views = torch.cat([_augment(x, crop_scale, gain, g) for _ in range(2)])  # [2B, 3, S, S]
            loss = _nt_xent(head(backbone(normalise(views))), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(knn())
        elapsed.append(time.perf_counter() - start)
        if log is not None:
            log(
                f"naive epoch {epoch}/{epochs} | loss {sum(losses) / len(losses):.4f} | "
                f"knn_top1 {history[-1]:.2f}% | {time.perf_counter() - start:.0f}s"
            )
    return {
        "init_knn_top1": history[0],
        "knn_top1": history[-1],
        "best_knn_top1": max(history[1:]) if epochs else history[0],
        "history": history,
        "elapsed_s": elapsed,
        "wall_s": time.perf_counter() - start,
        "settings": settings,
    }
