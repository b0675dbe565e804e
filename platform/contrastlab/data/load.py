"""``load_dataset``: the one entry point the trainer calls."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from ..config import STREAMED, DataConfig
from .cifar import load_cifar
from .core import DatasetSplits
from .digits import load_digits_splits
from .folder import load_image_folder
from .parquet import load_parquet
from .stl10 import load_stl10
from .stream import Scan, decoded_gb, scan

LOADERS: dict[str, Callable[[DataConfig], DatasetSplits]] = {
    "digits": load_digits_splits,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "stl10": load_stl10,
    "imagefolder": load_image_folder,
    "parquet": load_parquet,
}

# Datasets with an official test split: test_root / test_fraction do not apply to them.
_OFFICIAL_TEST = ("cifar10", "cifar100", "stl10")


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Decode ``cfg.dataset`` into memory as ``uint8 [N, 3, S, S]`` train and test splits.

    Args:
        cfg: the ``data`` section of the run config.

    Returns:
        :class:`DatasetSplits` whose ``train`` may include unlabeled rows (label ``-1``, STL-10
        with ``unlabeled=True``, or unlabeled parquet rows; every row with ``labels: false``)
        and whose ``test`` is labeled: the held-out split, the evaluation set's
        (``eval_root``, whose labeled train rows are then the kNN ``memory``), or None with
        ``labels: false`` and no evaluation set. The train split carries the mean/std of the
        (possibly truncated) train images.

    Raises:
        DataError: missing or malformed dataset files; the message names the file or
            directory and what was expected.
    """
    if cfg.dataset not in LOADERS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; allowed: {sorted(LOADERS)}")
    if cfg.unlabeled and cfg.dataset != "stl10":
        warnings.warn(
            f"data.unlabeled only applies to stl10; ignored for {cfg.dataset!r}", stacklevel=2
        )
    if cfg.test_root is not None and cfg.dataset in (*_OFFICIAL_TEST, "digits"):
        warnings.warn(
            f"data.test_root is ignored for {cfg.dataset!r}, which has a fixed test split",
            stacklevel=2,
        )
    splits = LOADERS[cfg.dataset](cfg)
    if not cfg.labels:
        splits = splits.without_labels()
    return with_eval_set(cfg, splits)


def with_eval_set(cfg: DataConfig, splits: DatasetSplits) -> DatasetSplits:
    """``splits`` evaluated on ``cfg``'s evaluation set (``eval_dataset``/``eval_root``), if it
    names one; else ``splits`` unchanged."""
    if not cfg.has_eval_set:
        return splits
    ev = cfg.eval_config()
    return splits.with_eval(LOADERS[ev.dataset](ev))


def open_source(cfg: DataConfig) -> tuple[str, Scan | None]:
    """``("memory" | "stream", scan)``: ``data.source``, or for ``auto`` whether the decoded
    training set (``N * 3 * S * S`` bytes, N from the shards' labels or the folder's listing)
    exceeds ``data.stream_above_gb`` (parquet and image folders; every other dataset is
    decoded into memory). ``scan`` is the root's listing when one was made (a source that
    may stream), for the stream's plan and monitors, so the root is listed once."""
    if cfg.source == "memory" or cfg.dataset not in STREAMED:
        return "memory", None
    scanned = scan(cfg)
    if cfg.source == "stream":
        return "stream", scanned
    big = decoded_gb(len(scanned.train_idx), cfg.image_size) > cfg.stream_above_gb
    return ("stream" if big else "memory"), scanned


def resolve_source(cfg: DataConfig) -> str:
    """``"memory"`` or ``"stream"``, as :func:`open_source` decides (listing the root only
    for ``auto``)."""
    return cfg.source if cfg.source != "auto" else open_source(cfg)[0]
