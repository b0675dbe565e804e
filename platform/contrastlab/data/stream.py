"""Training images streamed from parquet shards or an image folder with Ray Data, for sets too
large to hold.

Each epoch, every worker builds a Ray Data pipeline of its own rows: ``from_items`` of decode
tasks (row positions), ``map_batches`` reading those rows (a shard's row groups with pyarrow,
or an image folder's files) and decoding them with PIL on CPU workers (any node of the
cluster with free CPUs; each task holds ``data.stream_task_cpus``), consumed with
``iter_torch_batches`` as ``uint8 [B, 3, S, S]`` + labels + row positions; the batched device
augmentation then runs as for in-memory data.

Ray Data's own ``read_parquet`` / ``read_images`` give no row position, and a dataset split by
``streaming_split`` / ``ray.train.get_dataset_shard`` hands rows to workers as they ask, so
the order would depend on timing. Here the epoch order is computed from ``(seed, epoch)``
alone (:func:`epoch_order`) and shared out like the in-memory order (each worker its slice of
every global batch, :func:`worker_positions`), so a resumed run sees what the uninterrupted one
saw and every image appears once per epoch across workers. Inside a multi-worker
``TorchTrainer`` trial each Train worker runs its own pipeline this way, on the cluster's Ray.

The kNN / label-free monitors' fixed subsets are decoded once into memory
(:func:`monitor_splits`); the augmentation's mean/std come from that pool of training images.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..config import DataConfig, EvalConfig
from .core import DataError, DatasetSplits, ImageDataset, channel_stats, plan_rows
from .decode import decode_image

# the listings and the decoders are the parquet and folder loaders': one reading of each format
from .folder import decode_files, index_folder
from .fs import Location, is_uri, open_fs, read_bytes
from .parquet import Shard, decode_rows, scan_shards


def decoded_gb(n: int, size: int) -> float:
    """Decoded size of ``n`` uint8 RGB images of ``size`` px, in GB (1e9 bytes)."""
    return n * 3 * size * size / 1e9


@dataclass(frozen=True)
class StreamPlan:
    """What a worker needs to read its rows: picklable, no decoded pixels.

    A parquet plan's files are shards of many rows; an image folder's are one image each.

    Attributes:
        kind: ``"parquet"`` or ``"imagefolder"``.
        root: ``data.root``, the local path or URI the files' filesystem is opened from.
        paths: the files, as paths of that filesystem: shards in name order, or every image
            of the folder in its listing order.
        struct_image: per shard, whether ``image`` is a struct with a ``bytes`` field
            (empty for a folder).
        offsets: ``int64 [files + 1]`` global row offset of each file.
        rows: ``int64 [n]`` global row of each training position (after split / truncation).
        labels: ``int64 [n]`` label of each training position (-1 unlabeled).
        size: output side length.
    """

    kind: str
    root: str
    paths: tuple[str, ...]
    struct_image: tuple[bool, ...]
    offsets: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    size: int

    def __len__(self) -> int:
        return len(self.rows)

    def locate(self, position: int) -> tuple[int, int]:
        """``(file, row inside it)`` of a training position."""
        row = int(self.rows[position])
        k = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return k, row - int(self.offsets[k])

    def where(self, position: int) -> str:
        """How messages name a training position: ``"<shard>: row <i>"``, or the image file."""
        k, local = self.locate(position)
        name = open_fs(self.root).name(self.paths[k])  # as the user wrote it (s3://...)
        return name if self.kind == "imagefolder" else f"{name}: row {local}"


@dataclass(frozen=True)
class Listing:
    """One root's rows, listed (labels read, nothing decoded).

    Attributes:
        kind: ``"parquet"`` or ``"imagefolder"``.
        labels: ``int64 [rows]``, -1 where unlabeled.
        loc: the root's filesystem.
        paths: shard files or image files, as paths of ``loc.fs``.
        offsets: ``int64 [files + 1]`` global row offset of each file.
        shards: the opened shards (parquet), for decoding rows on this process.
        classes: the class folders (image folder); empty for parquet.
    """

    kind: str
    labels: np.ndarray
    loc: Location
    paths: tuple[str, ...]
    offsets: np.ndarray
    shards: tuple[Shard, ...] = ()
    classes: tuple[str, ...] = ()

    def decode(self, rows: np.ndarray, size: int, desc: str) -> torch.Tensor:
        """``uint8 [len(rows), 3, size, size]``: the rows (sorted) decoded here, in parallel."""
        if self.kind == "parquet":
            return decode_rows(list(self.shards), rows, size, desc)
        files = [self.paths[i] for i in rows.tolist()]
        return decode_files(files, size, desc, None if self.loc.prefix == "" else self.loc)


#: How messages name each kind of root (``"image folder test_root"``), as the loaders do.
_KIND_NAMES = {"parquet": "parquet", "imagefolder": "image folder"}


def list_rows(
    root: str, kind: str, key: str, labeled: bool = True, classes: tuple[str, ...] = ()
) -> Listing:
    """The :class:`Listing` of a parquet directory or an image folder (local path or URI).

    Args:
        root: the directory.
        kind: ``"parquet"`` or ``"imagefolder"``.
        key: the config key it came from (``"root"``, ``"test_root"``), for messages.
        labeled: read labels (parquet: the ``label`` column; a folder: its class folders);
            False: every row -1.
        classes: a test root's training classes (image folder), which its folders must be
            among; empty for a training root.
    """
    what = f"{_KIND_NAMES[kind]} {key}"
    if kind == "parquet":
        shards = scan_shards(root, what, labeled)
        return Listing(
            kind,
            np.concatenate([sh.labels for sh in shards]),
            shards[0].loc,
            tuple(sh.path for sh in shards),
            np.cumsum([0] + [len(sh.labels) for sh in shards]).astype(np.int64),
            shards=tuple(shards),
        )
    class_to_idx = {c: i for i, c in enumerate(classes)} if classes else None
    found, files, labels, loc = index_folder(root, what, class_to_idx)
    fs_loc = loc if loc is not None else open_fs(root)
    y = np.asarray(labels, dtype=np.int64) if labeled else np.full(len(files), -1, np.int64)
    return Listing(
        kind,
        y,
        fs_loc,
        tuple(str(f) for f in files),
        np.arange(len(files) + 1, dtype=np.int64),
        classes=tuple(classes or found),
    )


class Scan(NamedTuple):
    """``data.root`` listed once, and the rows the config trains and holds out."""

    listing: Listing
    train_idx: np.ndarray
    test_idx: np.ndarray | None  # None: the held-out split is test_root's (or none)


def scan(cfg: DataConfig) -> Scan:
    """``cfg.root``'s listing and its train / held-out rows (no decoding). A run lists its
    root once and hands the :class:`Scan` to :func:`plan` and :func:`monitor_splits`."""
    if cfg.root is None:
        raise DataError(f"data.root is required for {cfg.dataset}")
    listed = list_rows(cfg.root, cfg.dataset, "root", cfg.labels)
    train_idx, test_idx = plan_rows(listed.labels, cfg, split=cfg.test_root is None and cfg.labels)
    return Scan(listed, train_idx, test_idx)


def plan(cfg: DataConfig, scanned: Scan | None = None) -> StreamPlan:
    """The :class:`StreamPlan` of ``cfg``'s training rows (from ``scanned``, else listed)."""
    listed, train_idx, _ = scanned or scan(cfg)
    local = listed.loc.prefix == "" and not is_uri(str(cfg.root))
    # a local root is made absolute: decode tasks may run in another working directory
    return StreamPlan(
        kind=listed.kind,
        root=os.path.abspath(listed.loc.path) if local else str(cfg.root),
        paths=tuple(os.path.abspath(p) for p in listed.paths) if local else listed.paths,
        struct_image=tuple(sh.struct_image for sh in listed.shards),
        offsets=listed.offsets,
        rows=train_idx,
        labels=listed.labels[train_idx],
        size=cfg.image_size,
    )


