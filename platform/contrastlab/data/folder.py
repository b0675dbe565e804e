"""A directory of class folders, ``root/<class>/<image>`` (torchvision's ImageFolder layout).

Classes are the sorted names of the sub-directories of ``root`` (hidden ones skipped) and a
class's images are all files below its folder, recursively, with an image extension; other
files (READMEs, ``.DS_Store``) are ignored. The held-out split is ``test_root`` (same layout;
its classes must be a subset of ``root``'s) or else a stratified split of ``root``. Either
may be a local path or a URI (``s3://bucket/prefix``, see :mod:`contrastlab.data.fs`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.fs as pafs
import torch

from ..config import DataConfig
from .core import DataError, DatasetSplits, build_splits, parallel_map, plan_rows, require_dir
from .decode import decode_image
from .fs import Location, file_info, is_uri, list_files, not_found, open_fs, read_bytes

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


def _walk_key(parts: list[str]) -> tuple[tuple[int, str], ...]:
    """Sort key giving ``os.walk``'s order (sorted, a folder's files before its sub-folders)
    to the relative paths of a listing: the same order locally and on an object store."""
    return (*((1, d) for d in parts[:-1]), (0, parts[-1]))


def list_remote_images(
    root: Location, class_to_idx: dict[str, int] | None
) -> tuple[list[str], list[str], list[int]]:
    """:func:`find_classes` + :func:`list_images` for a folder on an object store.

    An object store has no empty folders: a class is a first-level prefix holding a file.

    Args:
        root: the root folder.
        class_to_idx: the training root's classes; None for the training root itself.

    Returns:
        ``(classes, paths, labels)``: this root's class names, and its image files (paths of
        ``root.fs``) with their labels, in the order :func:`list_images` gives locally.
    """
    base = root.path.rstrip("/") + "/"
    found: dict[str, list[tuple[tuple[tuple[int, str], ...], str]]] = {}
    for info in list_files(root, recursive=True):
        parts = info.path[len(base) :].split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue
        images = found.setdefault(parts[0], [])
        if parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            images.append((_walk_key(parts[1:]), info.path))
    classes = sorted(found)
    if not classes:
        raise DataError(
            f"{root.name()}: no class folders found (expected the layout "
            f"{root.name()}/<class>/<image>)"
        )
    class_to_idx = class_to_idx or {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for name in classes:
        where = root.name(base + name)
        if name not in class_to_idx:
            raise DataError(
                f"{where}: class folder not present in the training root "
                f"(known classes: {sorted(class_to_idx)})"
            )
        if not found[name]:
            raise DataError(
                f"{where}: class folder holds no image file "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        paths.extend(p for _, p in sorted(found[name]))
        labels.extend([class_to_idx[name]] * len(found[name]))
    return classes, paths, labels


def _remote_root(uri: str, what: str) -> Location:
    loc = open_fs(uri)
    info = file_info(loc)
    if info.type == pafs.FileType.NotFound:
        raise not_found(loc, what)
    if info.type == pafs.FileType.File:
        raise DataError(f"{what} must be a directory: {loc.name()} is a file")
    return loc


def decode_files(
    paths: Sequence[Path | str], size: int, desc: str, loc: Location | None = None
) -> torch.Tensor:
    """Decode image files (in parallel) into ``uint8 [N, 3, size, size]``.

    Args:
        paths: local files, or paths of ``loc.fs`` when ``loc`` is given.
        size: output side length.
        desc: progress bar label.
        loc: the filesystem the files are on (None: local paths).
    """

    def decode(p: Path | str) -> np.ndarray:
        if loc is None:
            return decode_image(Path(p), size, str(p))
        return decode_image(read_bytes(loc, str(p)), size, loc.name(str(p)))

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)  # HWC, as PIL hands it over
    for i, arr in enumerate(parallel_map(decode, paths, desc)):
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def index_folder(
    root: str, what: str, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], list[Path] | list[str], list[int], Location | None]:
    """Classes, image files and labels of an image folder, local or on an object store.

    Args:
        root: a local path or a URI (see :mod:`contrastlab.data.fs`).
        what: how messages name the folder (``"image folder root"``).
        class_to_idx: the training root's classes (for a test root); None for the training
            root itself.

    Returns:
        ``(classes, files, labels, loc)``: ``loc`` is None for a local folder (``files`` are
        Paths), else the :class:`~contrastlab.data.fs.Location` whose paths ``files`` are.
    """
    if is_uri(root):
        loc = _remote_root(root, what)
        classes, remote, labels = list_remote_images(loc, class_to_idx)
        return classes, remote, labels, loc
    folder = require_dir(root, what)
    classes = find_classes(folder)
    paths, labels = list_images(folder, class_to_idx or {c: i for i, c in enumerate(classes)})
    return classes, paths, labels, None


def load_image_folder(cfg: DataConfig) -> DatasetSplits:
    """Load ``root/<class>/<image>`` (and ``test_root`` if set); local paths or URIs.

    Args:
        cfg: data config; uses ``root``, ``test_root``, ``image_size``, ``test_fraction``,
            ``split_seed``, ``max_train_samples``.

    Returns:
        Train and test splits; ``num_classes`` is the number of class folders in ``root``.

    Raises:
        DataError: missing / empty directory, an unreachable store, or a file that does not
            decode (named).
    """
    if cfg.root is None:
        raise DataError("data.root is required for imagefolder")
    classes, paths, labels, loc = index_folder(cfg.root, "image folder root")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    y = np.asarray(labels, dtype=np.int64)
    s = cfg.image_size
    # with labels: false every image trains (as for parquet): no held-out split of root
    train_idx, test_idx = plan_rows(y, cfg, split=cfg.test_root is None and cfg.labels)
    name = f"imagefolder:{PurePosixPath(cfg.root.rstrip('/')).name}"
    if not cfg.labels:
        x = decode_files([paths[i] for i in train_idx], s, "decoding train", loc)
        return build_splits(cfg, name, (x, torch.from_numpy(y[train_idx])), None, len(classes))
    if test_idx is None:
        _, test_paths, test_list, test_loc = index_folder(
            cfg.test_root,  # type: ignore[arg-type]
            "image folder test_root",
            class_to_idx,
        )
        y_test = np.asarray(test_list, dtype=np.int64)
    else:
        test_paths, y_test, test_loc = [paths[i] for i in test_idx], y[test_idx], loc
    train = (
        decode_files([paths[i] for i in train_idx], s, "decoding train", loc),
        torch.from_numpy(y[train_idx]),
    )
    test = (decode_files(test_paths, s, "decoding test", test_loc), torch.from_numpy(y_test))
    return build_splits(
        cfg,
        name=name,
        train=train,
        test=test,
        num_classes=len(classes),
        classes=classes,
    )
