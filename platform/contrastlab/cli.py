"""The ``contrastlab`` command line.

contrastlab train [CONFIG.yaml] [--set key=value ...]   train locally (no Ray)
contrastlab train ... --tracking-uri URI                 ... and log the run to MLflow
contrastlab train --resume RUN_DIR                      continue an interrupted run
contrastlab config [CONFIG.yaml] [--set key=value ...]  print the resolved config
contrastlab sweep --space SPACE.yaml [--smoke-test]     Ray Tune + Optuna sweep, in MLflow
contrastlab ablate --spec SPEC.yaml [--smoke-test]      grid of cells x seeds, tables + plots
contrastlab report SWEEP                                leaderboard, Optuna plots, summary
contrastlab reproduce --run-id ID | --best-of NAME      re-run a tracked trial locally
contrastlab prepare-data SRC DST [--resize N]           dataset tree -> parquet shards
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contrastlab.config import ConfigError, load_config


def _add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: train, config, sweep, ablate."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: built-in digits run)")
    _add_set_arg(p, "override a config value, e.g. --set method.temperature=0.2 (repeatable)")


def _cmd_train(args: argparse.Namespace) -> int:
    from contrastlab import tracking
    from contrastlab.rundir import (
        DEFAULT_OUTPUT_DIR,
        RunPlace,
        latest_checkpoint,
        load_run_config,
        make_run_dir,
    )
    from contrastlab.train import train

    where = {
        "--run-dir": args.run_dir,
        "--output-dir": args.output_dir,
        "--run-name": args.run_name,
    }
    named = [flag for flag, value in where.items() if value is not None]
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError(
                "--resume continues a run with its saved config; "
                "do not pass a config file or --set with it"
            )
        if named:
            raise ConfigError(
                f"--resume RUN_DIR continues the run where it is; do not pass {', '.join(named)}"
            )
        cfg = load_run_config(args.resume)
        run_dir = Path(args.resume)
    elif args.run_dir is not None:
        if len(named) > 1:
            raise ConfigError(
                "--run-dir names the run directory itself; do not pass --output-dir or "
                "--run-name with it"
            )
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir)
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = make_run_dir(cfg, args.output_dir or DEFAULT_OUTPUT_DIR, args.run_name)
    if args.experiment and not args.tracking_uri:
        raise ConfigError(
            "--experiment names the MLflow experiment of --tracking-uri; pass --tracking-uri "
            "too (e.g. --tracking-uri sqlite:///mlflow.db)"
        )
    run = None
    if args.tracking_uri:  # off unless asked: a hand run reaches MLflow only with the flag
        run = tracking.open_train_run(
            args.tracking_uri, args.experiment, cfg, run_dir, resume=bool(args.resume)
        )
        print(f"contrastlab: logging to MLflow run {run.run_id} ({run.uri})", file=sys.stderr)
    hooks = [tracking.epoch_logger(run, cfg.train.epochs, run_dir)] if run else []
    place = RunPlace(run_dir, progress=args.progress)
    try:
        with tracking.failed_on_error(run):
            result = train(cfg, place, resume=bool(args.resume), hooks=hooks)
    except KeyboardInterrupt:
        if run is not None:
            run.end("KILLED", reason="KeyboardInterrupt: stopped by the user")
        raise
    if run is not None and not run.ended:
        # a resumed run that had already trained every epoch: no epoch hook ran to close it
        tracking.close_run(run, latest_checkpoint(run_dir))
    print(json.dumps({"run_dir": str(result.run_dir), **result.final}, indent=2))
    return 0


def apply_sets(spec, overrides: list[str], kind: str):
    """``spec`` (a search space or an ablation spec) with each ``--set KEY=VALUE`` applied to
    its ``base``, validated again: a shipped space then points at the user's data without
    editing YAML. On a sweep, a ``--set`` of a searched parameter fixes it (no longer searched);
    an ablation's factors cannot be set (they are what it varies)."""
    from contrastlab.config import apply_overrides, parse_override
    from contrastlab.sweep.ablation import ablation_from_dict
    from contrastlab.sweep.space import space_from_dict

    if not overrides:
        return spec
    paths = [".".join(parse_override(text)[0]) for text in overrides]
    raw = spec.to_dict()
    try:
        raw["base"] = apply_overrides(raw["base"], overrides)
    except ConfigError as e:
        raise ConfigError(f"{spec.path}: --set: {e}") from None
    if kind == "sweep":
        fixed = [p for p in paths if p in raw["params"]]
        raw["params"] = {k: v for k, v in raw["params"].items() if k not in fixed}
        if fixed:
            print(f"{kind}: --set fixes {', '.join(fixed)} (no longer searched)", flush=True)
    else:
        clash = [p for p in paths if p in spec.factor_paths]
        if clash:
            raise ConfigError(
                f"{spec.path}: --set {', '.join(clash)}: is a factor of this ablation (what it "
                f"varies); allowed: any other config field"
            )
    try:
        return (space_from_dict if kind == "sweep" else ablation_from_dict)(raw, spec.path)
    except ConfigError as e:
        raise type(e)(f"{e} (with --set {' '.join(overrides)})") from None


