"""Evaluation protocols: weighted kNN monitor, linear probe, EMP-SSL patch-averaged features,
the label-free monitors and the diagnosis, and a run's :class:`Monitor` of them all.

Reported numbers depend heavily on the protocol (EMP-SSL issue #11), so every function here
returns, next to its numbers, a ``protocol`` dict that the trainer logs with them.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from contrastlab.config import EvalConfig

if TYPE_CHECKING:
    from contrastlab.augment import BatchAugment
    from contrastlab.data import DatasetSplits

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
    """Top-1 (and top-5 when there are more than 5 classes) kNN accuracy in percent, with
    ``k`` from :func:`knn_k` (``cfg.knn_k``, or chosen from the memory size when unset)."""
    k = knn_k(cfg, train_features.shape[0], num_classes)
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, cfg.knn_t)
    out = {"knn_top1": _topk_acc(scores, test_labels, 1)}
    if num_classes > 5:
        out["knn_top5"] = _topk_acc(scores, test_labels, 5)
    return out


#: The automatic kNN k (``eval.knn_k`` unset) is round(N_memory / (KNN_K_CLASS_SHARE * classes))
#: clipped to [KNN_K_MIN, KNN_K_MAX]: the k nearest neighbours then fill at most a fifth of one
#: class's share of the memory, so the vote is decided near the query rather than by the class
#: sizes (k=200 over 1,347 digits, 135 per class, would reach past every class). 200, the
#: InstDisc/MoCo monitor's k, stays the value for a 10,000-image CIFAR-10 memory.
KNN_K_CLASS_SHARE = 5
KNN_K_MIN = 5
KNN_K_MAX = 200


def auto_knn_k(memory_size: int, num_classes: int) -> int:
    """The automatic kNN k for a memory of ``memory_size`` images of ``num_classes`` classes
    (see :data:`KNN_K_CLASS_SHARE`)."""
    if memory_size < 1 or num_classes < 1:
        raise ValueError(
            f"the kNN memory needs images and classes, got {memory_size} images of "
            f"{num_classes} classes"
        )
    k = round(memory_size / (KNN_K_CLASS_SHARE * num_classes))
    return int(min(KNN_K_MAX, max(KNN_K_MIN, k)))


def knn_k(cfg: EvalConfig, memory_size: int, num_classes: int) -> int:
    """The k a kNN over ``memory_size`` images uses: ``cfg.knn_k`` when set (an explicit value
    always wins), else :func:`auto_knn_k`. :func:`knn_predict` clips it to the memory size."""
    return cfg.knn_k if cfg.knn_k is not None else auto_knn_k(memory_size, num_classes)


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


def protocol(
    cfg: EvalConfig,
    which: str,
    memory_size: int | None = None,
    num_classes: int | None = None,
    full_memory_size: int | None = None,
) -> dict[str, Any]:
    """The settings that produced a metric, for logging next to it.

    Args:
        cfg: the evaluation config.
        which: ``"knn"``, ``"label_free"`` or ``"probe"``.
        memory_size: images in the per-epoch kNN monitor's memory (with ``num_classes``, it
            resolves an automatic k; without them ``k`` is ``cfg.knn_k``, possibly None).
        num_classes: classes of the dataset.
        full_memory_size: images in the end-of-training ``knn_full_*`` memory, when that
            evaluation runs on more images than the monitor (its automatic k is then its own).
    """
    feat = f"patch_avg(n={cfg.num_patches})" if cfg.feature == "patch_avg" else "backbone"
    if which == "knn":
        out: dict[str, Any] = {
            "protocol": "weighted_knn",
            "k": cfg.knn_k,
            "k_auto": cfg.knn_k is None,
        }
        if cfg.knn_k is None:
            out["k_rule"] = (
                f"round(N_memory / ({KNN_K_CLASS_SHARE} * classes)) clipped to "
                f"[{KNN_K_MIN}, {KNN_K_MAX}]"
            )
            if memory_size is not None and num_classes is not None:
                out["k"] = auto_knn_k(memory_size, num_classes)
                out["k_rule"] += f"; N_memory={memory_size}, classes={num_classes}"
                if full_memory_size is not None:
                    out["k_full"] = auto_knn_k(full_memory_size, num_classes)
        out.update(
            {
                "t": cfg.knn_t,
                "feature": feat,
                "monitor_train_size": cfg.monitor_train_size or "all",
                "monitor_test_size": cfg.monitor_test_size or "all",
                "monitor_subset": "the first N of a fixed permutation (seed 0), the same in "
                "every run",
            }
        )
        return out
    if which == "label_free":
        return {
            "rankme": f"RankMe (Garrido et al. 2023, eps {RANKME_EPS:g}) of the {feat} features "
            "of the monitor memory subset, uncentred",
            "alignment": f"E||z1 - z2||^{ALIGN_ALPHA:g} (Wang & Isola 2020) of L2-normalised "
            f"backbone features of two training-augmented views of the first "
            f"{cfg.label_free_size} monitor memory images, view seed {LABEL_FREE_SEED}",
            "uniformity": f"log E exp(-{UNIFORM_T:g}||z_i - z_j||^2) over pairs of the same "
            "embeddings, the mean over the two views",
            "nuisance_r2": "held-out R^2, averaged over targets, of a ridge regression "
            f"(ridge {cfg.nuisance_ridge:g}, standardised features) from the {feat} features "
            f"to {', '.join(NUISANCE_TARGETS)}; fit on the monitor memory subset, scored on "
            "the monitor test subset",
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


def unlabeled_subsets(n: int, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The label-free monitors' memory and held-out rows of ``n`` unlabeled training images.

    One fixed permutation (seed 0): the held-out rows are its first
    ``min(cfg.monitor_test_size, n // 4)`` (``n // 4`` when that size is 0), the memory the next
    ``cfg.monitor_train_size`` (0: all the rest); both sorted, disjoint, the same every epoch.

    Returns:
        ``(memory_rows, test_rows)``, ``int64``.
    """
    n_test = n // 4 if cfg.monitor_test_size == 0 else min(cfg.monitor_test_size, n // 4)
    n_mem = n - n_test if cfg.monitor_train_size == 0 else min(cfg.monitor_train_size, n - n_test)
    if n_test < 2 or n_mem < 2:
        raise ValueError(f"{n} training images are too few for the label-free monitors (>= 8)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[n_test : n_test + n_mem].sort().values, perm[:n_test].sort().values


# --------------------------------------------------------------------------- label-free monitors
#
# Signals that need no labels, measured next to the kNN monitor: a sweep on unlabeled data can
# optimise them, and together with kNN they tell a shortcut (the features encode a per-image
# nuisance such as colour) from a collapse (the features lose their rank).

#: RankMe's epsilon (Garrido et al. 2023, eq. 1), added to each normalised singular value.
RANKME_EPS = 1e-7
#: Wang & Isola's exponents: alignment with alpha = 2, uniformity with t = 2.
ALIGN_ALPHA = 2.0
UNIFORM_T = 2.0
#: Seed of the two augmented views behind alignment and uniformity: the same views in every
#: epoch and every run, so the numbers follow the encoder only (like the monitor subsets).
LABEL_FREE_SEED = 0
#: What :func:`image_statistics` returns per image, in this order (the nuisance_r2 targets).
NUISANCE_TARGETS = ("mean_r", "mean_g", "mean_b", "brightness", "contrast")
#: ITU-R BT.601 luma weights of R, G, B.
_LUMA = (0.299, 0.587, 0.114)


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023): the effective rank of a feature matrix.

    ``p_k = sigma_k / sum(sigma) + eps`` over the singular values ``sigma`` of the (uncentred,
    as in the paper) features, and ``rankme = exp(-sum_k p_k log p_k)``: about ``r`` when ``r``
    directions carry equal energy, 1 for features that all point one way.

    Args:
        features: [N, F] features (any float dtype; computed in float64).
        eps: the paper's epsilon.

    Returns:
        A float in about [1, min(N, F)].
    """
    x = features.double()
    # the singular values are the square roots of the eigenvalues of the smaller Gram matrix
    # ([F, F] or [N, N]): about twice as fast as an SVD of the [N, F] matrix
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()  # [min(N, F)]
    p = sigma / sigma.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = ALIGN_ALPHA) -> float:
    """Alignment (Wang & Isola 2020): ``E ||f(x) - f(x+)||^alpha`` over positive pairs.

    Args:
        z1: [N, D] embeddings of one view; L2-normalised here.
        z2: [N, D] embeddings of the other view of the same N images; L2-normalised here.
        alpha: the exponent (2 in the paper).

    Returns:
        A float in [0, 2^alpha]: 0 when both views map to the same point; lower is better.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"alignment needs two [N, D] tensors, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    a, b = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    return float((a - b).norm(dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = UNIFORM_T) -> float:
    """Uniformity (Wang & Isola 2020): ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs.

    Args:
        z: [N, D] embeddings, N >= 2; L2-normalised here.
        t: the kernel's scale (2 in the paper).

    Returns:
        A float in [-4t, 0]: 0 when every embedding is the same point (collapse); lower means
        more evenly spread on the sphere.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"uniformity needs [N, D] embeddings with N >= 2, got {tuple(z.shape)}")
    x = F.normalize(z.double(), dim=1)
    n = x.shape[0]
    sq = (2 - 2 * (x @ x.T)).clamp_min(0)  # [N, N] squared distances on the unit sphere
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    # log-mean-exp, stable when the embeddings are spread (exp(-t d^2) underflows)
    return float(torch.logsumexp(-t * sq[i, j], dim=0) - math.log(i.numel()))


@torch.no_grad()
def paired_view_features(
    encoder: nn.Module,
    images: torch.Tensor,
    views: Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor],
    batch_size: int,
    device: torch.device,
    seed: int = LABEL_FREE_SEED,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two augmented views of every image, in eval mode (for :func:`alignment`).

    Args:
        encoder: maps [B, 3, S, S] float views to [B, F] features.
        images: [N, 3, H, W] uint8 (any device).
        views: ``(uint8 [B,3,H,W], n, generator) -> [n, B, 3, S, S]`` views (the training
            augmentation, so the pair is a positive pair the training loss saw).
        batch_size: images per draw (2 * batch_size views per forward).
        seed: seed of the view sampler: the same views every call.

    Returns:
        ``(z1, z2)``: [N, F] float32 features of the first and second view, on ``device``.
    """
    was_training = encoder.training
    encoder.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out1, out2 = [], []
    per_batch = max(1, batch_size // 2)
    for start in range(0, images.shape[0], per_batch):
        x = images[start : start + per_batch].to(device, non_blocking=True)
        v = views(x, 2, gen)  # [2, B, 3, S, S]
        f = _encode(encoder, v.flatten(0, 1), device, autocast_dtype).view(2, x.shape[0], -1)
        out1.append(f[0])
        out2.append(f[1])
    encoder.train(was_training)
    return torch.cat(out1), torch.cat(out2)


@torch.no_grad()
def image_statistics(images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Simple per-image statistics a shortcut may encode (:data:`NUISANCE_TARGETS`).

    Args:
        images: [N, 3, H, W] uint8 (or float in [0, 1]).
        chunk: images converted to float at a time (bounds the scratch memory).

    Returns:
        [N, 5] float32 in [0, 1]: the mean of R, G and B, the brightness (mean luma) and the
        contrast (standard deviation of luma over the pixels).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    w = torch.tensor(_LUMA, device=images.device).view(1, 3, 1, 1)
    rows = []
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        luma = (x * w).sum(1).flatten(1)  # [B, H*W]
        rows.append(
            torch.cat(
                [
                    x.mean(dim=(2, 3)),
                    luma.mean(1, keepdim=True),
                    luma.std(1, correction=0)[:, None],
                ],
                dim=1,
            )
        )
    return torch.cat(rows)


@torch.no_grad()
def ridge_r2(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """Held-out R^2 of a ridge regression, one per target column.

    The features are standardised with the training mean and std (so ``ridge`` does not
    depend on their scale), the targets centred with the training mean, and
    ``w = argmin mean((x w - y)^2) + ridge * ||w||^2`` solved in closed form, in float64.

    Args:
        train_x: [N, F] features the fit sees.
        train_y: [N, T] targets.
        test_x: [M, F] held-out features.
        test_y: [M, T] held-out targets.
        ridge: the L2 penalty (> 0).

    Returns:
        [T] float64 ``1 - SSE / SST`` on the held-out rows (SST about their own mean): 1 is a
        perfect prediction, 0 no better than a constant, negative worse. NaN for a target that
        is constant on the held-out rows.
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    x, xt = train_x.double(), test_x.double()
    y, yt = train_y.double(), test_y.double()
    mu, sd = x.mean(0), x.std(0, correction=0).clamp_min(1e-8)
    x, xt = (x - mu) / sd, (xt - mu) / sd  # constant features become 0: they drop out
    y_mu = y.mean(0)
    n, f = x.shape
    a = x.T @ x / n + ridge * torch.eye(f, dtype=x.dtype, device=x.device)  # [F, F]
    w = torch.linalg.solve(a, x.T @ (y - y_mu) / n)  # [F, T]
    pred = xt @ w + y_mu  # [M, T]
    sse = (yt - pred).pow(2).sum(0)
    sst = (yt - yt.mean(0)).pow(2).sum(0)
    return torch.where(sst > 1e-12 * yt.shape[0], 1 - sse / sst.clamp_min(1e-300), torch.nan)


# --------------------------------------------------------------------------- diagnosis

#: kNN top-1 counts as fallen below the random-init encoder when it is more than this many
#: points under the epoch-0 value. The monitor scores the same queries every epoch; two
#: accuracies near 80% on 450 queries (the digits test split), if independent, differ by 2.7
#: points at one standard error (1.8 on 2,000 CIFAR queries), and successive measurements on
#: the same queries are correlated, so differ less: 3 points is beyond that noise.
DIAGNOSIS_KNN_MARGIN = 3.0
#: nuisance_r2 at or above this (held-out R^2 of colour statistics from the features) counts
#: as "the features encode per-image colour". Note that a random-init encoder already scores
#: about 0.9 on digits: the shortcut message also needs kNN to be flat or falling.
DIAGNOSIS_NUISANCE_R2 = 0.8
#: A collapse: rankme's excess over 1 (1 = every feature on one line) under this fraction of
#: its epoch-0 excess. A random-init encoder's uncentred features already have a modest
#: effective rank (21 of 128 on digits, 6 to 8 for the tests' width-8 encoder); collapsed runs
#: measured here fell to 1.3 to 1.5 (EMP-SSL without its coding-rate term, SimCLR at lr 100).
DIAGNOSIS_RANK_FRACTION = 0.1
#: Also a collapse: uniformity (negative; 0 = every embedding at one point) above this fraction
#: of its epoch-0 value, i.e. all pairs of images have come close together (those two runs:
#: -0.28 -> -0.002 and -0.19 -> -0.012; healthy digits runs go the other way, -0.16 -> -0.55).
DIAGNOSIS_UNIFORMITY_FRACTION = 0.1
#: The kNN-based messages (knn_below_init, shortcut) wait until this trained epoch, or the last
#: one: the first epochs of a healthy run often dip under a random-init encoder (the default
#: digits job: 95.5% kNN at init, 91.1% at epoch 2, 94.4% at epoch 5, 97.6% at epoch 35).
#: A collapse is said at once.
DIAGNOSIS_GRACE_EPOCHS = 5
#: ... or until this fraction of the run's planned epochs, when that is later: the default
#: digits job (100 epochs) is under its random init from epoch 1 to 12 (92.4% at epoch 7
#: against 95.5%) and over it from epoch 17 on, so a fixed 5 epochs warned on the main job.
DIAGNOSIS_GRACE_FRACTION = 0.2


def grace_epochs(planned_epochs: int) -> int:
    """How long the kNN-based diagnoses wait in a run of ``planned_epochs`` epochs."""
    return max(DIAGNOSIS_GRACE_EPOCHS, math.ceil(DIAGNOSIS_GRACE_FRACTION * planned_epochs))


def diagnosis_kind(message: str) -> str:
    """The kind of a :func:`diagnose` message (its first word, before the colon)."""
    return message.split(":", 1)[0]


def update_diagnoses(
    history: list[dict[str, float]],
    said: list[dict[str, Any]],
    final: bool = False,
    grace: int = DIAGNOSIS_GRACE_EPOCHS,
) -> list[dict[str, Any]]:
    """Add to ``said`` what :func:`diagnose` reports on ``history`` of a kind not said yet.

    A run's diagnosis is reported once per kind, with the epoch and the numbers of its first
    appearance: the trainer and the Tune hook call this after every epoch on their running
    history.

    Args:
        history: the per-epoch metric dicts so far.
        said: ``{"epoch", "kind", "message"}`` dicts said before; extended in place.
        final: the history is complete (see :func:`diagnose`).
        grace: ``grace_epochs`` of :func:`diagnose` (callers pass :func:`grace_epochs` of
            the run's planned epochs).

    Returns:
        The newly added dicts (empty when there is nothing new).
    """
    kinds = {d["kind"] for d in said}
    epoch = int(history[-1].get("epoch", 0)) if history else 0
    new = [
        {"epoch": epoch, "kind": diagnosis_kind(m), "message": m}
        for m in diagnose(history, final=final, grace_epochs=grace)
        if diagnosis_kind(m) not in kinds
    ]
    said.extend(new)
    return new


def _latest(history: list[dict[str, float]], key: str) -> dict[str, float] | None:
    """The newest trained epoch (epoch > 0) that reports ``key``."""
    for h in reversed(history):
        if key in h and h.get("epoch", 0) > 0:
            return h
    return None


def _initial(history: list[dict[str, float]], key: str) -> float | None:
    """``key`` at epoch 0 (the random-init encoder), if measured."""
    for h in history:
        if h.get("epoch") == 0 and key in h:
            return float(h[key])
    return None


def diagnose(
    history: list[dict[str, float]],
    final: bool = False,
    knn_margin: float = DIAGNOSIS_KNN_MARGIN,
    nuisance_r2: float = DIAGNOSIS_NUISANCE_R2,
    rank_fraction: float = DIAGNOSIS_RANK_FRACTION,
    uniformity_fraction: float = DIAGNOSIS_UNIFORMITY_FRACTION,
    grace_epochs: int = DIAGNOSIS_GRACE_EPOCHS,
) -> list[str]:
    """What the monitors say about a run so far, in plain words (empty: nothing to report).

    Each message starts with its kind (:func:`diagnosis_kind`):

    * ``knn_below_init``: the newest kNN top-1 is more than ``knn_margin`` points under the
      random-init encoder's, i.e. training made the features worse for the labels: a shortcut
      or a collapse.
    * ``shortcut``: the newest ``nuisance_r2`` is at least ``nuisance_r2`` while kNN is flat
      (at most ``knn_margin`` over its epoch-0 value) or falling; without kNN, while
      ``nuisance_r2`` has not fallen from its epoch-0 value: the features encode per-image
      colour statistics, which the views share.
    * ``collapse``: the newest ``rankme`` exceeds 1 by under ``rank_fraction`` of what it did
      at epoch 0, or the newest ``uniformity`` is above ``uniformity_fraction`` of its epoch-0
      value (the embeddings have come together).

    The first two wait for epoch ``grace_epochs`` (or ``final``), see
    :data:`DIAGNOSIS_GRACE_EPOCHS`.

    Args:
        history: the per-epoch metric dicts in order (``metrics.jsonl``); epoch 0, when
            present, is the random-init encoder. Epochs without a monitor are skipped.
        final: the history is complete (the run's last epoch): no grace.
        knn_margin: see :data:`DIAGNOSIS_KNN_MARGIN` (percentage points).
        nuisance_r2: see :data:`DIAGNOSIS_NUISANCE_R2`.
        rank_fraction: see :data:`DIAGNOSIS_RANK_FRACTION`.
        uniformity_fraction: see :data:`DIAGNOSIS_UNIFORMITY_FRACTION`.
        grace_epochs: see :data:`DIAGNOSIS_GRACE_EPOCHS`.

    Returns:
        Messages, at most one per kind, in the order above.
    """
    out = []
    trained = max((int(h.get("epoch", 0)) for h in history), default=0)
    settled = final or trained >= grace_epochs
    knn0, knn = _initial(history, "knn_top1"), _latest(history, "knn_top1")
    fell = knn is not None and knn0 is not None and knn["knn_top1"] < knn0 - knn_margin
    flat = knn is not None and knn0 is not None and knn["knn_top1"] <= knn0 + knn_margin
    rank0, rank = _initial(history, "rankme"), _latest(history, "rankme")
    rank_low = (
        rank is not None and rank0 is not None and rank["rankme"] - 1 < rank_fraction * (rank0 - 1)
    )
    unif0, unif = _initial(history, "uniformity"), _latest(history, "uniformity")
    unif_low = (
        unif is not None
        and unif0 is not None
        and unif0 < 0
        and unif["uniformity"] > uniformity_fraction * unif0
    )
    collapsed = rank_low or unif_low
    nuis0, nuis = _initial(history, "nuisance_r2"), _latest(history, "nuisance_r2")
    if knn is not None and knn0 is not None:
        nuis_suspect = flat
    else:  # no labels: the probe alone, against the random-init encoder's value
        nuis_suspect = nuis0 is not None and nuis is not None and nuis["nuisance_r2"] >= nuis0
    shortcut = nuis is not None and nuis["nuisance_r2"] >= nuisance_r2 and nuis_suspect
    fell, shortcut = fell and settled, shortcut and settled

    if fell:
        assert knn is not None and knn0 is not None
        probes = [
            f"{key} {h[key]:.2f}"
            for key, h in (("nuisance_r2", nuis), ("rankme", rank))
            if h is not None
        ]
        cause = (
            "see the shortcut and collapse messages"
            if shortcut or collapsed
            else f"the probes ({', '.join(probes) or 'not measured'}) point to neither yet: "
            "check that the views share no per-image nuisance (colour, position, background) "
            "and that the loss goes down"
        )
        out.append(
            f"knn_below_init: kNN fell below the random-init encoder: a shortcut or a collapse "
            f"(knn_top1 {knn['knn_top1']:.1f}% at epoch {int(knn['epoch'])} against "
            f"{knn0:.1f}% at init, more than {knn_margin:g} points under it; {cause})"
        )
    if shortcut:
        assert nuis is not None
        trend = f", {nuis0:.2f} at init" if nuis0 is not None else ""
        knn_text = (
            "kNN fell below the random-init encoder"
            if fell
            else "kNN is no better than the random-init encoder"
            if knn is not None and knn0 is not None
            else "the probe did not fall from its random-init value"
        )
        out.append(
            "shortcut: the features predict per-image colour and brightness statistics "
            f"(nuisance_r2 {nuis['nuisance_r2']:.2f} at epoch {int(nuis['epoch'])}{trend}) and "
            f"{knn_text}: the two views likely share them, so the encoder tells images apart "
            "by them. Try augment.channel_shuffle_p=1 augment.channel_gain=[0.6,1.4] or "
            "stronger colour jitter (augment.jitter_p, augment.brightness, augment.contrast, "
            "augment.saturation, augment.hue, augment.grayscale_p)"
        )
    if collapsed:
        seen = []
        if rank is not None and rank0 is not None:
            seen.append(
                f"rankme {rank['rankme']:.2f} at epoch {int(rank['epoch'])}, {rank0:.1f} at init"
            )
        if unif is not None and unif0 is not None:
            seen.append(
                f"uniformity {unif['uniformity']:.3f} at epoch {int(unif['epoch'])}, "
                f"{unif0:.3f} at init"
            )
        what = "collapsed to a few directions" if rank_low else "came together"
        out.append(
            f"collapse: the features {what} ({'; '.join(seen)}): the encoder maps different "
            "images alike. Try a lower optim.lr, a higher method.temperature, a larger "
            "train.batch_size or a longer optim.warmup_epochs, and check that the loss has a "
            "term that spreads the embeddings (negatives, coding rate)"
        )
    return out


# --------------------------------------------------------------------------- a run's monitor


class Monitor:
    """What a training run measures besides its loss, and what it concludes from that.

    Every ``eval.knn_every`` epochs (and at the last): kNN accuracy on fixed subsets of the
    labelled training images (the memory) and of the test images (``eval.monitor_*_size``),
    the k it used and, with ``eval.label_free``, the label-free monitors on the same features.
    At the last epoch also kNN on every image (``knn_full_*``) and the linear probe, when
    asked. After every epoch, :func:`diagnose` on the run's history, each kind said once.

    Without a labeled evaluation set (``data.labels: false`` and no ``data.eval_root``) only
    the label-free monitors run, on two disjoint fixed subsets of the training images (one
    fixed permutation, seed 0): the held-out queries are its first
    ``min(eval.monitor_test_size, N // 4)`` rows (``N // 4`` when the size is 0), the memory
    the next ``eval.monitor_train_size`` rows (0: all the rest). :attr:`notice` says so.

    Args:
        encoder: the backbone whose features are measured (``[B, 3, S, S]`` float ->
            ``[B, F]``): the training model's own module, so each call sees its current weights.
        augment: the training augmentation: its ``normalize`` makes the encoder's input; its
            views are EMP-SSL's patches and the alignment pairs.
        data: the dataset splits; the labelled training images (or the evaluation set's
            ``memory``) are the kNN memory.
        cfg: the evaluation settings.
        device: where features are computed.
        seed: the run's seed (the patch draws of ``eval.feature='patch_avg'``, the probe).
        store: where the evaluation images are kept (default: ``device``).
        autocast_dtype: e.g. ``torch.bfloat16``, to match the training precision.
        channels_last: feed the encoder channels_last input, as training does.
    """

    def __init__(
        self,
        encoder: nn.Module,
        augment: BatchAugment,
        data: DatasetSplits,
        cfg: EvalConfig,
        device: torch.device,
        *,
        seed: int,
        store: torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.encoder, self.augment, self.cfg, self.device = encoder, augment, cfg, device
        self.seed, self.autocast_dtype, self.channels_last = seed, autocast_dtype, channels_last
        store = device if store is None else store
        self.labeled = data.test is not None
        if data.test is not None:
            self.memory_set = data.labeled_train().to(store)
            self.test_set = data.test.to(store)
            # the per-epoch kNN monitor's fixed subsets (rows None: the whole set), cut once
            self.rows = (
                monitor_subset(len(self.memory_set), cfg.monitor_train_size),
                monitor_subset(len(self.test_set), cfg.monitor_test_size),
            )
            sources = (self.memory_set, self.test_set)
        else:
            self.memory_set = self.test_set = data.train.to(store)
            self.rows = unlabeled_subsets(len(data.train), cfg)
            sources = (self.memory_set, self.memory_set)
        self.num_classes = self.memory_set.num_classes
        self.sets = tuple(
            s if rows is None else s.subset(rows)
            for s, rows in zip(sources, self.rows, strict=True)
        )
        # [N, 5] and [M, 5] colour statistics of the monitor subsets (nuisance_r2's targets)
        self._nuisance: tuple[torch.Tensor, torch.Tensor] | None = None
        # what diagnose said, each kind once: {"epoch", "kind", "message"}
        self.diagnoses: list[dict[str, Any]] = []

    @property
    def is_subset(self) -> bool:
        """Whether the per-epoch kNN monitor sees only part of the memory or test set."""
        return self.labeled and any(rows is not None for rows in self.rows)

    @property
    def notice(self) -> str | None:
        """What a run without labels says once at its start (None when it has labels)."""
        if self.labeled:
            return None
        runs = "only the label-free monitors run" if self.cfg.label_free else "no monitor runs"
        return (
            "no labeled evaluation set (data.labels: false and no data.eval_root): kNN metrics "
            f"and the linear probe are off, {runs}"
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation features of uint8 images, per ``eval.feature``."""
        ev = self.cfg
        if ev.feature == "patch_avg":
            return patch_averaged_features(
                self.encoder,
                images,
                self.augment,
                ev.num_patches,
                ev.batch_size,
                self.device,
                seed=self.seed,
                autocast_dtype=self.autocast_dtype,
            )
        return extract_features(
            self.encoder,
            images,
            self._encoder_input,
            ev.batch_size,
            self.device,
            autocast_dtype=self.autocast_dtype,
        )

    def _encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        x = self.augment.normalize(images)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def knn(self, full: bool = False) -> dict[str, float]:
        """kNN accuracy: the per-epoch monitor on its fixed subsets (``eval.monitor_*_size``),
        or with ``full`` on every memory and test image (metrics then named ``knn_full_*``).

        The per-epoch monitor also reports the k it used (``knn_k``) and, with
        ``eval.label_free``, the label-free monitors (:meth:`label_free`) on the same
        features."""
        mem, test = (self.memory_set, self.test_set) if full else self.sets
        f_mem, f_test = self.features(mem.images), self.features(test.images)
        if not self.labeled:  # the subsets are unlabeled training images
            return self.label_free(f_mem, f_test) if self.cfg.label_free else {}
        out = knn_accuracy(
            f_mem,
            mem.labels.to(self.device),
            f_test,
            test.labels.to(self.device),
            self.num_classes,
            self.cfg,
        )
        if full:
            return {k.replace("knn_", "knn_full_"): v for k, v in out.items()}
        out["knn_k"] = knn_k(self.cfg, len(mem), self.num_classes)
        if self.cfg.label_free:
            out.update(self.label_free(f_mem, f_test))
        return out

    def label_free(self, f_mem: torch.Tensor, f_test: torch.Tensor) -> dict[str, float]:
        """The label-free monitors of the current encoder (none of them reads a label).

        Args:
            f_mem: [N, F] evaluation features of the monitor memory subset.
            f_test: [M, F] evaluation features of the monitor test subset.

        Returns:
            ``rankme`` of ``f_mem``; ``alignment`` and ``uniformity`` (the mean over the two
            views) of the L2-normalised backbone features of two augmented views of the first
            ``eval.label_free_size`` memory images: the backbone's, not the projection head's,
            because it is what kNN and a downstream user see, and every method has one (CMC's
            two heads and CPC's per-patch head do not give one comparable embedding);
            ``nuisance_r2``, the held-out R^2 of a ridge regression from the evaluation
            features to per-image colour statistics, averaged over the statistics that vary.
        """
        ev = self.cfg
        mem, test = self.sets
        out = {"rankme": rankme(f_mem)}
        images = mem.images[: ev.label_free_size]
        if images.shape[0] >= 2:
            z1, z2 = paired_view_features(
                self.encoder,
                images,
                self.augment,
                ev.batch_size,
                self.device,
                autocast_dtype=self.autocast_dtype,
            )
            out["alignment"] = alignment(z1, z2)
            out["uniformity"] = (uniformity(z1) + uniformity(z2)) / 2
        if self._nuisance is None:  # the subsets are fixed: their statistics are computed once
            self._nuisance = (
                image_statistics(mem.images).to(self.device),
                image_statistics(test.images).to(self.device),
            )
        r2 = ridge_r2(f_mem, self._nuisance[0], f_test, self._nuisance[1], ev.nuisance_ridge)
        r2 = r2[r2.isfinite()]  # a statistic constant on the test subset has no R^2
        if r2.numel():
            out["nuisance_r2"] = float(r2.mean())
        return out

    def probe(self) -> dict[str, float]:
        """The linear probe on every memory and test image (:func:`linear_probe`)."""
        mem, test = self.memory_set, self.test_set
        return linear_probe(
            self.features(mem.images),
            mem.labels.to(self.device),
            self.features(test.images),
            test.labels.to(self.device),
            self.num_classes,
            self.cfg,
            seed=self.seed,
        )

    def measure(self, epoch: int, epochs: int) -> dict[str, float]:
        """The monitors due after ``epoch`` of a run of ``epochs`` (epoch 0: the random-init
        encoder, with ``eval.knn_at_init``); empty when none is.

        The kNN monitor runs every ``eval.knn_every`` epochs and at the last, timed as
        ``eval_time_s``; the last epoch adds kNN on every image (when the monitor sees a subset
        and ``eval.knn_full_at_end``) and the linear probe (``eval.linear_probe``).
        """
        ev, last = self.cfg, epoch == epochs
        out: dict[str, float] = {}
        if ev.knn_every and (epoch % ev.knn_every == 0 or last) and (epoch or ev.knn_at_init):
            t0 = time.perf_counter()
            out.update(self.knn())
            out["eval_time_s"] = time.perf_counter() - t0
            if last and self.is_subset and ev.knn_full_at_end:
                out.update(self.knn(full=True))
        if last and ev.linear_probe and self.labeled:
            out.update(self.probe())
        return out

    def protocol(self) -> dict[str, Any]:
        """How the numbers of :meth:`measure` are produced (a run's ``protocol.json``)."""
        ev = self.cfg
        if not self.labeled:
            prot: dict[str, Any] = {"knn": {"off": self.notice}}
            if ev.label_free:
                prot["label_free"] = {
                    **protocol(ev, "label_free"),
                    "memory_size": len(self.sets[0]),
                    "test_size": len(self.sets[1]),
                    "images": "disjoint fixed subsets of the unlabeled training images",
                }
            return prot
        prot = {
            "knn": protocol(
                ev,
                "knn",
                memory_size=len(self.sets[0]),
                num_classes=self.num_classes,
                full_memory_size=len(self.memory_set) if self.is_subset else None,
            )
        }
        if ev.label_free:
            prot["label_free"] = protocol(ev, "label_free")
        if ev.linear_probe:
            prot["linear_probe"] = protocol(ev, "probe")
        return prot

    def report_diagnoses(
        self, history: list[dict[str, float]], epochs: int, progress: bool
    ) -> None:
        """Record each new kind of :func:`diagnose` message on ``history`` (of a run of
        ``epochs`` epochs) once, in :attr:`diagnoses`, and print it: through tqdm with
        ``progress`` bars, else as a :class:`RuntimeWarning` on stderr, so that it reaches the
        user either way."""
        for d in self._update_diagnoses(history, epochs):
            text = f"contrastlab diagnosis: {d['message']}"
            if progress:
                tqdm.write(text, file=sys.stderr)
            else:
                warnings.warn(text, RuntimeWarning, stacklevel=2)

    def recall_diagnoses(self, history: list[dict[str, float]], epochs: int) -> None:
        """Record, without printing, what the diagnosis said after each epoch of ``history``:
        a resumed run's summary then holds what the interrupted attempt said, at its epochs."""
        for end in range(1, len(history) + 1):
            self._update_diagnoses(history[:end], epochs)

    def _update_diagnoses(
        self, history: list[dict[str, float]], epochs: int
    ) -> list[dict[str, Any]]:
        final = history[-1].get("epoch") == epochs
        return update_diagnoses(history, self.diagnoses, final, grace_epochs(epochs))
