"""STL-10 in the official binary format.

Layout (``root`` is ``stl10_binary/`` itself or contains it)::

    stl10_binary/  train_X.bin, train_y.bin, test_X.bin, test_y.bin, [unlabeled_X.bin]

``*_X.bin`` holds raw ``uint8`` images of 3x96x96, one after the other, each channel stored
*column-major* (the file comes from MATLAB): reading an image as ``[3, 96, 96]`` in C order
gives ``[C, W, H]``, so the last two axes are swapped to get ``[C, H, W]``. ``*_y.bin`` holds
one ``uint8`` label per image in 1..10 (mapped to 0..9 here).

The binaries are read directly rather than through ``torchvision.datasets.STL10``, which
checks the MD5 of the official archive and so rejects any other file (e.g. small test
fixtures), and which keeps the images at 96x96.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .core import DataError, DatasetSplits, build_splits, require_dir, resize_uint8

STL10_CLASSES = (
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
)  # fmt: skip
_SIDE = 96
_IMAGE_BYTES = STL10_IMAGE_BYTES = 3 * _SIDE * _SIDE


def _open_images(path: Path) -> torch.Tensor:
    """``*_X.bin`` -> a lazy ``uint8 [N, 3, 96, 96]`` view (memory-mapped, [C, H, W] order)."""
    nbytes = path.stat().st_size
    if nbytes == 0 or nbytes % _IMAGE_BYTES:
        raise DataError(
            f"{path}: size {nbytes} bytes is not a positive multiple of {_IMAGE_BYTES} "
            f"(3x{_SIDE}x{_SIDE} uint8 images)"
        )
    # Memory-map instead of reading: the unlabeled file is 2.6 GiB and is consumed chunk by
    # chunk by the resize. mode "c" (copy-on-write) gives a writable view, which torch wants.
    raw = np.memmap(path, dtype=np.uint8, mode="c").reshape(-1, 3, _SIDE, _SIDE)
    # [N, C, W, H] (column-major per channel) -> [N, C, H, W]; a strided view, no copy.
    return torch.from_numpy(raw).transpose(2, 3)


def _read_labels(path: Path, n: int) -> torch.Tensor:
    """``*_y.bin`` -> ``int64 [n]`` in 0..9."""
    y = np.fromfile(path, dtype=np.uint8)
    if y.shape[0] != n:
        raise DataError(f"{path}: holds {y.shape[0]} labels, but the image file holds {n} images")
    if n and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels must lie in 1..10, got {y.min()}..{y.max()}")
    return torch.from_numpy(y.astype(np.int64) - 1)


def load_stl10(cfg: DataConfig) -> DatasetSplits:
    """Load STL-10 from ``cfg.root``; with ``cfg.unlabeled`` append the 100k unlabeled images.

    Args:
        cfg: data config; uses ``root``, ``image_size``, ``unlabeled``, ``max_train_samples``,
            ``split_seed``.

    Returns:
        Train (5 000 labeled images, then the unlabeled ones with label ``-1`` if requested)
        and test (8 000) splits, resized to ``image_size``.

    Raises:
        DataError: the root or a binary file is missing or malformed (the message names it).
    """
    if cfg.root is None:
        raise DataError("data.root is required for STL-10")
    base = _locate(cfg.root, cfg.unlabeled)
    s = cfg.image_size
    train_raw = _open_images(base / "train_X.bin")
    y_train = _read_labels(base / "train_y.bin", len(train_raw))
    test_raw = _open_images(base / "test_X.bin")
    y_test = _read_labels(base / "test_y.bin", len(test_raw))
    unl_raw = _open_images(base / "unlabeled_X.bin") if cfg.unlabeled else train_raw[:0]
    n_lab, n_unl = len(train_raw), len(unl_raw)
    # One allocation for labeled + unlabeled train images (a cat would double peak memory).
    x_train = torch.empty((n_lab + n_unl, 3, s, s), dtype=torch.uint8)
    resize_uint8(train_raw, s, desc="STL-10 train", out=x_train[:n_lab])
    resize_uint8(unl_raw, s, desc="STL-10 unlabeled", out=x_train[n_lab:])
    y_train = torch.cat([y_train, torch.full((n_unl,), -1, dtype=torch.int64)])
    x_test = resize_uint8(test_raw, s, desc="STL-10 test")
    name = "stl10+unlabeled" if cfg.unlabeled else "stl10"
    return build_splits(
        cfg,
        name=name,
        train=(x_train, y_train),
        test=(x_test, y_test),
        num_classes=10,
        classes=STL10_CLASSES,
    )


def _locate(root_path: str | Path, unlabeled: bool) -> Path:
    """The folder holding the binaries; every one needed must be there."""
    root = require_dir(root_path, "STL-10 root")
    base = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    if unlabeled:
        names.append("unlabeled_X.bin")
    for name in names:
        if not (base / name).is_file():
            hint = ""
            if (root / "stl10_binary.tar.gz").is_file():
                hint = f"; found {root / 'stl10_binary.tar.gz'}: extract it with tar -xzf"
            raise DataError(
                f"STL-10 file not found: {base / name} (expected the official binary format: "
                f"stl10_binary/ with {', '.join(names)}{hint})"
            )
    return base


def stl10_files(root: str | Path, unlabeled: bool) -> list[Path]:
    """The binaries the loader reads (checked to exist), image files before label files."""
    base = _locate(root, unlabeled)
    names = ["train_X.bin", "test_X.bin"] + (["unlabeled_X.bin"] if unlabeled else [])
    return [base / n for n in [*names, "train_y.bin", "test_y.bin"]]


def read_stl10(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as stored, without resizing (``contrastlab prepare-data``).

    Args:
        root: ``stl10_binary/`` or a folder containing it.
        split: ``"train"``, ``"test"`` or ``"unlabeled"`` (labels ``-1``).

    Returns:
        ``(uint8 [N, 3, 96, 96]`` lazy memory-mapped view, ``int64 [N])``.
    """
    base = _locate(root, split == "unlabeled")
    images = _open_images(base / f"{split}_X.bin")
    if split == "unlabeled":
        return images, torch.full((len(images),), -1, dtype=torch.int64)
    return images, _read_labels(base / f"{split}_y.bin", len(images))
