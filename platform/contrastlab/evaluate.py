"""Evaluation protocols: weighted kNN monitor, linear probe, EMP-SSL patch-averaged features.

Reported numbers depend heavily on the protocol (EMP-SSL issue #11), so every function here
returns, next to its numbers, a ``protocol`` dict that the trainer logs with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.config import EvalConfig

#: Rows per forward pass on the CPU. A small convnet's eval forward ran up to 1.9x faster on
#: 64-image blocks than on 512 (presumably cache; ResNet-18 ~18%), and every image's features
#: are bit-identical either way (tests/test_evaluate.py), so this is speed only:
#: ``eval.batch_size`` still sets the extraction batch (and EMP-SSL's patch draws).
CPU_FORWARD_ROWS = 64


def _encode(
    encoder: nn.Module, x: torch.Tensor, device: torch.device, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """``encoder(x)`` as float32, in blocks of :data:`CPU_FORWARD_ROWS` rows on the CPU (one
    call elsewhere, with no extra copy)."""
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        if device.type != "cpu" or x.shape[0] <= CPU_FORWARD_ROWS:
            return encoder(x).float()
        rows = CPU_FORWARD_ROWS
        return torch.cat([encoder(x[i : i + rows]).float() for i in range(0, x.shape[0], rows)])


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Backbone features of every image, in eval mode.

    Args:
        encoder: maps [N, 3, S, S] float images to [N, F] features.
        images: [N, 3, H, W] uint8 (any device).
        transform: uint8 batch on ``device`` -> float model input (e.g. normalisation, or a
            random patch view for EMP-SSL averaging).
        batch_size: images per forward pass.
        device: where to run.
        autocast_dtype: e.g. ``torch.bfloat16`` to match the training precision.

    Returns:
        [N, F] float32 features on ``device``.
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = transform(images[start : start + batch_size].to(device, non_blocking=True))
        out.append(_encode(encoder, x, device, autocast_dtype))
    encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def patch_averaged_features(
    encoder: nn.Module,
    images: torch.Tensor,
    patch_view: Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor],
    num_patches: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """EMP-SSL's embedding: the mean of backbone features over ``num_patches`` random patches.

    Args:
        patch_view: ``(uint8 [B,3,H,W], n, generator) -> [n, B, 3, S, S]`` patch views (the
            training augmentation, so patches follow the training recipe).
        seed: seed of the patch sampler, so the evaluation is repeatable.

    Returns:
        [N, F] float32 features on ``device``.
    """
    was_training = encoder.training
    encoder.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    per_batch = max(1, batch_size // num_patches)
    for start in range(0, images.shape[0], per_batch):
        x = images[start : start + per_batch].to(device, non_blocking=True)
        views = patch_view(x, num_patches, gen)  # [P, B, 3, S, S]
        f = _encode(encoder, views.flatten(0, 1), device, autocast_dtype)  # [P*B, F]
        out.append(f.view(num_patches, x.shape[0], -1).mean(0))
    encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted cosine kNN (Wu et al. 2018, InstDisc): class scores of each test sample.

    Each of the k nearest training samples (cosine similarity s) votes for its class with
    weight exp(s / temperature).

    Args:
        train_features: [N, F]; L2-normalised here.
        train_labels: [N] int64 in [0, num_classes).
        test_features: [M, F]; L2-normalised here.
        k: neighbours (clipped to N).
        chunk_size: test rows per similarity block, bounding memory to chunk_size x N.

    Returns:
        [M, num_classes] scores.
    """
    train = F.normalize(train_features, dim=1)
    test = F.normalize(test_features, dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # [m, C]
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    cfg: EvalConfig,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) kNN accuracy in percent."""
    scores = knn_predict(
        train_features, train_labels, test_features, num_classes, cfg.knn_k, cfg.knn_t
    )
    out = {"knn_top1": _topk_acc(scores, test_labels, 1)}
    if num_classes > 5:
        out["knn_top5"] = _topk_acc(scores, test_labels, 5)
    return out


def _topk_acc(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = scores.topk(k, dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    cfg: EvalConfig,
    seed: int = 0,
) -> dict[str, float]:
    """Train a linear classifier on frozen, standardised features; test top-1 in percent.

    Features are standardised with the training mean/std (no BatchNorm in the probe), then a
    linear layer is trained with SGD (momentum 0.9, cosine lr, batch 256) and cross-entropy for
    ``cfg.probe_epochs`` epochs.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mu = train_features.mean(0, keepdim=True)
    sd = train_features.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_features - mu) / sd, (test_features - mu) / sd
    probe = nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1.0 / math.sqrt(xtr.shape[1])
        probe.weight.copy_(torch.rand(probe.weight.shape, generator=gen) * 2 * bound - bound)
        probe.bias.zero_()
    opt = torch.optim.SGD(
        probe.parameters(), lr=cfg.probe_lr, momentum=0.9, weight_decay=cfg.probe_weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.probe_epochs)
    n, bs = xtr.shape[0], 256
    for _ in range(cfg.probe_epochs):
        perm = torch.randperm(n, generator=gen).to(xtr.device)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            loss = F.cross_entropy(probe(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        acc = _topk_acc(probe(xte), test_labels, 1)
        train_acc = _topk_acc(probe(xtr), train_labels, 1)
    return {"probe_top1": acc, "probe_train_top1": train_acc}


def protocol(cfg: EvalConfig, which: str) -> dict[str, Any]:
    """The settings that produced a metric, for logging next to it."""
    feat = f"patch_avg(n={cfg.num_patches})" if cfg.feature == "patch_avg" else "backbone"
    if which == "knn":
        return {
            "protocol": "weighted_knn",
            "k": cfg.knn_k,
            "t": cfg.knn_t,
            "feature": feat,
            "monitor_train_size": cfg.monitor_train_size or "all",
            "monitor_test_size": cfg.monitor_test_size or "all",
            "monitor_subset": "the first N of a fixed permutation (seed 0), the same in every run",
        }
    return {
        "protocol": "linear_probe",
        "epochs": cfg.probe_epochs,
        "lr": cfg.probe_lr,
        "weight_decay": cfg.probe_weight_decay,
        "feature": feat,
        "standardised": True,
    }


def monitor_subset(n: int, size: int) -> torch.Tensor | None:
    """Rows of the per-epoch kNN monitor's subset of an ``n``-image set, or None for all.

    The first ``size`` rows of a fixed permutation (seed 0, independent of the training seed),
    sorted: every run and every epoch is measured on the same images, so trials differ only by
    their encoders. ``size`` 0 or ``>= n`` means the whole set.
    """
    if size == 0 or size >= n:
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[:size].sort().values