# --------------------------------------------------------------------------- the order


def epoch_order(n: int, seed: int, epoch: int, chunk_rows: int, task_chunks: int) -> np.ndarray:
    """The epoch's order of the ``n`` training positions, from ``(seed, epoch)`` alone.

    Chunks of ``chunk_rows`` consecutive positions are permuted, then the positions inside each
    run of ``task_chunks`` chunks are shuffled together: reads stay chunk-sized while a batch
    draws from ``task_chunks`` places of the dataset.

    Returns:
        ``int64 [n]``, a permutation of ``range(n)``.
    """
    rng = np.random.default_rng([seed, epoch, 2])
    starts = rng.permutation(math.ceil(n / chunk_rows)) * chunk_rows
    order = np.concatenate([np.arange(s, min(s + chunk_rows, n)) for s in starts])
    group = chunk_rows * task_chunks
    for lo in range(0, n, group):
        order[lo : lo + group] = rng.permutation(order[lo : lo + group])
    return order.astype(np.int64)


def worker_positions(
    order: np.ndarray, batch_size: int, rank: int, world: int, steps: int
) -> np.ndarray:
    """The positions worker ``rank`` of ``world`` trains on, in order: its contiguous slice of
    each of the ``steps`` global batches of ``order`` (as the in-memory path shares them)."""
    local = batch_size // world
    batches = order[: steps * batch_size].reshape(steps, world, local)
    return batches[:, rank].reshape(-1)


