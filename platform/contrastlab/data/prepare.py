"""``contrastlab prepare-data SRC DST``: a dataset tree to parquet shards ``data.dataset=parquet``
loads.

Sources: an ImageFolder (``SRC/<class>/<image>``), CIFAR-10/100 (official python pickles) or
STL-10 (official binaries). Each shard ``DST/part-00000.parquet, ...`` has the columns the
parquet loader reads: ``image`` (encoded bytes) and ``label`` (int64, ``-1`` unlabeled), and
schema metadata ``contrastlab.classes`` (JSON list of class names, indexed by label),
``contrastlab.source`` and ``contrastlab.split``.

Images stay encoded: CIFAR/STL arrays as PNG (lossless: loading at their native size gives the
original pixels back), ImageFolder files as their original bytes. ``resize`` re-encodes every
image as PNG at ``resize x resize``, resized exactly as the in-memory loader would resize it
(:func:`~contrastlab.data.core.resize_uint8` for arrays, the central-square bilinear
:func:`~contrastlab.data.decode.decode_image` for files), so loading those shards at
``image_size=resize`` equals loading the source at that size. Every ImageFolder file is decoded
once on the way, so a corrupt file is reported here (with the shard and row it was bound for),
not in the middle of a sweep. ``DST`` may be a local folder or a URI (see
:mod:`contrastlab.data.fs`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from .cifar import read_cifar
from .core import DataError, parallel_map, resize_uint8
from .decode import decode_image
from .folder import index_folder
from .fs import Location, file_info, list_files, open_fs, read_bytes, storage_error
from .stl10 import STL10_CLASSES, read_stl10

FORMATS = ("auto", "imagefolder", "cifar10", "cifar100", "stl10")
SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test")}
SPLITS["stl10"] = ("train", "test", "unlabeled")
DEFAULT_ROWS_PER_SHARD = 10_000
_ARRAY_CHUNK = 1024  # arrays are resized / encoded this many images at a time


@dataclass
class Prepared:
    """What :func:`prepare_data` wrote."""

    shards: list[str]
    rows: int
    classes: tuple[str, ...]
    format: str


def detect_format(src: Path) -> str:
    """The source format of ``src`` from its files (the layouts the loaders accept)."""
    for base in (src, src / "cifar-10-batches-py", src / "cifar-100-python", src / "stl10_binary"):
        if (base / "data_batch_1").is_file():
            return "cifar10"
        if (base / "train").is_file() and (base / "test").is_file():
            return "cifar100"
        if (base / "train_X.bin").is_file():
            return "stl10"
    return "imagefolder"


def _png(img_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_hwc).save(buf, format="PNG")
    return buf.getvalue()


def _array_rows(images: torch.Tensor, labels: torch.Tensor, resize: int | None) -> Iterator:
    """``(png bytes, label)`` per image of ``uint8 [N, 3, H, W]`` arrays."""
    for lo in range(0, len(images), _ARRAY_CHUNK):
        chunk = images[lo : lo + _ARRAY_CHUNK]
        if resize is not None:
            chunk = resize_uint8(chunk, resize)
        hwc = chunk.permute(0, 2, 3, 1).contiguous().numpy()
        blobs = parallel_map(_png, list(hwc), "encoding", workers=None)
        yield from zip(blobs, labels[lo : lo + _ARRAY_CHUNK].tolist(), strict=True)


def _file_rows(
    paths: list, labels: list[int], loc: Location | None, resize: int | None, where
) -> Iterator:
    """``(bytes, label)`` per image file: its own bytes (checked to decode) or a PNG at
    ``resize``. ``where(i)`` names the shard and row image ``i`` is bound for."""

    def one(i: int) -> bytes:
        p = paths[i]
        name = str(p) if loc is None else loc.name(p)
        data = Path(p).read_bytes() if loc is None else read_bytes(loc, p)
        # decoding to a tiny size checks the whole file cheaply (JPEG decodes in draft mode)
        arr = decode_image(data, resize or 4, f"{name} (for {where(i)})")
        return _png(arr) if resize is not None else data

    blobs = parallel_map(one, range(len(paths)), "reading", total=len(paths))
    yield from zip(blobs, labels, strict=True)


def prepare_data(
    src: str | Path,
    dst: str,
    *,
    format: str = "auto",
    split: str | None = None,
    rows_per_shard: int | None = None,
    shard_mb: float | None = None,
    resize: int | None = None,
    progress: bool = True,
) -> Prepared:
    """Convert a dataset tree into parquet shards (see the module docstring).

    Args:
        src: the source folder (local).
        dst: the output folder, local or a URI (``s3://bucket/prefix``); must hold no shard.
        format: one of :data:`FORMATS`; ``auto`` recognises the official layouts.
        split: CIFAR ``train``/``test``, STL-10 ``train``/``test``/``unlabeled`` (default
            ``train``); an image folder is one split already (point ``src`` at it).
        rows_per_shard: images per shard (default :data:`DEFAULT_ROWS_PER_SHARD` unless
            ``shard_mb`` is given).
        shard_mb: instead, start a new shard once the encoded images reach this many MiB.
        resize: re-encode every image as a ``resize x resize`` PNG.
        progress: show a progress bar.

    Returns:
        The shards written (local paths or URIs), the row count and the class names.

    Raises:
        DataError: an unknown format or split, a corrupt source image (named with the shard
            and row it was bound for), a non-empty destination, or an unusable store.
    """
    if format not in FORMATS:
        raise DataError(f"--format {format!r}; allowed: {', '.join(FORMATS)}")
    if rows_per_shard is not None and shard_mb is not None:
        raise DataError("give --rows-per-shard or --shard-mb, not both")
    if (rows_per_shard is not None and rows_per_shard < 1) or (
        shard_mb is not None and shard_mb <= 0
    ):
        raise DataError("--rows-per-shard must be >= 1 and --shard-mb > 0")
    if resize is not None and resize < 1:
        raise DataError(f"--resize must be >= 1, got {resize}")
    src = Path(src).expanduser()
    if not src.is_dir():
        raise DataError(f"prepare-data source not found: {src} is not a directory")
    kind = detect_format(src) if format == "auto" else format
    if kind == "imagefolder" and split is not None:
        raise DataError(
            f"--split {split}: an image folder is a single split; point SRC at it "
            f"(e.g. {src}/train)"
        )
    if kind != "imagefolder" and (split or "train") not in SPLITS[kind]:
        raise DataError(f"--split {split!r} for {kind}; allowed: {', '.join(SPLITS[kind])}")
    split = split or "train"
    out = open_fs(dst)
    existing = [i for i in _listing(out) if i.base_name.endswith(".parquet")]
    if existing:
        raise DataError(
            f"{out.name()} already holds {len(existing)} parquet shard(s) "
            f"(e.g. {out.name(existing[0].path)}); write to an empty folder"
        )
    limit_rows = rows_per_shard or (None if shard_mb else DEFAULT_ROWS_PER_SHARD)
    limit_bytes = int(shard_mb * 2**20) if shard_mb else None

    if kind == "imagefolder":
        classes, paths, labels, loc = index_folder(str(src), "prepare-data source")
        n = len(paths)

        def where(i: int) -> str:
            if limit_rows is None:  # size-based shards: the row is known once written
                return f"row {i} of the output"
            return f"{out.name(out.child(_shard_name(i // limit_rows)))}: row {i % limit_rows}"

        rows = _file_rows(paths, labels, loc, resize, where)
    elif kind == "stl10":
        images, y = read_stl10(src, split)
        classes, n = STL10_CLASSES, len(images)
        rows = _array_rows(images, y, resize)
    else:
        x, y_np, classes = read_cifar(kind, src, split)
        n = len(x)
        rows = _array_rows(torch.from_numpy(x), torch.from_numpy(y_np), resize)

    meta = {
        b"contrastlab.classes": json.dumps(list(classes)).encode(),
        b"contrastlab.source": f"{kind}:{src}".encode(),
        b"contrastlab.split": (split if kind != "imagefolder" else "all").encode(),
    }
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())], metadata=meta)
    written: list[str] = []
    blobs: list[bytes] = []
    ys: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not blobs:
            return
        path = out.child(_shard_name(len(written)))
        table = pa.table([pa.array(blobs, pa.binary()), pa.array(ys, pa.int64())], schema=schema)
        try:
            if out.prefix == "":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, filesystem=out.fs)
        except (OSError, pa.ArrowException) as e:
            raise storage_error(out.name(path), e, "cannot write shard") from None
        written.append(out.name(path))
        blobs.clear()
        ys.clear()
        size = 0

    with tqdm(total=n, desc=f"prepare {kind}", unit="img", disable=not progress) as bar:
        for blob, label in rows:
            blobs.append(blob)
            ys.append(int(label))
            size += len(blob)
            bar.update()
            if (limit_rows and len(blobs) >= limit_rows) or (limit_bytes and size >= limit_bytes):
                flush()
        flush()
    if not written:
        raise DataError(f"{src}: no images to write")
    return Prepared(written, n, tuple(classes), kind)


def _shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _listing(loc: Location) -> list[pafs.FileInfo]:
    info = file_info(loc)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        raise DataError(f"prepare-data destination {loc.name()} is a file; give a folder")
    return list_files(loc, recursive=False)


__all__ = ["FORMATS", "Prepared", "detect_format", "prepare_data"]