def _cmd_sweep(args: argparse.Namespace) -> int:

    from contrastlab.sweep.runner import run_sweep, smoke_space
    from contrastlab.sweep.space import load_space

    space = load_space(args.space)  # validated before Ray or MLflow is touched
    if args.smoke_test:
        space = smoke_space(space)
    space = apply_sets(space, args.overrides, "sweep")  # after the smoke settings: they win
    changes = {
        k: v
        for k, v in (("trials", args.trials), ("concurrency", args.concurrency))
        if v is not None
    }
    if changes:
        space = space.with_overrides(**changes)
    out = run_sweep(space, _sweep_options(args), optuna_storage=args.optuna_storage)
    print(
        f"\nsweep {out.name}: {len(out.trials)} trials in {out.wall_s:.0f} s "
        f"(MLflow parent run {out.parent_run_id})"
    )
    ranked = sorted(
        (r for r in out.trials if r["metric"] is not None),
        key=lambda r: r["metric"],
        reverse=space.mode == "max",
    )
    print(f"{'trial':<12} {'status':<9} {'epochs':>6} {space.metric:>12}  params")
    for r in ranked + [r for r in out.trials if r["metric"] is None]:
        metric = "-" if r["metric"] is None else f"{r['metric']:.4g}"
        params = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in (r["params"] or {}).items()
        )
        print(f"{r['trial_id']!s:<12} {r['status']:<9} {r['epochs']:>6} {metric:>12}  {params}")
    return 0


def _sweep_options(args: argparse.Namespace):
    """The run options ``contrastlab sweep`` and ``contrastlab ablate`` share."""
    import os

    from contrastlab.sweep.spec import SweepOptions

    return SweepOptions(
        name=args.name,
        storage_path=args.storage_path or os.environ.get("CONTRASTLAB_STORAGE", "sweeps"),
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        resume=args.resume,
        runner=args.runner,
        max_failures=args.max_failures,
        reuse_actors=args.reuse_actors,
    )


def _reference(texts: list[str]) -> dict[str, object] | None:
    """``--reference FACTOR=VALUE ...`` as ``{factor: value}`` (None: the first cell)."""
    from contrastlab.config import parse_override

    if not texts:
        return None
    return {".".join(path): value for path, value in map(parse_override, texts)}


