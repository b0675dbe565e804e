"""Fixed per-trial cost of a sweep: training in the trial process vs a Ray Train worker group.

    python pipelines/bench_sweep.py [--trials 4]

Runs the same tiny 1-epoch smoke sweep (digits, small convnet) twice on a local Ray, one
trial at a time: once with ``runner=direct`` (the trial process trains) and once with
``runner=trainer`` (each trial starts a one-worker ``TorchTrainer``). The training itself takes
well under a second, so wall time per trial is almost all fixed overhead. Prints both and the
ratio; the README's numbers come from this script.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import ray

from contrastlab.spaces import load_space
from contrastlab.tune import run_sweep, smoke_space

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "simclr.yaml"))
    args = p.parse_args()
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=False,
    )
    space = smoke_space(load_space(args.space), trials=args.trials, epochs=1).with_overrides(
        concurrency=1
    )
    per: dict[str, list[float]] = {"direct": [], "trainer": []}
    with tempfile.TemporaryDirectory() as d:
        # untimed warm-up: the first sweep in a fresh Ray pays one-time costs (dashboard
        # start, database creation, imports) that are not per-trial
        run_sweep(
            space.with_overrides(trials=1),
            name="warmup",
            storage_path=f"{d}/sweeps",
            tracking_uri=f"sqlite:///{d}/mlflow.db",
        )
        for i, runner in enumerate(("direct", "trainer", "trainer", "direct")):
            t = time.perf_counter()
            out = run_sweep(
                space,
                name=f"bench-{runner}-{i}",
                storage_path=f"{d}/sweeps",
                tracking_uri=f"sqlite:///{d}/mlflow.db",
                runner=runner,
            )
            wall = time.perf_counter() - t
            assert all(r["status"] == "FINISHED" for r in out.trials), out.trials
            per[runner].append(wall / args.trials)
    ray.shutdown()
    direct, trainer = (sum(v) / len(v) for v in (per["direct"], per["trainer"]))
    print(
        f"\nper-trial wall time (sweep wall / trials), 1-epoch digits trial, {args.trials} "
        f"trials one at a time, each runner timed twice, {platform.machine()} "
        f"{os.cpu_count()} cores:"
    )
    for runner, mean in (("direct", direct), ("trainer", trainer)):
        runs = ", ".join(f"{x:.1f}" for x in per[runner])
        print(f"  runner={runner:<8} {mean:6.1f} s/trial ({runs})  {3600 / mean:6.0f} trials/hour")
    print(
        f"  a Ray Train worker group costs {trainer - direct:+.1f} s per trial "
        f"({trainer / direct:.2f}x the direct trial)"
    )


if __name__ == "__main__":
    main()
