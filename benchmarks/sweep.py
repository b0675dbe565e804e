"""Fixed per-trial cost of a sweep: a fresh trial process, a reused one, a Ray Train worker group.

    python -m benchmarks.sweep [--trials 4] [--repeats 2]     # from the repository root

Runs the same tiny 1-epoch smoke sweep (digits, small convnet) on a local Ray, one trial at a
time, in three ways: ``runner=direct`` with a fresh process per trial (``reuse_actors=False``),
``runner=direct`` with Tune reusing the finished trial's process (``reuse_actors=True``, the
default), and ``runner=trainer`` (each trial starts a one-worker ``TorchTrainer``). Training
takes about a second, so the wall time per trial is almost all fixed overhead. Each way runs
``--repeats`` times, the ways alternating, after an untimed warm-up sweep.

From the trials' MLflow runs it splits the time per trial into: inside the run (setup, the
kNN monitor at init and after the epoch, the epoch, checkpoints, logging; the epoch alone in
brackets) and between one run's end and the next one's start (process start and imports,
Tune's scheduling). The numbers in docs/benchmarks.md come from this script.

    python -m benchmarks.sweep --cifar-sized [--trials 4]

instead runs a sweep of ``--trials`` real 1-epoch CIFAR-sized trials (SimCLR, the small
convnet, batch 256, one CPU each, as many at once as there are cores) on CIFAR-10 files in the
official on-disk format, filled with random pixels (50,000 train / 10,000 test images), and
prints the wall time and trials per hour.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray

from contrastlab import tracking
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import load_space

ROOT = Path(__file__).resolve().parents[1]

WAYS = {
    "fresh process": {"runner": "direct", "reuse_actors": False},
    "reused process": {"runner": "direct", "reuse_actors": True},
    "TorchTrainer": {"runner": "trainer", "reuse_actors": False},
}


def _split(uri: str, outcome) -> dict[str, float]:
    """Mean seconds per trial inside its MLflow run, of its epoch, and between runs."""
    c = tracking.client(uri)
    parent = c.get_run(outcome.parent_run_id)
    runs = tracking.child_runs(uri, parent.info.experiment_id, outcome.parent_run_id)
    runs = sorted(runs, key=lambda r: r.info.start_time)
    inside = [(r.info.end_time - r.info.start_time) / 1e3 for r in runs]
    gaps = [
        (b.info.start_time - a.info.end_time) / 1e3
        for a, b in zip(runs[:-1], runs[1:], strict=True)
    ]
    epoch = [r.data.metrics["epoch_time_s"] for r in runs]
    return {
        "inside": statistics.mean(inside),
        "epoch": statistics.mean(epoch),
        "between": statistics.mean(gaps) if gaps else float("nan"),
    }


def write_random_cifar10(root: Path, n_train: int = 50_000, n_test: int = 10_000) -> None:
    """CIFAR-10 in its official python format (``cifar-10-batches-py``), random pixels."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    sizes = [n_train // 5] * 5 + [n_test]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, sizes, strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),  # R, G, B planes per row
            b"filenames": [],
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))


def cifar_sized(args: argparse.Namespace) -> None:
    """Wall time of a sweep of real 1-epoch CIFAR-sized trials, one CPU per trial."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        write_random_cifar10(Path(d) / "cifar10")
        space = smoke_space(load_space(args.space), trials=args.trials, epochs=1)
        space = space.with_overrides(
            base_overrides={
                "data": {
                    "dataset": "cifar10",
                    "root": f"{d}/cifar10",
                    "image_size": 32,
                    "max_train_samples": None,
                },
                # the defaults a CIFAR run resolves to (smoke_space shrinks them for digits)
                "model": {"width": 32, "head_hidden_dim": 512, "proj_dim": 128},
                "augment": {"recipe": "simclr"},
                "eval": {"knn_k": 200},
                "train": {"batch_size": 256},
            },
            concurrency=cores,
        )
        t = time.perf_counter()
        out = run_sweep(
            space,
            name="cifar-sized",
            storage_path=f"{d}/sweeps",
            tracking_uri=f"sqlite:///{d}/m.db",
        )
        wall = time.perf_counter() - t
        assert all(r["status"] == "FINISHED" for r in out.trials), out.trials
        split = _split(f"sqlite:///{d}/m.db", out)
    print(
        f"\n{args.trials} one-epoch CIFAR-sized trials (50,000 + 10,000 images, SimCLR, convnet, "
        f"batch 256), {cores} at a time, one CPU each, {platform.machine()} {cores} cores: "
        f"{wall:.0f} s, {3600 * args.trials / wall:.1f} trials/hour; per trial inside its run "
        f"{split['inside']:.0f} s, of which the epoch {split['epoch']:.0f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="timed sweeps per way")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "simclr.yaml"))
    p.add_argument(
        "--cifar-sized", action="store_true", help="real 1-epoch trials on CIFAR-sized files"
    )
    args = p.parse_args()
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=False,
    )
    if args.cifar_sized:
        cifar_sized(args)
        ray.shutdown()
        return
    space = smoke_space(load_space(args.space), trials=args.trials, epochs=1).with_overrides(
        concurrency=1
    )
    order = list(WAYS) + list(reversed(WAYS))
    order = (order * args.repeats)[: len(WAYS) * args.repeats]
    walls: dict[str, list[float]] = {w: [] for w in WAYS}
    splits: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        # untimed warm-up: the first sweep in a fresh Ray pays one-time costs (dashboard
        # start, database creation, imports) that are not per-trial
        run_sweep(
            space.with_overrides(trials=1),
            name="warmup",
            storage_path=f"{d}/sweeps",
            tracking_uri=uri,
        )
        for i, way in enumerate(order):
            t = time.perf_counter()
            out = run_sweep(
                space, name=f"bench-{i}", storage_path=f"{d}/sweeps", tracking_uri=uri, **WAYS[way]
            )
            wall = time.perf_counter() - t
            assert all(r["status"] == "FINISHED" for r in out.trials), out.trials
            walls[way].append(wall / args.trials)
            splits[way].append(_split(uri, out))
            print(f"  {way}: {wall / args.trials:.1f} s/trial", flush=True)
    ray.shutdown()
    print(
        f"\nper trial, 1-epoch digits trials, {args.trials} per sweep one at a time, "
        f"{args.repeats} sweeps per way, {platform.machine()} {os.cpu_count()} cores:\n"
    )
    print(
        "| way | s/trial (sweep wall / trials) | trials/hour | inside the run (epoch) | "
        "between runs |"
    )
    print("|---|---|---|---|---|")
    for way in WAYS:
        per = statistics.mean(walls[way])
        parts = {k: statistics.mean(s[k] for s in splits[way]) for k in splits[way][0]}
        runs = ", ".join(f"{x:.1f}" for x in walls[way])
        print(
            f"| {way} | {per:.1f} ({runs}) | {3600 / per:.0f} | {parts['inside']:.1f} s "
            f"({parts['epoch']:.1f} s) | {parts['between']:.1f} s |"
        )


if __name__ == "__main__":
    main()
