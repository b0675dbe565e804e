"""A directory of parquet shards holding encoded images and integer labels.

Every ``*.parquet`` file directly inside ``root`` is a shard (read in sorted name order). Each
shard needs two columns:

* ``image``: encoded image bytes (PNG, JPEG, ...), of type ``binary`` / ``large_binary``, or a
  struct with a binary ``bytes`` field (how Hugging Face ``datasets`` stores an ``Image``);
* ``label``: any integer type; ``-1`` or null marks an unlabeled row (kept for training only).
  With ``data.labels: false`` it is not read and may be absent.

Other columns are ignored. The held-out split is ``test_root`` (another such directory, whose
unlabeled rows are dropped) or else a stratified split of the labeled rows of ``root``.

Labels are read first (a cheap, column-only read) so the split and ``max_train_samples`` are
decided before any image is decoded; only the rows kept are decoded, shard by shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from ..config import DataConfig
from .core import DataError, DatasetSplits, build_splits, parallel_map, plan_rows
from .decode import decode_image
from .fs import Location, file_info, list_files, not_found, open_fs, storage_error

REQUIRED_COLUMNS = ("image", "label")


@dataclass(frozen=True)
class Shard:
    """One opened parquet shard: where it is, its labels and its image column's layout."""

    loc: Location  # the filesystem the shard is on
    path: str  # its path there
    name: str  # how messages name it: the local path or the URI
    labels: np.ndarray  # int64 [rows], -1 for unlabeled
    struct_image: bool  # image column is struct<bytes, ...> rather than plain binary


def _is_binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        # binary_view is newer than the oldest supported pyarrow
        or getattr(pa.types, "is_binary_view", lambda _: False)(t)
    )


def _open_shard(loc: Location, file: str, labeled: bool = True) -> Shard:
    """Check a shard's schema and read its labels (all -1 when not ``labeled``)."""
    path = loc.name(file)
    try:
        pf = pq.ParquetFile(file, filesystem=loc.fs)
        schema = pf.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise storage_error(path, e, "not a readable parquet file") from None
    found = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in found and (labeled or c != "label")]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found columns {found}; required columns "
            f"'image' (encoded image bytes) and 'label' (integer)"
        )
    image_t = schema.field("image").type
    struct_image = pa.types.is_struct(image_t)
    if struct_image:
        idx = image_t.get_field_index("bytes")
        if idx < 0 or not _is_binary(image_t.field(idx).type):
            raise DataError(
                f"{path}: column 'image' is {image_t}; a struct image column needs a binary "
                f"'bytes' field"
            )
    elif not _is_binary(image_t):
        raise DataError(
            f"{path}: column 'image' has type {image_t}; expected binary (encoded PNG/JPEG bytes)"
        )
    if not labeled:
        return Shard(loc, file, path, np.full(pf.metadata.num_rows, -1, np.int64), struct_image)
    label_t = schema.field("label").type
    if not pa.types.is_integer(label_t):
        raise DataError(f"{path}: column 'label' has type {label_t}; expected an integer type")
    try:
        col = pf.read(columns=["label"]).column("label")
    except (OSError, pa.ArrowException) as e:
        raise storage_error(path, e, "cannot read column 'label'") from None
    labels = col.fill_null(-1).to_numpy().astype(np.int64)
    bad = np.flatnonzero(labels < -1)
    if bad.size:
        raise DataError(
            f"{path}: row {bad[0]}: label {labels[bad[0]]} is negative "
            f"(labels are 0..K-1, or -1 / null for unlabeled)"
        )
    return Shard(loc, file, path, labels, struct_image)


def shard_files(directory: str, what: str) -> tuple[Location, list[pafs.FileInfo]]:
    """The shards of ``directory`` (a local path or URI; or one ``.parquet`` file), sorted.

    Lists only: no shard is opened. Errors name ``directory``: not found, unreachable store,
    refused credentials, missing bucket.
    """
    loc = open_fs(directory)
    info = file_info(loc)
    if info.type == pafs.FileType.NotFound:
        raise not_found(loc, what)
    if info.type == pafs.FileType.File:
        return loc, [info]
    return loc, [i for i in list_files(loc, recursive=False) if i.base_name.endswith(".parquet")]


