"""Dataset containers and the helpers every loader shares.

Every loader decodes its files once into one ``uint8`` tensor of shape ``[N, 3, S, S]``
(``S = DataConfig.image_size``) plus an ``int64`` label vector. Augmentation then runs batched
on the training device, so nothing here is per-sample or lazy.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if TYPE_CHECKING:
    from ..config import DataConfig

#: Show a progress bar when a loader decodes or resizes more images than this.
PROGRESS_MIN_IMAGES = 5000

# Process at most this many pixel values at once: bounds the scratch memory of resizing and
# statistics to tens of MiB whatever N and S are (STL-10 + unlabeled is 105k x 3x96x96).
_RESIZE_CHUNK_VALUES = 16 * 1024 * 1024

T = TypeVar("T")
R = TypeVar("R")


class DataError(ValueError):
    """Bad or missing dataset files. The message names the file or directory and what was
    expected of it."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A whole split held in memory.

    Attributes:
        images: ``uint8 [N, 3, S, S]``; always 3 channels (grayscale is replicated).
        labels: ``int64 [N]``; ``-1`` marks an unlabeled image.
        num_classes: number of classes of the dataset (not only those present in this split).
        mean: per-channel mean of the *train* images, in ``[0, 1]``.
        std: per-channel (population) standard deviation of the *train* images, in ``[0, 1]``.
        name: human-readable name, e.g. ``"cifar10/train"``.
        classes: class names indexed by label, when known (else empty).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    classes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Cheap structural checks: every consumer relies on this exact layout.
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            raise ValueError(
                f"{self.name}: images must be uint8 [N, 3, S, S], got {x.dtype} {list(x.shape)}"
            )
        if y.dtype != torch.int64 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{self.name}: labels must be int64 [{x.shape[0]}], got {y.dtype} {list(y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        """Side length ``S`` of the square images."""
        return int(self.images.shape[-1])

    @property
    def device(self) -> torch.device:
        """Device the tensors live on."""
        return self.images.device

    def to(self, device: torch.device | str) -> ImageDataset:
        """Return a copy with ``images`` and ``labels`` on ``device`` (self if already there).

        Args:
            device: target device, e.g. ``"cuda"``.

        Returns:
            An :class:`ImageDataset` with the same metadata.
        """
        device = torch.device(device)
        if self.images.device == device and self.labels.device == device:
            return self
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def subset(
        self, index: torch.Tensor | np.ndarray | Sequence[int], name: str | None = None
    ) -> ImageDataset:
        """Rows ``index`` (int indices or a boolean mask), same metadata.

        Args:
            index: row indices or a boolean mask of length ``N``.
            name: name of the result (default: this dataset's name).

        Returns:
            A new :class:`ImageDataset`.
        """
        idx = torch.as_tensor(np.asarray(index) if not torch.is_tensor(index) else index)
        idx = idx.to(self.images.device)
        return replace(
            self, images=self.images[idx], labels=self.labels[idx], name=name or self.name
        )


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """The train split SSL trains on and the labeled split(s) used for evaluation.

    Attributes:
        train: training images; may contain unlabeled rows (label ``-1``), or only such rows.
        test: labeled held-out images (kNN queries / linear probe evaluation), or None when
            there is no labeled evaluation set (``data.labels: false`` without
            ``data.eval_root``): then only the label-free monitors run.
        memory: the labeled kNN memory and probe training set when it comes from a separate
            evaluation set (``data.eval_root``); None: the labeled rows of ``train``.
    """

    train: ImageDataset
    test: ImageDataset | None
    memory: ImageDataset | None = None

    @property
    def labeled(self) -> bool:
        """Whether there is a labeled evaluation set (kNN, linear probe)."""
        return self.test is not None

    def labeled_train(self) -> ImageDataset:
        """The kNN memory bank and the probe's training set: ``memory`` when an evaluation set
        gives one, else the labeled rows of ``train``.

        Returns:
            ``train`` itself when every row is labeled, else a filtered copy.
        """
        if self.memory is not None:
            return self.memory
        mask = self.train.labels >= 0
        if bool(mask.all()):
            return self.train
        return self.train.subset(mask, name=f"{self.train.name}[labeled]")

    def without_labels(self) -> DatasetSplits:
        """Train on the images alone (``data.labels: false``): every train label -1, no test.

        Returns:
            Splits with an unlabeled ``train`` and neither ``test`` nor ``memory``.
        """
        train = replace(
            self.train, labels=torch.full_like(self.train.labels, -1), num_classes=0, classes=()
        )
        return DatasetSplits(train=train, test=None)

    def with_eval(self, ev: DatasetSplits) -> DatasetSplits:
        """These training images, evaluated on ``ev``: its labeled train rows are the kNN
        memory, its test split the queries."""
        if ev.test is None:
            raise DataError(f"{ev.train.name}: the evaluation set has no labeled test split")
        return DatasetSplits(train=self.train, test=ev.test, memory=ev.labeled_train())

    def to(self, device: torch.device | str) -> DatasetSplits:
        """Every split on ``device``."""
        return DatasetSplits(
            train=self.train.to(device),
            test=None if self.test is None else self.test.to(device),
            memory=None if self.memory is None else self.memory.to(device),
        )


# --------------------------------------------------------------------------- pixels


def resize_uint8(
    images: torch.Tensor, size: int, desc: str = "resizing", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Resize ``uint8 [N, C, H, W]`` (C = 1 or 3) to ``uint8 [N, 3, size, size]``.

    Bilinear; antialiased when downscaling (so a 96 -> 32 resize averages pixels instead of
    aliasing), plain bilinear when upscaling. Non-square inputs are stretched (callers pass
    square arrays). Works chunk-wise so the scratch memory stays small whatever ``N`` is.

    Args:
        images: ``uint8 [N, C, H, W]``.
        size: output side length.
        desc: progress bar label (the bar shows for more than ``PROGRESS_MIN_IMAGES`` images).
        out: optional preallocated ``uint8 [N, 3, size, size]`` destination (lets a caller
            fill slices of one big tensor instead of concatenating copies).

    Returns:
        ``out``, or a new contiguous ``uint8 [N, 3, size, size]`` tensor: a copy even when no
        resize is needed, so the result never aliases the input (e.g. a memory-mapped file).
    """
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {c}")
    if out is None:
        out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    elif out.shape != (n, 3, size, size) or out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8 {[n, 3, size, size]}, got {list(out.shape)}")
    if (h, w) == (size, size):
        out.copy_(images.expand(n, 3, h, w))
        return out
    antialias = size < h or size < w
    step = max(1, _RESIZE_CHUNK_VALUES // (3 * max(h * w, size * size)))
    with tqdm(total=n, desc=desc, unit="img", disable=n <= PROGRESS_MIN_IMAGES) as bar:
        for lo in range(0, n, step):
            # uint8 channels_last input takes PyTorch's vectorised fixed-point kernel: ~10x
            # faster than resizing in float on CPU, results within 1 of float + round.
            chunk = images[lo : lo + step].expand(-1, 3, -1, -1)
            chunk = chunk.contiguous(memory_format=torch.channels_last)
            chunk = F.interpolate(
                chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
            )
            out[lo : lo + step] = chunk
            bar.update(chunk.shape[0])
    return out


def channel_stats(
    images: torch.Tensor,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact per-channel mean and population std of ``uint8 [N, 3, S, S]`` images in ``[0, 1]``.

    Computed from a 256-bin histogram per channel (integer counts), so it is exact and needs
    no float copy of the dataset.

    Args:
        images: ``uint8 [N, 3, S, S]``.

    Returns:
        ``(mean, std)``, each a 3-tuple of floats.
    """
    if images.shape[0] == 0:
        raise DataError("cannot compute statistics of an empty training set")
    hist = torch.zeros(3, 256, dtype=torch.float64)
    step = max(1, _RESIZE_CHUNK_VALUES // (3 * images.shape[2] * images.shape[3]))
    for lo in range(0, images.shape[0], step):
        chunk = images[lo : lo + step].cpu()
        for ch in range(3):
            values = chunk[:, ch].reshape(-1).to(torch.int64)
            hist[ch] += torch.bincount(values, minlength=256).to(torch.float64)
    v = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(dim=1)
    mean = (hist * v).sum(dim=1) / count
    var = (hist * (v - mean[:, None]) ** 2).sum(dim=1) / count
    std = var.clamp_min(0).sqrt()
    m, s = mean.tolist(), std.tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


# --------------------------------------------------------------------------- splitting


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split of the labeled rows.

    The test set gets ``round(test_fraction * n_labeled)`` rows, shared out between classes in
    proportion to their size (largest-remainder rounding, so the total is exact). Rows with
    label ``-1`` always go to train.

    Args:
        labels: ``int [N]`` labels, ``-1`` for unlabeled.
        test_fraction: share of labeled rows held out, in ``(0, 1)``.
        seed: seed of the shuffle inside each class.

    Returns:
        ``(train_idx, test_idx)``: sorted ``int64`` index arrays partitioning ``range(N)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    labeled = np.flatnonzero(labels >= 0)
    classes, counts = np.unique(labels[labeled], return_counts=True)
    n_test = round(test_fraction * len(labeled))
    quota = counts * (n_test / max(len(labeled), 1))
    per_class = np.floor(quota).astype(np.int64)
    # Largest remainder first; ties go to the lower class id (stable sort) for determinism.
    order = np.argsort(-(quota - per_class), kind="stable")
    per_class[order[: n_test - int(per_class.sum())]] += 1
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls, k in zip(classes, per_class, strict=True):
        members = np.flatnonzero(labels == cls)
        test_parts.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    return np.flatnonzero(~is_test), test_idx.astype(np.int64)


def truncate_indices(n: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """Indices of the first ``max_samples`` rows after a seeded shuffle, or None to keep all.

    The chosen indices are returned sorted, so the subset keeps the original row order (the
    subset itself is the one a seeded shuffle picks).

    Args:
        n: number of rows.
        max_samples: cap, or None.
        seed: shuffle seed (``DataConfig.split_seed``).

    Returns:
        Sorted ``int64 [max_samples]`` indices, or None if no truncation is needed.
    """
    if max_samples is None or max_samples >= n:
        return None
    # Offset the seed so this shuffle is independent of the stratified split's shuffles.
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.permutation(n)[:max_samples]).astype(np.int64)


def build_splits(
    cfg: DataConfig,
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    num_classes: int,
    classes: Sequence[str] = (),
) -> DatasetSplits:
    """Truncate train (``max_train_samples``), compute train statistics, wrap both splits.

    Args:
        cfg: data config (``max_train_samples``, ``split_seed``).
        name: dataset name; the splits are named ``"<name>/train"`` and ``"<name>/test"``.
        train: ``(uint8 [N, 3, S, S], int64 [N])`` training images and labels.
        test: the same for the held-out split (labeled), or None (no labeled evaluation).
        num_classes: class count of the dataset.
        classes: class names, if known.

    Returns:
        The :class:`DatasetSplits`; both splits carry the train mean/std.
    """
    x_train, y_train = train
    keep = truncate_indices(len(y_train), cfg.max_train_samples, cfg.split_seed)
    if keep is not None:
        x_train, y_train = x_train[keep], y_train[keep]
    if test is not None and len(test[1]) == 0:
        raise DataError(f"{name}: the test split is empty (no labeled held-out images)")
    mean, std = channel_stats(x_train)

    def wrap(x: torch.Tensor, y: torch.Tensor, split: str) -> ImageDataset:
        return ImageDataset(x, y, num_classes, mean, std, f"{name}/{split}", tuple(classes))

    return DatasetSplits(
        train=wrap(x_train, y_train, "train"),
        test=None if test is None else wrap(*test, "test"),
    )


def plan_rows(
    labels: np.ndarray, cfg: DataConfig, split: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Which rows to decode, before decoding anything.

    Applies the stratified split (if ``split``) and the ``max_train_samples`` truncation to
    row indices, so loaders of encoded files decode only the rows they keep. The result is
    the same as splitting / truncating the decoded arrays (:func:`build_splits` re-applying
    the truncation is then a no-op).

    Args:
        labels: ``int [N]`` labels (``-1`` unlabeled) of all rows of ``root``.
        cfg: data config.
        split: hold out a stratified ``test_fraction`` of the rows (no ``test_root``).

    Returns:
        ``(train_idx, test_idx)``, sorted; ``test_idx`` is None when ``split`` is False.
    """
    if split:
        train_idx, test_idx = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    else:
        train_idx, test_idx = np.arange(len(labels), dtype=np.int64), None
    keep = truncate_indices(len(train_idx), cfg.max_train_samples, cfg.split_seed)
    return (train_idx if keep is None else train_idx[keep]), test_idx


# --------------------------------------------------------------------------- decoding


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    workers: int | None = None,
) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with a progress bar for large inputs.

    Threads suffice because PIL releases the GIL while decoding and resizing. ``items`` is
    consumed lazily with a bounded look-ahead, so a generator can stream inputs (e.g. one
    parquet shard at a time). On error the pending work is cancelled and the exception
    propagates.

    Args:
        fn: function of one item.
        items: inputs (a sequence, or any iterable when ``total`` is given).
        desc: progress bar label.
        total: number of items (default: ``len(items)``).
        workers: thread count (default: CPU count, at most 8).

    Yields:
        ``fn(item)`` for each item, in order.
    """
    total = len(items) if total is None else total  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit="img", disable=total <= PROGRESS_MIN_IMAGES)
    try:
        workers = workers or min(8, os.cpu_count() or 1)
        if workers <= 1 or total < 64:
            for item in items:
                yield fn(item)
                bar.update()
            return
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            # Bounded look-ahead so decoded results do not pile up unconsumed.
            pending: deque[Future[R]] = deque()
            it = iter(items)
            for item in itertools.islice(it, 4 * workers):
                pending.append(pool.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(it, 1):
                    pending.append(pool.submit(fn, item))
                bar.update()
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is an existing directory, else a :class:`DataError`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} not found: {p} does not exist")
    if not p.is_dir():
        raise DataError(f"{what} must be a directory: {p} is a file")
    return p
