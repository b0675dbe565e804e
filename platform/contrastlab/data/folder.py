"""A directory of class folders, ``root/<class>/<image>`` (torchvision's ImageFolder layout).

Classes are the sorted names of the sub-directories of ``root`` (hidden ones skipped) and a
class's images are all files below its folder, recursively, with an image extension; other
files (READMEs, ``.DS_Store``) are ignored. The held-out split is ``test_root`` (same layout;
its classes must be a subset of ``root``'s) or else a stratified split of ``root``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .core import DataError, DatasetSplits, build_splits, parallel_map, plan_rows, require_dir
from .decode import decode_image

#: File extensions read as images (lower-case), as torchvision's ImageFolder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(root: Path) -> list[str]:
    """Sorted class folder names under ``root``.

    Raises:
        DataError: ``root`` has no (non-hidden) sub-directory.
    """
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root}: no class folders found (expected the layout {root}/<class>/<image>)"
        )
    return classes


def list_images(root: Path, class_to_idx: dict[str, int]) -> tuple[list[Path], list[int]]:
    """Image files and labels under ``root/<class>/`` for every class folder found in ``root``.

    Raises:
        DataError: a class folder of ``root`` is not in ``class_to_idx``, or holds no image.
    """
    paths: list[Path] = []
    labels: list[int] = []
    for name in find_classes(root):
        if name not in class_to_idx:
            raise DataError(
                f"{root / name}: class folder not present in the training root "
                f"(known classes: {sorted(class_to_idx)})"
            )
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(
                Path(dirpath) / f
                for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            )
        if not found:
            raise DataError(
                f"{root / name}: class folder holds no image file "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        paths.extend(found)
        labels.extend([class_to_idx[name]] * len(found))
    return paths, labels


def decode_files(paths: list[Path], size: int, desc: str) -> torch.Tensor:
    """Decode image files (in parallel) into ``uint8 [N, 3, size, size]``."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)  # HWC, as PIL hands it over
    for i, arr in enumerate(parallel_map(lambda p: decode_image(p, size, str(p)), paths, desc)):
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_image_folder(cfg: DataConfig) -> DatasetSplits:
    """Load ``root/<class>/<image>`` (and ``test_root`` if set).

    Args:
        cfg: data config; uses ``root``, ``test_root``, ``image_size``, ``test_fraction``,
            ``split_seed``, ``max_train_samples``.

    Returns:
        Train and test splits; ``num_classes`` is the number of class folders in ``root``.

    Raises:
        DataError: missing / empty directory, or a file that does not decode (named).
    """
    if cfg.root is None:
        raise DataError("data.root is required for imagefolder")
    root = require_dir(cfg.root, "image folder root")
    classes = find_classes(root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    paths, labels = list_images(root, class_to_idx)
    y = np.asarray(labels, dtype=np.int64)
    s = cfg.image_size
    train_idx, test_idx = plan_rows(y, cfg, split=cfg.test_root is None)
    if test_idx is None:
        test_dir = require_dir(cfg.test_root, "image folder test_root")  # type: ignore[arg-type]
        test_paths, test_list = list_images(test_dir, class_to_idx)
        y_test = np.asarray(test_list, dtype=np.int64)
    else:
        test_paths, y_test = [paths[i] for i in test_idx], y[test_idx]
    train = (
        decode_files([paths[i] for i in train_idx], s, "decoding train"),
        torch.from_numpy(y[train_idx]),
    )
    test = (decode_files(test_paths, s, "decoding test"), torch.from_numpy(y_test))
    return build_splits(
        cfg,
        name=f"imagefolder:{root.name}",
        train=train,
        test=test,
        num_classes=len(classes),
        classes=classes,
    )
