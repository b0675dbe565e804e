"""Which data a run trained and evaluated on: a source URI, a digest and a row count per split.

The digest is cheap to compute and changes when the data does:

* ``imagefolder`` / ``parquet``: sha256 over the sorted list of files (image files of the
  class folders, or the ``*.parquet`` shards) with each file's path relative to the root, size
  and modification time (on an object store: its LastModified). Editing, adding, removing or
  re-uploading a file changes it; contents are not read. Rows: the image files, or the shards'
  row counts from their parquet footers.
* ``cifar10`` / ``cifar100`` / ``stl10``: sha256 of the bytes of the files the loader reads
  (CIFAR batches; STL-10 ``*_X.bin``/``*_y.bin``, with ``unlabeled_X.bin`` when
  ``data.unlabeled``). Rows: STL-10 from the file sizes; CIFAR's are not counted (that needs
  unpickling), the official 50 000 / 10 000 unless the files were replaced.
* ``digits``: sha256 of the pixel and label arrays scikit-learn ships.

Loader settings (``image_size``, ``split_seed``, ``max_train_samples``) are not part of the
digest: they are params of the run already.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import DataConfig
from .core import DataError, require_dir
from .fs import Location, is_uri, list_files, not_found, open_fs, storage_error

TRAINING, EVALUATION = "training", "evaluation"
"""MLflow's dataset contexts (the ``mlflow.data.context`` input tag)."""


@dataclass(frozen=True)
class DataSource:
    """One dataset input of a run.

    Attributes:
        name: ``"<dataset>:<folder name>"`` or the dataset's name.
        source: where it is: a local path or URI.
        digest: see the module docstring (16 hex characters).
        rows: images in the source, when known cheaply.
        context: :data:`TRAINING` or :data:`EVALUATION`.
    """

    name: str
    source: str
    digest: str
    rows: int | None
    context: str


def _listing_digest(loc: Location, files: list[pafs.FileInfo]) -> str:
    h = hashlib.sha256()
    base = loc.path.rstrip("/") + "/"
    for f in files:
        rel = f.path[len(base) :] if f.path.startswith(base) else f.base_name
        mtime = f.mtime_ns if f.mtime_ns is not None else -1
        h.update(f"{rel}\0{f.size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def _folder(root: str, what: str) -> tuple[str, int]:
    from .folder import IMAGE_EXTENSIONS

    loc = open_fs(root)
    if not is_uri(root):
        require_dir(root, what)
    elif loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
        raise not_found(loc, what)
    base = loc.path.rstrip("/") + "/"
    files = [
        f
        for f in list_files(loc, recursive=True)
        if f.base_name.lower().endswith(IMAGE_EXTENSIONS)
        and not any(p.startswith(".") for p in f.path[len(base) :].split("/"))
    ]
    return _listing_digest(loc, files), len(files)


def _shards(root: str, what: str) -> tuple[str, int]:
    from .parquet import shard_files

    loc, files = shard_files(root, what)
    rows = 0
    for f in files:
        try:
            rows += pq.ParquetFile(f.path, filesystem=loc.fs).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise storage_error(loc.name(f.path), e, "not a readable parquet file") from None
    return _listing_digest(loc, files), rows


def data_sources(cfg: DataConfig) -> list[DataSource]:
    """The dataset inputs of a run of ``cfg``: the training root, and ``test_root`` if set.

    Raises:
        DataError: a root that cannot be listed (missing, unreachable, refused).
    """
    ds = cfg.dataset
    if ds == "digits":
        from .digits import read_digits

        pixels, target = read_digits()
        h = hashlib.sha256(pixels.tobytes() + target.tobytes()).hexdigest()[:16]
        return [DataSource("digits", "sklearn:digits", h, len(target), TRAINING)]
    if cfg.root is None:
        raise DataError(f"data.root is required for {ds}")
    if ds in ("cifar10", "cifar100"):
        from .cifar import cifar_files

        digest = _file_digest(cifar_files(ds, cfg.root))
        return [DataSource(ds, str(cfg.root), digest, None, TRAINING)]
    if ds == "stl10":
        from .stl10 import STL10_IMAGE_BYTES, stl10_files

        files = stl10_files(cfg.root, cfg.unlabeled)
        rows = sum(p.stat().st_size for p in files if p.name.endswith("_X.bin"))
        name = "stl10+unlabeled" if cfg.unlabeled else "stl10"
        digest = _file_digest(files)
        return [DataSource(name, str(cfg.root), digest, rows // STL10_IMAGE_BYTES, TRAINING)]
    scan = _folder if ds == "imagefolder" else _shards
    what = "image folder" if ds == "imagefolder" else "parquet"
    out = []
    for root, context, label in ((cfg.root, TRAINING, "root"), (cfg.test_root, EVALUATION, "")):
        if root is None:
            continue
        digest, rows = scan(root, f"{what} {label or 'test_root'}")
        folder = root.rstrip("/").rsplit("/", 1)[-1]
        out.append(DataSource(f"{ds}:{folder}", root, digest, rows, context))
    return out


def mlflow_inputs(sources: list[DataSource]) -> list:
    """The sources as MLflow ``DatasetInput`` entities (what ``mlflow.log_input`` sends)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = []
    for s in sources:
        scheme = s.source.split("://", 1)[0] if "://" in s.source else "local"
        entity = Dataset(
            name=s.name,
            digest=s.digest,
            source_type=scheme,
            source=json.dumps({"uri": s.source}),
            profile=json.dumps({"num_rows": s.rows}),
        )
        out.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, s.context)]))
    return out


__all__ = ["EVALUATION", "TRAINING", "DataSource", "data_sources", "mlflow_inputs"]