def scan_shards(directory: str, what: str, labeled: bool = True) -> list[Shard]:
    """Every shard of ``directory`` (a local path or URI), opened: schema checked, labels read
    (all -1 when not ``labeled``)."""
    loc, files = shard_files(directory, what)
    if not files:
        raise DataError(f"{loc.name()}: no *.parquet files found in this directory ({what})")
    return [_open_shard(loc, f.path, labeled) for f in files]


def _image_bytes(shard: Shard, rows: np.ndarray) -> Iterator[tuple[bytes, str]]:
    """``(encoded bytes, "<file>: row <i>")`` for the given rows of one shard, in order."""
    if rows.size == 0:
        return
    try:
        col = pq.read_table(shard.path, columns=["image"], filesystem=shard.loc.fs).column("image")
    except (OSError, pa.ArrowException) as e:
        raise storage_error(shard.name, e, "cannot read column 'image'") from None
    col = col.take(pa.array(rows))
    if shard.struct_image:
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], col.type.field("bytes").type)
    for row, data in zip(rows.tolist(), col.to_pylist(), strict=True):
        where = f"{shard.name}: row {row}"
        if data is None:
            raise DataError(f"{where}: image bytes are null")
        yield data, where


def decode_rows(shards: list[Shard], index: np.ndarray, size: int, desc: str) -> torch.Tensor:
    """Decode the rows ``index`` (global, sorted) of the concatenated shards."""
    offsets = np.cumsum([0] + [len(s.labels) for s in shards])

    def items() -> Iterator[tuple[bytes, str]]:
        for k, shard in enumerate(shards):
            lo, hi = np.searchsorted(index, offsets[k : k + 2])
            yield from _image_bytes(shard, index[lo:hi] - offsets[k])

    out = np.empty((len(index), size, size, 3), dtype=np.uint8)  # HWC, as PIL hands it over
    decoded = parallel_map(lambda it: decode_image(it[0], size, it[1]), items(), desc, len(index))
    for i, arr in enumerate(decoded):
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_parquet(cfg: DataConfig) -> DatasetSplits:
    """Load parquet shards from ``cfg.root`` (and ``cfg.test_root`` if set).

    Args:
        cfg: data config; uses ``root``, ``test_root``, ``image_size``, ``test_fraction``,
            ``split_seed``, ``max_train_samples``.

    Returns:
        Train and test splits; ``num_classes`` is the largest label (over both) + 1.

    Raises:
        DataError: naming the shard (and row) that is missing, malformed or undecodable.
    """
    if cfg.root is None:
        raise DataError("data.root is required for parquet")
    shards = scan_shards(cfg.root, "parquet root", cfg.labels)
    labels = np.concatenate([s.labels for s in shards])
    train_idx, test_idx = plan_rows(labels, cfg, split=cfg.test_root is None and cfg.labels)
    name = f"parquet:{PurePosixPath(cfg.root.rstrip('/')).name}"
    if not cfg.labels:  # train on the images alone; no labeled evaluation from these shards
        x = decode_rows(shards, train_idx, cfg.image_size, "decoding train")
        return build_splits(cfg, name, (x, torch.from_numpy(labels[train_idx])), None, 0)
    if test_idx is None:
        test_shards = scan_shards(cfg.test_root, "parquet test_root")  # type: ignore[arg-type]
        test_labels = np.concatenate([s.labels for s in test_shards])
        test_idx = np.flatnonzero(test_labels >= 0)  # evaluation needs labels
    else:
        test_shards, test_labels = shards, labels
    all_labels = np.concatenate([labels, test_labels[test_idx]])
    if not (all_labels >= 0).any():
        raise DataError(
            f"{cfg.root}: no labeled rows (every label is -1 or null); to train on unlabeled "
            "images set data.labels: false (and data.eval_root for a labeled evaluation set)"
        )
    if test_idx.size == 0:
        where = cfg.test_root or cfg.root
        raise DataError(f"{where}: no labeled rows for the test split")
    s = cfg.image_size
    train = (
        decode_rows(shards, train_idx, s, "decoding train"),
        torch.from_numpy(labels[train_idx]),
    )
    test = (
        decode_rows(test_shards, test_idx, s, "decoding test"),
        torch.from_numpy(test_labels[test_idx]),
    )
    return build_splits(
        cfg,
        name=name,
        train=train,
        test=test,
        num_classes=int(all_labels.max()) + 1,
    )
