"""Time to a kNN accuracy: the platform's SimCLR with a given config against the naive
SimCLR loop (``contrastlab.naive``), on one learnability task, in one run on one machine.

    # from the repository root; a CPU run, 2 threads (no result recorded in docs/ yet)
    python -m benchmarks.learn --task colour --target 25 --image-size 16 \\
        --set optim.name=adamw --set optim.lr=0.001 --set train.batch_size=128 \\
        --set method.temperature=0.2 --set augment.channel_shuffle_p=1 \\
        --set augment.channel_gain=[0.6,1.4] --set augment.crop_scale=[0.3,1.0] \\
        --set augment.flip_p=0 --set augment.blur_p=0

Both train on the same Parquet shards of the task and are measured with the same kNN protocol
(``contrastlab.data.tasks.KNN``) after every epoch; a side's time to the target is the wall
time from its start (data already loaded) to the end of the first epoch whose kNN reaches it,
evaluation included. The naive loop runs first, then the platform. Prints both times and
their ratio (platform / naive; below 1 is faster); a side that never reaches the target within
``--epochs`` is reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from contrastlab.config import ConfigError, apply_overrides, make_config
from contrastlab.data import load_dataset
from contrastlab.data.tasks import KNN, TASKS, write_task
from contrastlab.naive import naive_simclr
from contrastlab.rundir import RunPlace, make_run_dir
from contrastlab.train import Trainer


def first_reach(history: list[float], elapsed: list[float], target: float) -> float | None:
    """Seconds until the first entry of ``history`` at or above ``target`` (None: never)."""
    return next((t for acc, t in zip(history, elapsed, strict=True) if acc >= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="colour", choices=list(TASKS))
    p.add_argument("--target", type=float, default=25.0, help="kNN top-1 %% to reach")
    p.add_argument("--epochs", type=int, default=60, help="at most this many epochs per side")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("runs/bench_learn"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    data_dir = args.out / "data" / args.task
    write_task(args.task, data_dir)
    raw = apply_overrides({"method": {"name": "simclr"}}, args.sets)
    raw.setdefault("data", {}).update(
        dataset="parquet",
        root=str(data_dir / "train"),
        test_root=str(data_dir / "test"),
        image_size=args.image_size,
    )
    raw.setdefault("eval", {}).update(knn_k=KNN.knn_k, knn_t=KNN.knn_t)
    raw.setdefault("train", {}).update(epochs=args.epochs)
    try:
        cfg = make_config(raw)
    except ConfigError as e:
        print(f"benchmarks.learn: error: {e}", file=sys.stderr)
        return 2
    splits = load_dataset(cfg.data)

    naive = naive_simclr(splits, args.epochs, KNN, log=print)
    t_naive = first_reach(naive["history"], naive["elapsed_s"], args.target)

    history: list[float] = []
    elapsed: list[float] = []
    start = time.perf_counter()

    def hook(epoch: int, metrics: dict[str, float], ckpt: Path | None) -> None:
        history.append(metrics["knn_top1"])
        elapsed.append(time.perf_counter() - start)
        print(f"platform epoch {epoch}: knn_top1 {metrics['knn_top1']:.2f}% {elapsed[-1]:.0f}s")
        if metrics["knn_top1"] >= args.target:
            raise _Reached

    trainer = Trainer(cfg, RunPlace(make_run_dir(cfg, args.out / "runs")), [hook], data=splits)
    start = time.perf_counter()  # after setup, as for the naive loop (data loaded)
    with contextlib.suppress(_Reached):
        trainer.fit()
    t_ours = first_reach(history, elapsed, args.target)

    def show(t: float | None) -> str:
        return f"{t:.1f} s" if t is not None else f"not within {args.epochs} epochs"

    print(
        f"\ntask {args.task}, {args.image_size} px, target kNN {args.target:.1f}% (k={KNN.knn_k})"
    )
    print(f"naive loop: {show(t_naive)} (best {naive['best_knn_top1']:.1f}%)")
    print(f"platform:   {show(t_ours)} (best {max(history, default=0):.1f}%)")
    if t_naive is not None and t_ours is not None:
        print(f"platform / naive: {t_ours / t_naive:.2f}x")
    return 0


class _Reached(Exception):  # noqa: N818 (a signal, not an error)
    """Stops the platform's run at the first epoch that reaches the target."""


if __name__ == "__main__":
    sys.exit(main())