def _cmd_ablate(args: argparse.Namespace) -> int:

    from contrastlab.sweep.ablation import (
        format_summary,
        load_ablation,
        run_ablation,
        smoke_ablation,
    )

    spec = load_ablation(args.spec)  # validated (every cell's config built) before Ray
    if args.smoke_test:
        spec = smoke_ablation(spec)
    spec = apply_sets(spec, args.overrides, "ablate")
    print(
        f"ablation {spec.name}: {len(spec.cells)} cells x {len(spec.seeds)} seeds = "
        f"{spec.n_runs} runs of {spec.epochs} epochs",
        flush=True,
    )
    out = run_ablation(
        spec, _sweep_options(args), out_dir=args.out, reference=_reference(args.reference)
    )
    value = f"final_{spec.metric}"
    print(
        f"\nablation {out.name}: {len(out.table)} runs in {out.wall_s:.0f} s "
        f"(MLflow parent run {out.parent_run_id})"
    )
    print(format_summary(out.summary, spec.factor_paths, value))
    for kind, path in out.files.items():
        print(f"  {kind:<11} {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from contrastlab.sweep.report import sweep_report

    rep = sweep_report(
        args.sweep, tracking_uri=args.tracking_uri, experiment=args.experiment, out_dir=args.out
    )
    print(rep.text)
    for kind, path in rep.files.items():
        print(f"  {kind:<13} {path}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from contrastlab.sweep.reproduce import reproduce

    rep = reproduce(
        run_id=args.run_id,
        best_of=args.best_of,
        tracking_uri=args.tracking_uri,
        workers=args.workers,
        output_dir=args.output_dir,
        epochs=args.epochs,
        log_to_mlflow=not args.no_log,
        front_index=args.front_index,
    )
    print(rep.text)
    return 0 if rep.ok else 3


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from contrastlab.data.prepare import prepare_data

    done = prepare_data(
        args.src,
        args.dst,
        format=args.format,
        split=args.split,
        rows_per_shard=args.rows_per_shard,
        shard_mb=args.shard_mb,
        resize=args.resize,
        progress=args.progress,
    )
    print(
        f"wrote {done.rows} {done.format} images in {len(done.shards)} shard(s) to {args.dst} "
        f"({len(done.classes)} classes); train on them with --set data.dataset=parquet "
        f"--set data.root={args.dst}"
    )
    return 0


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``sweep`` and ``ablate``: base overrides, storage, MLflow, runner,
    restarts."""
    _add_set_arg(
        p,
        "set a config value in the spec's base for every trial, e.g. --set "
        "data.root=/data/train (repeatable; checked before anything starts)",
    )
    p.add_argument(
        "--storage-path",
        help="trial/checkpoint storage (default $CONTRASTLAB_STORAGE or ./sweeps; shared "
        "storage on a cluster)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)",
    )
    p.add_argument("--experiment", help="MLflow experiment (default contrastlab-<file name>)")
    p.add_argument(
        "--runner",
        choices=["auto", "direct", "trainer"],
        default="auto",
        help="train in the trial process (direct) or a Ray Train TorchTrainer",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=0,
        help="restarts of a failed trial from its last checkpoint",
    )
    p.add_argument(
        "--reuse-actors",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run the next trial in a finished trial's process, skipping process start and "
        "imports (default no: a trial stopped by ASHA must end its epoch within 2 s for its "
        "process to be reused, else Ray errors the next trial; worth it for short epochs)",
    )


def _cmd_config(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contrastlab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model locally")
    _add_config_args(p_train)
    p_train.add_argument("--run-dir", help="run directory (default: OUTPUT_DIR/RUN_NAME)")
    p_train.add_argument("--output-dir", help="parent folder of the run directory (default: runs)")
    p_train.add_argument(
        "--run-name", help="run directory name (default: <time>-<method>-<dataset>)"
    )
    p_train.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars and one line per epoch on stderr (default: on)",
    )
    p_train.add_argument("--resume", metavar="RUN_DIR", help="resume from RUN_DIR's checkpoint")
    p_train.add_argument(
        "--tracking-uri",
        help="also log the run to this MLflow store, like a sweep trial (params, metrics per "
        "epoch, config, provenance, checkpoint, end state); off without it. With --resume: "
        "continues the run's MLflow run",
    )
    p_train.add_argument(
        "--experiment",
        help="MLflow experiment for --tracking-uri (default contrastlab-train-<method>; "
        "contrastlab-<space> puts the run beside that sweep's trials)",
    )
    p_train.set_defaults(func=_cmd_train)
    p_cfg = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p_cfg)
    p_cfg.set_defaults(func=_cmd_config)
    p_sw = sub.add_parser("sweep", help="hyperparameter sweep on Ray Tune + Optuna, in MLflow")
    p_sw.add_argument("--space", required=True, help="search space YAML (search_spaces/...)")
    p_sw.add_argument("--name", help="sweep name (default: <space>-<time>); needed by --resume")
    p_sw.add_argument("--resume", action="store_true", help="continue the sweep --name")
    p_sw.add_argument("--trials", type=int, help="override the space's number of trials")
    p_sw.add_argument("--concurrency", type=int, help="override max concurrent trials")
    _add_ray_args(p_sw)
    p_sw.add_argument("--optuna-storage", help="Optuna RDB URL to persist the study")
    p_sw.add_argument(
        "--smoke-test", action="store_true", help="tiny CPU sweep on digits (what CI runs)"
    )
    p_sw.set_defaults(func=_cmd_sweep)
    p_ab = sub.add_parser("ablate", help="ablation grid (cells x seeds) with tables and plots")
    p_ab.add_argument("--spec", required=True, help="ablation YAML (search_spaces/ablations/)")
    p_ab.add_argument("--name", help="ablation name (default: <spec>-<time>); for --resume")
    p_ab.add_argument("--resume", action="store_true", help="continue the ablation --name")
    p_ab.add_argument(
        "--out", help="folder for tables and plots (default: <storage>/<name>/analysis)"
    )
    p_ab.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="FACTOR=VALUE",
        help="the cell every other cell is compared with, paired by seed, one per factor, "
        "e.g. --reference method.contrast_count=2 (default: the first cell)",
    )
    _add_ray_args(p_ab)
    p_ab.add_argument(
        "--smoke-test", action="store_true", help="tiny CPU ablation on digits (what CI runs)"
    )
    p_ab.set_defaults(func=_cmd_ablate)
    p_rep = sub.add_parser("report", help="report of a finished sweep from MLflow")
    p_rep.add_argument("sweep", help="sweep name (its MLflow parent run's contrastlab.sweep tag)")
    p_rep.add_argument("--experiment", help="MLflow experiment (default: search all)")
    p_rep.add_argument("--tracking-uri", help="MLflow URI (default as for sweep)")
    p_rep.add_argument("--out", help="output folder (default: reports/<sweep>)")
    p_rep.set_defaults(func=_cmd_report)
    p_pr = sub.add_parser("reproduce", help="re-run a tracked trial locally and compare")
    which = p_pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="MLflow run id of the trial")
    which.add_argument(
        "--best-of",
        metavar="NAME",
        help="best finished trial of sweep NAME (as `contrastlab report NAME` names it), else "
        "of MLflow experiment NAME",
    )
    p_pr.add_argument(
        "--front-index",
        type=int,
        metavar="I",
        help="with --best-of SWEEP: trial I of the sweep's Pareto front (two objectives), as "
        "`contrastlab report SWEEP` lists it",
    )
    p_pr.add_argument("--tracking-uri", help="MLflow URI (default as for sweep)")
    p_pr.add_argument(
        "--workers", type=int, help="local DDP processes (GPUs if any); default: the trial's"
    )
    p_pr.add_argument("--output-dir", default="runs/reproduce", help="parent of the run folder")
    p_pr.add_argument("--epochs", type=int, help="compare only the first N epochs (quick check)")
    p_pr.add_argument("--no-log", action="store_true", help="do not log the reproduction to MLflow")
    p_pr.set_defaults(func=_cmd_reproduce)
    p_pd = sub.add_parser(
        "prepare-data",
        help="convert an image folder, CIFAR-10/100 or STL-10 tree into parquet shards",
    )
    p_pd.add_argument("src", help="source folder (ImageFolder, CIFAR python, STL-10 binary)")
    p_pd.add_argument("dst", help="output folder or URI (s3://bucket/prefix); must hold no shard")
    p_pd.add_argument(
        "--format",
        default="auto",
        choices=["auto", "imagefolder", "cifar10", "cifar100", "stl10"],
        help="source format (default: recognised from the files)",
    )
    p_pd.add_argument(
        "--split", help="CIFAR: train|test; STL-10: train|test|unlabeled (default train)"
    )
    size = p_pd.add_mutually_exclusive_group()
    size.add_argument("--rows-per-shard", type=int, help="images per shard (default 10000)")
    size.add_argument("--shard-mb", type=float, help="instead: encoded MiB per shard")
    p_pd.add_argument("--resize", type=int, metavar="N", help="re-encode as N x N PNGs")
    p_pd.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )
    p_pd.set_defaults(func=_cmd_prepare_data)
    args = parser.parse_args(argv)
    from contrastlab.data import DataError
    from contrastlab.rundir import CheckpointError
    from contrastlab.tracking import TrackingError
    from contrastlab.train import DivergenceError

    try:
        return args.func(args)
    except (ConfigError, DataError) as e:  # bad input: say what and where, no traceback
        print(f"contrastlab: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DivergenceError, TrackingError) as e:
        print(f"contrastlab: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