# --------------------------------------------------------------------------- decode tasks


def _read_rows(plan: StreamPlan, loc: Location, k: int, local: np.ndarray) -> list[bytes | None]:
    """Encoded bytes of the rows ``local`` (sorted) of file ``k``: a shard's rows, reading
    only their row groups, or an image file's content (None when it cannot be read)."""
    path = plan.paths[k]
    if plan.kind == "imagefolder":
        try:
            return [read_bytes(loc, path)] * len(local)
        except DataError:
            return [None] * len(local)
    pf = pq.ParquetFile(path, filesystem=loc.fs)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    groups = np.unique(np.searchsorted(starts, local, side="right") - 1)
    col = pf.read_row_groups(groups.tolist(), columns=["image"]).column("image")
    # rows of the groups read, renumbered from the first group read
    first = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
    col = col.take(pa.array(np.searchsorted(first, local)))
    if plan.struct_image[k]:
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], col.type.field("bytes").type)
    return col.to_pylist()


def decode_task(batch: dict[str, np.ndarray], plan: StreamPlan) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: decode the positions of one task, in their order.

    A row that fails to decode comes back with ``ok`` 0 and a zero image; the consumer stops
    or counts it (``data.decode_errors``), so no failure passes silently.

    Returns:
        ``image uint8 [m, 3, S, S]``, ``label``, ``index`` (training position), ``ok`` (1/0).
    """
    pos = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in batch["pos"]])
    rows = plan.rows[pos]
    shard = np.searchsorted(plan.offsets, rows, side="right") - 1
    loc = open_fs(plan.root)  # once per task: a local disk, or a store's client
    data: list[bytes | None] = [None] * len(pos)
    for k in np.unique(shard):
        sel = np.flatnonzero(shard == k)
        local = rows[sel] - plan.offsets[k]
        ordered = np.argsort(local, kind="stable")
        got = _read_rows(plan, loc, int(k), local[ordered])
        for j, b in zip(sel[ordered], got, strict=True):
            data[j] = b
    s = plan.size
    images = np.zeros((len(pos), s, s, 3), np.uint8)
    ok = np.ones(len(pos), np.uint8)
    for j, b in enumerate(data):
        try:
            if b is None:
                raise DataError("image bytes are null")
            images[j] = decode_image(b, s, "")
        except DataError:
            ok[j] = 0
    return {
        "image": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
        "label": plan.labels[pos],
        "index": pos,
        "ok": ok,
    }


def ensure_ray(object_store_mb: int) -> None:
    """Join the Ray named by ``$RAY_ADDRESS``, else start a local Ray (bounded object store),
    when this process is not connected to one yet, and say so."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        print(
            f"contrastlab: data.source=stream decodes on the Ray at {address} (RAY_ADDRESS)",
            file=sys.stderr,
        )
        return
    ray.init(
        num_cpus=os.cpu_count(),
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    print(
        f"contrastlab: data.source=stream started a local Ray ({os.cpu_count()} CPUs, "
        f"{object_store_mb} MB object store) to decode the training images",
        file=sys.stderr,
    )


class StreamBatches:
    """This worker's training batches of an epoch, streamed through Ray Data.

    Args:
        plan: the training rows.
        cfg: data config (chunking, ``decode_errors``, object store size).
        seed: the run's seed: with the epoch it fixes the order.
        batch_size: the global batch; ``world`` workers each take ``batch_size // world``.
        rank: this worker.
        world: the number of workers.
        device: where the batches go.
    """

    def __init__(
        self,
        plan: StreamPlan,
        cfg: DataConfig,
        seed: int,
        batch_size: int,
        rank: int,
        world: int,
        device: torch.device,
    ) -> None:
        if cfg.decode_errors == "skip" and world > 1:
            raise DataError(
                "data.decode_errors='skip' changes a worker's batch count; with "
                f"{world} workers use 'stop' (workers step together)"
            )
        self.plan, self.cfg, self.seed = plan, cfg, seed
        self.batch_size, self.rank, self.world, self.device = batch_size, rank, world, device
        self.local = batch_size // world
        self.skipped = 0  # rows left out by decode_errors='skip', over the run
        ensure_ray(cfg.stream_object_store_mb)
        # Ray Data logs three INFO lines per epoch's pipeline between our progress lines: on
        # the console only its warnings and errors show; its file log in the Ray session's
        # folder keeps everything. (Importing ray.data configures its logging: import first.)
        import ray.data  # noqa: F401

        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)

    def __len__(self) -> int:
        return len(self.plan)

    def positions(self, epoch: int, steps: int) -> np.ndarray:
        """This worker's training positions in epoch ``epoch`` (0-based), in order."""
        c = self.cfg
        order = epoch_order(
            len(self.plan), self.seed, epoch, c.stream_chunk_rows, c.stream_task_chunks
        )
        return worker_positions(order, self.batch_size, self.rank, self.world, steps)

    def dataset(self, positions: np.ndarray):  # -> ray.data.Dataset
        """The Ray Data pipeline decoding ``positions`` in order."""
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the order is ours, not the scheduler's
        ctx.enable_progress_bars = False
        task = self.cfg.stream_chunk_rows * self.cfg.stream_task_chunks
        items = [{"pos": positions[lo : lo + task]} for lo in range(0, len(positions), task)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(
            decode_task,
            batch_size=1,
            num_cpus=self.cfg.stream_task_cpus,
            fn_kwargs={"plan": self.plan},
        )

    def epoch(
        self, epoch: int, steps: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(uint8 [b, 3, S, S], int64 [b] labels, int64 [b] positions)`` on the device, the
        epoch's ``steps`` batches of this worker (fewer rows at the end when rows were
        skipped)."""
        pending: list[dict[str, torch.Tensor]] = []
        held = 0
        skipped: list[str] = []
        ds = self.dataset(self.positions(epoch, steps))
        for b in ds.iter_torch_batches(batch_size=self.local, device="cpu"):
            bad = b["ok"] == 0
            if bool(bad.any()):
                for p in b["index"][bad].tolist():
                    where = self.plan.where(p)
                    if self.cfg.decode_errors == "stop":
                        raise DataError(
                            f"{self._why(p, where)}; data.decode_errors='skip' would "
                            "leave it out and count it"
                        )
                    skipped.append(where)
                b = {k: v[~bad] for k, v in b.items()}
            pending.append(b)
            held += len(b["index"])
            while held >= self.local:
                batch, pending, held = _take(pending, self.local)
                yield self._to_device(batch)
        if held:
            batch, pending, held = _take(pending, held)
            yield self._to_device(batch)
        if skipped:
            self.skipped += len(skipped)
            # printed, not warnings.warn: Ray Data's batch-formatting thread sets the process'
            # warning filters to "ignore" while it converts a batch, which can swallow a
            # warning raised meanwhile in this thread (seen once in the suite)
            print(
                f"contrastlab: {len(skipped)} image(s) failed to decode in epoch {epoch + 1} "
                f"and were left out (data.decode_errors='skip'; decode_skipped in the "
                f"metrics): {'; '.join(skipped[:5])}",
                file=sys.stderr,
                flush=True,
            )

    def _why(self, position: int, where: str) -> str:
        """The reader's or decoder's own message for a failed row (read again, here)."""
        k, local = self.plan.locate(position)
        loc = open_fs(self.plan.root)
        if self.plan.kind == "imagefolder":
            try:
                data: bytes | None = read_bytes(loc, self.plan.paths[k])
            except DataError as e:
                return str(e)
        else:
            (data,) = _read_rows(self.plan, loc, k, np.array([local]))
        if data is None:
            return f"{where}: image bytes are null"
        try:
            decode_image(data, self.plan.size, where)
        except DataError as e:
            return str(e)
        return f"{where}: cannot decode image"

    def _to_device(
        self, b: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.device
        return (
            b["image"].to(d, non_blocking=True),
            b["label"].to(d, torch.int64),
            b["index"].to(d, torch.int64),
        )


def _take(
    pending: list[dict[str, torch.Tensor]], n: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], int]:
    """The first ``n`` rows of the pending pieces, and what is left."""
    whole = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
    rest = {k: v[n:] for k, v in whole.items()}
    left = len(rest["index"])
    return {k: v[:n] for k, v in whole.items()}, ([rest] if left else []), left


# --------------------------------------------------------------------------- monitors


def monitor_splits(cfg: DataConfig, ev: EvalConfig, scanned: Scan | None = None) -> DatasetSplits:
    """The monitors' images, decoded once into memory while training streams.

    The pool of training images is a fixed subset (seed 0) of ``eval.monitor_train_size``
    labeled rows (plus ``eval.monitor_test_size`` with ``data.labels: false``, where the
    label-free monitors split it); the held-out queries a fixed ``eval.monitor_test_size``
    subset of the held-out split (``test_root`` or the split of ``root``). 0 = all rows. The
    pool's mean/std are the augmentation's. ``knn_full_*`` is then the same set, not reported.
    ``scanned``: ``cfg``'s :func:`scan`, when the caller has it already.
    """
    listed, train_idx, test_idx = scanned or scan(cfg)
    labels = listed.labels
    s = cfg.image_size
    labeled = cfg.labels
    train_labels = labels[train_idx]
    candidates = np.flatnonzero(train_labels >= 0) if labeled else np.arange(len(train_idx))
    pool_size = ev.monitor_train_size + (0 if labeled else ev.monitor_test_size)
    if ev.monitor_train_size == 0 or (not labeled and ev.monitor_test_size == 0):
        pool_size = 0
    pick = _fixed_subset(len(candidates), pool_size)
    pool = train_idx[candidates[pick]]
    x = listed.decode(pool, s, "decoding monitor pool")
    mean, std = channel_stats(x)
    name = f"{cfg.dataset}:{PurePosixPath(str(cfg.root).rstrip('/')).name}"
    test = None
    num_classes = 0
    if labeled:
        if test_idx is None:
            held = list_rows(str(cfg.test_root), cfg.dataset, "test_root", classes=listed.classes)
            test_idx = np.flatnonzero(held.labels >= 0)
        else:
            held = listed
        if test_idx.size == 0 or not (labels >= 0).any():
            raise DataError(
                f"{cfg.test_root or cfg.root}: no labeled rows for the test split; to train "
                "on unlabeled images set data.labels: false"
            )
        num_classes = len(listed.classes) or int(max(labels.max(), held.labels[test_idx].max())) + 1
        rows = test_idx[_fixed_subset(len(test_idx), ev.monitor_test_size)]
        xt = held.decode(rows, s, "decoding monitor test")
        yt = torch.from_numpy(held.labels[rows])
        test = ImageDataset(xt, yt, num_classes, mean, std, f"{name}/test", listed.classes)
    y = torch.from_numpy(labels[pool]) if labeled else torch.full((len(pool),), -1)
    classes = listed.classes if labeled else ()
    train = ImageDataset(x, y, num_classes, mean, std, f"{name}/train[monitor pool]", classes)
    return DatasetSplits(train=train, test=test)


def _fixed_subset(n: int, size: int) -> np.ndarray:
    """Sorted positions of a fixed ``size``-subset of ``range(n)`` (seed 0); 0 or >= n: all."""
    if size == 0 or size >= n:
        return np.arange(n)
    perm = np.random.default_rng(0).permutation(n)
    return np.sort(perm[:size])
