"""Streaming vs in-memory training data: peak memory, images/s, decode share, object store.

Generates ``--sizes`` datasets of random-texture PNG images (``--px`` px) in parquet shards
(``--format parquet``) or class folders of PNG files (``--format imagefolder``), then, for each
size and each ``data.source``, runs one epoch of batches (no model: the data path alone) in a
fresh process and records the peak RSS of that process, its images/s, and for the stream the
peak object-store use and the peak summed RSS of the Ray worker processes (the decode tasks;
sampled every 0.2 s from /proc, Linux only) of the local Ray it starts. The decode share is the
single-core decode time of the epoch's images over the epoch's wall time x CPUs.

    python benchmarks/stream.py --sizes 5000 50000 200000 --px 64     # the full sizes
    python benchmarks/stream.py --sizes 5000 50000 --format imagefolder
    python benchmarks/stream.py --sizes 2000 5000 10000 --px 64       # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_shards(root: Path, n: int, px: int, rows_per_shard: int = 2500) -> None:
    """``n`` PNG images of ``px`` px (smooth random textures, so PNG compresses like photos
    would not) in shards of ``rows_per_shard`` rows, row groups of 256."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, lo in enumerate(range(0, n, rows_per_shard)):
        m = min(rows_per_shard, n - lo)
        data = []
        for _ in range(m):
            small = rng.integers(0, 256, (px // 4, px // 4, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((px, px), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data.append(buf.getvalue())
        labels = rng.integers(0, 10, m)
        table = pa.table({"image": pa.array(data, pa.binary()), "label": pa.array(labels)})
        pq.write_table(table, root / f"part-{k:04d}.parquet", row_group_size=256)


def make_folder(root: Path, n: int, px: int, classes: int = 10) -> None:
    """The same kind of images as :func:`make_shards`, as PNG files ``root/c<k>/<i>.png``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (px // 4, px // 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((px, px), Image.Resampling.BILINEAR)
        img.save(root / f"c{i % classes}" / f"{i:07d}.png")


def ray_workers_rss_mb() -> float:
    """Summed RSS of this machine's Ray worker processes (``ray::...``), in MB; 0 off Linux."""
    total = 0
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if not (d / "comm").read_text().startswith("ray::"):
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:  # the process ended meanwhile
            continue
    return total / 1024


def one_epoch(root: str, source: str, px: int, batch: int, fmt: str = "parquet") -> dict:
    """In this (fresh) process: one epoch of ``source`` batches of the shards at ``root``
    (memory: its wall time includes decoding the whole set; stream: decoding is the epoch)."""
    import torch

    from contrastlab.config import DataConfig
    from contrastlab.data import load_dataset, stream

    torch.set_num_threads(1)
    cfg = DataConfig(dataset=fmt, root=root, image_size=px, source=source, labels=False)
    t0 = time.perf_counter()
    out: dict = {"source": source}
    if source == "memory":
        train = load_dataset(cfg).train
        n = len(train)
        perm = torch.randperm(n)
        for i in range(n // batch):
            x = train.images[perm[i * batch : (i + 1) * batch]]
            x.float().mean()
    else:
        import ray

        plan = stream.plan(cfg)
        n = len(plan)
        src = stream.StreamBatches(plan, cfg, 0, batch, 0, 1, torch.device("cpu"))
        out["ray_start_s"] = time.perf_counter() - t0  # starting the local Ray: not the epoch
        t0 = time.perf_counter()
        peak = [0.0, 0.0]  # object store, decode workers' RSS
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                total = ray.cluster_resources().get("object_store_memory", 0)
                free = ray.available_resources().get("object_store_memory", total)
                peak[0] = max(peak[0], total - free)
                peak[1] = max(peak[1], ray_workers_rss_mb())
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        for x, _, _ in src.epoch(0, n // batch):
            x.float().mean()
        done.set()
        th.join()
        out["object_store_peak_mb"] = peak[0] / 2**20
        out["ray_workers_peak_rss_mb"] = peak[1]
        out["object_store_mb"] = cfg.stream_object_store_mb
    wall = time.perf_counter() - t0
    out.update(
        n=n,
        wall_s=wall,
        images_per_s=(n // batch) * batch / wall,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return out


def decode_seconds(root: Path, px: int, fmt: str, limit: int = 2000) -> float:
    """Single-core seconds to decode one image (mean over ``limit`` images)."""
    import pyarrow.parquet as pq

    from contrastlab.data.decode import decode_image

    if fmt == "parquet":
        data = pq.read_table(sorted(root.glob("*.parquet"))[0], columns=["image"])
        blobs = data.column("image").to_pylist()[:limit]
    else:
        blobs = [f.read_bytes() for f in sorted(root.glob("c0/*.png"))[:limit]]
    t0 = time.perf_counter()
    for b in blobs:
        decode_image(b, px, "")
    return (time.perf_counter() - t0) / len(blobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--format", choices=["parquet", "imagefolder"], default="parquet")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: ROOT SOURCE
    args = ap.parse_args()
    if args.child:
        res = one_epoch(args.child[0], args.child[1], args.px, args.batch, args.format)
        print(json.dumps(res))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            (make_shards if args.format == "parquet" else make_folder)(root, n, args.px)
            per_image = decode_seconds(root, args.px, args.format)
            for source in ("memory", "stream"):
                cmd = [sys.executable, __file__, "--px", str(args.px), "--batch", str(args.batch)]
                cmd += ["--format", args.format]
                res = subprocess.run(
                    [*cmd, "--child", str(root), source],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
                )
                r = json.loads(res.stdout.strip().splitlines()[-1])
                r["decode_share"] = per_image * r["n"] / (r["wall_s"] * (os.cpu_count() or 1))
                r["format"] = args.format
                rows.append(r)
                print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
