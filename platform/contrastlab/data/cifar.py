"""CIFAR-10 / CIFAR-100 in the official "python version" format.

Layout (``root`` is the extracted folder itself or contains it)::

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, [batches.meta]
    cifar-100-python/     train, test, [meta]

Each batch is a pickled dict with ``b"data"``: ``uint8 [N, 3072]`` (one row per image,
channel-major: 1024 red, then 1024 green, then 1024 blue values, each a row-major 32x32 plane)
and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

Security: these files are pickles, and unpickling runs code named in the file. Only point
``root`` at files you trust (e.g. the official archives). As a safeguard the files are read
with a restricted unpickler that resolves only the few globals a numpy array needs
(``numpy`` array/dtype reconstruction and ``_codecs.encode``); any other global (``os.system``,
``builtins.eval``, ...) is refused with a :class:`DataError` before it can run.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from .core import DataError, DatasetSplits, build_splits, require_dir, resize_uint8

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str  # name of the extracted folder
    archive: str  # name of the official download, to hint "extract it"
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    meta_file: str
    names_key: bytes


_SPECS = {
    "cifar10": _CifarSpec(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        meta_file="batches.meta",
        names_key=b"label_names",
    ),
    "cifar100": _CifarSpec(
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        meta_file="meta",
        names_key=b"fine_label_names",
    ),
}

# numpy >= 2 renamed numpy.core to numpy._core; old pickles name the former, new ones the
# latter. Both are accepted and mapped to the installed name (no deprecation shim involved).
_NP_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),  # ndarray.__reduce__, protocol <= 4
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # ndarray.__reduce_ex__, protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes objects at protocol 2
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild plain numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}' (only numpy arrays are allowed)"
            )
        if module.startswith(("numpy.core.", "numpy._core.")):
            module = _NP_CORE + module[module.index(".", len("numpy.")) :]
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a CIFAR python-format batch ({e})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(
            f"{path}: cannot unpickle a CIFAR python-format batch ({type(e).__name__}: {e})"
        ) from None


def _get(d: dict[Any, Any], key: bytes) -> Any:
    # Official files have bytes keys; accept str keys from files re-pickled under Python 3.
    return d[key] if key in d else d.get(key.decode())


def _read_batch(path: Path, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (``uint8 [N, 3, 32, 32]``, ``int64 [N]``)."""
    d = _unpickle(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    data, labels = _get(d, b"data"), _get(d, spec.label_key)
    key = spec.label_key.decode()
    if data is None or labels is None:
        found = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise DataError(f"{path}: expected keys 'data' and '{key}', found {found}")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise DataError(f"{path}: 'data' must be a uint8 [N, 3072] array")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be [N, 3072], got {list(data.shape)}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{key}' must hold {data.shape[0]} integers")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{path}: '{key}' values must lie in 0..{spec.num_classes - 1}, "
            f"got {labels.min()}..{labels.max()}"
        )
    # Channel-major rows: a reshape (no copy) gives [N, C, H, W] directly.
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(base: Path, spec: _CifarSpec) -> tuple[str, ...]:
    """Names from the meta file when readable, else the known CIFAR-10 names / numbers."""
    default = CIFAR10_CLASSES if spec.num_classes == 10 else ()
    path = base / spec.meta_file
    if not path.is_file():
        return default
    try:
        meta = _unpickle(path)
        names = _get(meta, spec.names_key) if isinstance(meta, dict) else None
    except DataError:
        return default
    if not isinstance(names, list) or len(names) != spec.num_classes:
        return default
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _read_split(
    base: Path, files: tuple[str, ...], spec: _CifarSpec, size: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(_read_batch(base / f, spec) for f in files), strict=True)
    images = torch.from_numpy(np.concatenate(xs))
    return resize_uint8(images, size, desc=desc), torch.from_numpy(np.concatenate(ys))


def load_cifar(cfg: DataConfig) -> DatasetSplits:
    """Load CIFAR-10 or CIFAR-100 (``cfg.dataset``) from ``cfg.root``; official test split.

    Args:
        cfg: data config; uses ``dataset``, ``root``, ``image_size``, ``max_train_samples``,
            ``split_seed``.

    Returns:
        Train (50 000 images) and test (10 000) splits, resized to ``image_size``.

    Raises:
        DataError: the root or a batch file is missing or malformed (the message names it).
    """
    spec = _SPECS[cfg.dataset]
    if cfg.root is None:
        raise DataError(f"data.root is required for {spec.title}")
    base = _locate(spec, cfg.root)
    s = cfg.image_size
    train = _read_split(base, spec.train_files, spec, s, f"{spec.title} train")
    test = _read_split(base, spec.test_files, spec, s, f"{spec.title} test")
    return build_splits(
        cfg,
        name=cfg.dataset,
        train=train,
        test=test,
        num_classes=spec.num_classes,
        classes=_class_names(base, spec),
    )


def read_cifar(
    dataset: str, root: str | Path, split: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One official split as stored, without resizing (``contrastlab prepare-data``).

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        root: the extracted folder, or a folder containing it.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(uint8 [N, 3, 32, 32], int64 [N], class names)``.
    """
    spec = _SPECS[dataset]
    base = _locate(spec, root)
    files = {"train": spec.train_files, "test": spec.test_files}[split]
    xs, ys = zip(*(_read_batch(base / f, spec) for f in files), strict=True)
    return np.concatenate(xs), np.concatenate(ys), _class_names(base, spec)


def cifar_files(dataset: str, root: str | Path) -> list[Path]:
    """The batch files the loader reads for ``dataset`` under ``root`` (checked to exist)."""
    spec = _SPECS[dataset]
    base = _locate(spec, root)
    return [base / f for f in spec.train_files + spec.test_files]


def _locate(spec: _CifarSpec, root_path: str | Path) -> Path:
    """The folder holding the batch files; every one of them must be there."""
    root = require_dir(root_path, f"{spec.title} root")
    base = root / spec.folder if (root / spec.folder).is_dir() else root
    for name in spec.train_files + spec.test_files:
        path = base / name
        if not path.is_file():
            hint = ""
            if (root / spec.archive).is_file():
                hint = f"; found {root / spec.archive}: extract it with tar -xzf"
            raise DataError(
                f"{spec.title} batch file not found: {path} (expected the official python "
                f"version: {spec.folder}/ with {', '.join(spec.train_files + spec.test_files)}"
                f"{hint})"
            )
    return base
