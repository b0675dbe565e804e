"""The Ray boundary: a sweep is a Ray Tune run searched by Optuna, stopped early by ASHA.

One trial = one training run of :func:`contrastlab.train.train`, either

* directly in the trial's process (one worker: no worker group to start, which is the fixed
  cost that dominates short trials), or
* as a Ray Train ``TorchTrainer`` with ``resources.workers`` DDP workers. Ray 2.60 runs Train
  V2, where ``Tuner(TorchTrainer(...))`` is gone: the trial is a function that builds and
  ``fit()``s the trainer, whose ``TuneReportCallback`` forwards rank 0's reports to Tune.

Each epoch reports metrics and a checkpoint; a restarted trial (worker crash with
``FailureConfig``, or ``--resume`` after the driver died) continues from its last checkpoint.
MLflow gets one parent run per sweep and one child run per trial (see :mod:`tracking`).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contrastlab import tracking
from contrastlab.config import ConfigError
from contrastlab.sweep.space import SearchSpace, ShootoutSpace, load_space
from contrastlab.sweep.spec import (
    SweepOptions,
    SweepSpec,
    build_config,
    smoke_base,
    smoke_fixed,
)


@dataclass(frozen=True)
class SweepSettings:
    """Everything a trial needs to know about its sweep (sent to every trial process)."""

    space: SweepSpec
    name: str
    storage_path: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    runner: str  # "direct" | "trainer"
    reuse_actors: bool = False  # a finished trial's process runs the next trial


@dataclass
class SweepOutcome:
    name: str
    path: str
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    wall_s: float = 0.0


# --------------------------------------------------------------------------- smoke test


def smoke_space(space: SearchSpace, trials: int = 3, epochs: int = 2) -> SearchSpace:
    """The same sweep, shrunk to run on 2 CPU cores in about a minute (what CI runs).

    Keeps the method and the searched hyperparameters that do not change sizes (temperature,
    lr, weight decay, momentum, eps, ...), fixes the sizes small, and trains on digits. A
    shootout shrinks each method's space at that method's tiny setting (``trials`` per
    method); a space with two objectives keeps its FIFO scheduler.
    """
    if isinstance(space, ShootoutSpace):
        return space.map(lambda sub: smoke_space(sub, trials, epochs))
    fixed = smoke_fixed(space.method)
    drop = {p.path: None for p in space.params if p.path.startswith(fixed)}
    smaller = space.with_overrides(param_overrides=drop) if drop else space
    # a path that stays searched (e.g. augment.recipe) must not also be fixed in base
    base = {
        section: {k: v for k, v in values.items() if f"{section}.{k}" not in smaller.param_paths}
        for section, values in smoke_base(space.method).items()
    }
    # conditional params whose parent was dropped would dangle: drop them as well
    parents = {path for p in smaller.params for path in p.when}
    dangling = {path: None for path in parents if path not in smaller.param_paths}
    if dangling:
        smaller = smaller.with_overrides(
            param_overrides={p.path: None for p in smaller.params if set(p.when) & set(dangling)}
        )
    return smaller.with_overrides(
        base_overrides=base,
        trials=trials,
        concurrency=2,
        epochs=epochs,
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}
        if space.scheduler.name == "asha"
        else space.scheduler,
        resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
    )


# --------------------------------------------------------------------------- inside a trial


def _restore_checkpoint(ckpt: Any, run_dir: Path) -> int | None:
    """Copy a Ray checkpoint's epoch file into ``run_dir/checkpoints``; its epoch (None: there
    was no checkpoint).

    Local checkpoints from an earlier attempt are removed first: Ray's copy is the one the
    trial's reported history matches.
    """
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        files = sorted(Path(d).glob("epoch_*.pt"))
        if not files:
            return None
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy2(files[-1], run_dir / "checkpoints" / files[-1].name)
    from contrastlab.rundir import checkpoint_epoch

    return checkpoint_epoch(files[-1])


DIAGNOSIS_TAG = tracking.DIAGNOSIS_TAG
PENDING_FILE = tracking.PENDING_FILE


def _report_hook(
    report_fn,
    checkpoint_cls,
    run: tracking.TrialRun | None,
    is_main: bool,
    epochs: int,
    run_dir: Path | None = None,
):
    """Per-epoch hook: MLflow (rank 0, :func:`tracking.epoch_logger`), then one Ray report
    with the checkpoint.

    The random-init evaluation (epoch 0) goes to MLflow as step 0 with epoch 1's metrics; it is
    not reported to Tune, whose iterations must count training epochs (ASHA's rungs).

    Tune stops a trial *at* its last report (ASHA's ``max_t``), so nothing after the final
    report is guaranteed to run: the MLflow logger writes the final checkpoint artifact and the
    FINISHED state before it. It also tags the run with the diagnosis (see
    :data:`DIAGNOSIS_TAG`).
    """
    log = tracking.epoch_logger(run, epochs, run_dir) if run is not None and is_main else None

    def hook(epoch: int, metrics: dict[str, float], ckpt: Path | None) -> None:
        if log is not None:
            log(epoch, metrics, ckpt)
        if ckpt is None:
            report_fn(dict(metrics))
            return
        with tempfile.TemporaryDirectory() as d:
            shutil.copy2(ckpt, Path(d) / ckpt.name)  # Ray persists (copies) the directory
            report_fn(dict(metrics), checkpoint=checkpoint_cls.from_directory(d))

    return hook


# 1 for the first trial this process runs, 2 for the next one (a reused actor), ...
_TRIALS_IN_PROCESS = itertools.count(1)


def _gpu_ids() -> str:
    """The GPU ids Ray assigned to this process, comma-separated ("none" without GPUs)."""
    import ray

    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return ",".join(str(i) for i in ids) or "none"


def _open_run(
    settings: SweepSettings, trial_id: str, trial_name: str, cfg, run_dir: Path
) -> tracking.TrialRun:
    return tracking.open_run(
        settings.tracking_uri,
        settings.experiment_id,
        settings.parent_run_id,
        trial_id,
        trial_name,
        cfg,
        tags={
            tracking.SWEEP_TAG: settings.name,
            "contrastlab.workers": str(settings.space.resources.workers),
            # the GPU(s) Ray assigned; trials with resources.gpus_per_worker < 1 share one
            "contrastlab.gpu_ids": _gpu_ids(),
            # with reuse_actors one process runs several trials, one after the other
            "contrastlab.trial_in_process": str(next(_TRIALS_IN_PROCESS)),
        },
        spool=run_dir / PENDING_FILE,
    )


def _train_trial(
    cfg,
    run_dir: Path,
    ckpt: Any,
    settings: SweepSettings,
    trial_id: str,
    trial_name: str,
    report_fn,
    checkpoint_cls,
    is_main: bool,
) -> None:
    """Restore, open the MLflow run (rank 0), train in ``run_dir`` (no progress output) with
    the reporting hook, record failure."""
    from contrastlab.rundir import RunPlace
    from contrastlab.train import train

    start = _restore_checkpoint(ckpt, run_dir)
    resumed = start is not None
    run = _open_run(settings, trial_id, trial_name, cfg, run_dir) if is_main else None
    if run is not None and resumed:
        # which epoch the restarted trial continued from: the epochs after it are trained again
        run.set_tag("contrastlab.resumed_from_epoch", str(start))
        print(
            f"contrastlab: trial {trial_id} continues from its epoch {start} checkpoint", flush=True
        )
    hook = _report_hook(report_fn, checkpoint_cls, run, is_main, cfg.train.epochs, run_dir)
    try:
        with tracking.failed_on_error(run):
            train(cfg, RunPlace(run_dir), resume=resumed, hooks=[hook])
    finally:
        _release_memory()


def _release_memory() -> None:
    """Free what a finished trial held, for the next trial a reused process runs (the CUDA
    cache too: trials sharing a GPU through fractional resources need that memory)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trial_run_dir(settings: SweepSettings, trial_dir: str) -> Path:
    """Where a one-worker trial keeps its run directory (config, metrics, checkpoints).

    Ray's trial directory (``trial_dir``) lies under the Ray session's temp folder, which a
    sweep resumed after its driver (and the local Ray with it) died does not share. With a
    filesystem ``storage_path`` (local disk, or NFS on a cluster) the run directory therefore
    lives in the sweep's own storage, ``<storage>/<sweep>/<trial dir name>/run``, the same
    place in every session. On object storage (``s3://...``) it stays in Ray's trial directory;
    a restarted trial then continues from the checkpoint Ray persisted.
    """
    if "://" in settings.storage_path:
        return Path(trial_dir) / "run"
    return (
        Path(_experiment_dir(settings.storage_path, settings.name)) / Path(trial_dir).name / "run"
    )


def trial_direct(params: dict[str, Any], settings: SweepSettings) -> None:
    """A Tune function trainable that trains in this process (one worker)."""
    from ray import tune

    ctx = tune.get_context()
    _train_trial(
        settings.space.config_for(params),
        trial_run_dir(settings, ctx.get_trial_dir()),
        tune.get_checkpoint(),
        settings,
        ctx.get_trial_id(),
        ctx.get_trial_name(),
        tune.report,
        tune.Checkpoint,
        is_main=True,
    )


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: the same training function, with DDP set up by Ray."""
    import ray.train

    from contrastlab.distributed import rank

    settings: SweepSettings = loop_config["settings"]
    trial_id = loop_config["trial_id"]
    rank_dir = f"rank{ray.train.get_context().get_world_rank()}"
    # ranks > 0 write no checkpoint (Trainer) and report metrics only
    _train_trial(
        settings.space.config_for(loop_config["params"]),
        Path(tempfile.gettempdir()) / "contrastlab" / trial_id / rank_dir,
        ray.train.get_checkpoint(),
        settings,
        trial_id,
        loop_config["trial_name"],
        ray.train.report,
        ray.train.Checkpoint,
        is_main=rank() == 0,
    )


def trial_with_trainer(params: dict[str, Any], settings: SweepSettings) -> None:
    """A Tune function trainable that launches a Ray Train ``TorchTrainer`` (DDP workers)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = tune.get_context()
    res = settings.space.resources
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "settings": settings,
            "params": params,
            "trial_id": ctx.get_trial_id(),
            "trial_name": ctx.get_trial_name(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
            if res.gpus_per_worker > 0
            else {"CPU": res.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            # deterministic name: a restarted trial finds its own checkpoints
            name=f"{settings.name}-train-{ctx.get_trial_id()}",
            storage_path=settings.storage_path,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


# --------------------------------------------------------------------------- the driver


def _experiment_dir(storage_path: str, name: str) -> str:
    # plain string join: pathlib would turn s3://bucket/x into s3:/bucket/x
    return f"{storage_path.rstrip('/')}/{name}"


def _settle_mlflow(settings: SweepSettings, results) -> list[dict[str, Any]]:
    """Give every child run its true end state; none may stay RUNNING.

    One listing of the sweep's child runs (keyed by their trial-id tag) serves every trial.
    """
    uri, epochs = settings.tracking_uri, settings.space.epochs
    c = tracking.client(uri)
    runs = {
        r.data.tags.get(tracking.TRIAL_TAG): r
        for r in tracking.child_runs(uri, settings.experiment_id, settings.parent_run_id)
    }
    rows = []
    for r in results:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id")
        iters = int(metrics.get("training_iteration", 0))
        if r.error is not None:
            status, reason = "FAILED", f"{type(r.error).__name__}: {r.error}"
        elif iters < epochs:
            status, reason = "KILLED", f"stopped early by the scheduler after {iters} epochs"
        else:
            status, reason = "FINISHED", None
        run = runs.pop(trial_id, None)
        if run is not None and (
            run.info.status == "RUNNING" or (status == "FAILED" and run.info.status != "FAILED")
        ):
            if reason:
                c.set_tag(run.info.run_id, "contrastlab.end_reason", reason[:5000])
            c.set_terminated(run.info.run_id, status)
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "epochs": iters,
                "run_id": run.info.run_id if run is not None else None,
                "metric": metrics.get(settings.space.metric),
                "params": r.config,
            }
        )
    _send_spooled(settings)
    # runs no result accounts for must not stay RUNNING: a trial Tune knows that died before
    # reporting, or an orphan (see _retire_orphan)
    trial_dirs = [Path(str(r.path)).name for r in results if getattr(r, "path", None)]
    for tid, run in runs.items():
        # Tune names a trial's directory <trainable>_<trial id>_<index>_<params>_<date>
        if tid and not any(f"_{tid}_" in d for d in trial_dirs):
            _retire_orphan(c, run, tid)
        elif run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, "contrastlab.end_reason", "trial ended without a report")
            c.set_terminated(run.info.run_id, "KILLED")
    return rows


def _retire_orphan(c, run, trial_id: str) -> None:
    """A child run of a trial the (resumed) Tune experiment does not know: the driver died
    after the trial started but before Tune saved its state, so ``--resume`` drew a new trial
    in its place. The run is marked KILLED with the reason and soft-deleted, so that the sweep
    keeps one child run per trial; ``mlflow runs restore`` brings it back."""
    reason = (
        f"orphan: trial {trial_id} started just before the sweep driver died, before Tune "
        "saved it; the resumed sweep drew a new trial in its place"
    )
    c.set_tag(run.info.run_id, "contrastlab.end_reason", reason)
    if run.info.status == "RUNNING":
        c.set_terminated(run.info.run_id, "KILLED")
    c.delete_run(run.info.run_id)
    print(
        f"contrastlab: MLflow run {run.info.run_id} ({reason}) is KILLED and deleted; "
        f"`mlflow runs restore --run-id {run.info.run_id}` brings it back",
        flush=True,
    )


def check_data(space: SweepSpec, options: SweepOptions) -> None:
    """List the base config's data roots now, so that a missing or unreachable root (or wrong
    credentials) is a :class:`~contrastlab.data.DataError` naming it before any trial time.

    Object-store URIs are checked always; local paths only with a local Ray: on a cluster they
    live on the workers' disks, which the driver (on the head node) need not have.
    """
    from contrastlab.data.lineage import data_sources

    specs = list(space.spaces.values()) if isinstance(space, ShootoutSpace) else [space]
    local_ray = not (options.ray_address or os.environ.get("RAY_ADDRESS"))
    checked = set()
    for spec in specs:
        data = build_config(spec.base, spec.method, spec.epochs, {}).data
        remote = any("://" in str(r) for r in (data.root, data.test_root) if r)
        key = (data.dataset, data.root, data.test_root)
        if (remote or local_ray) and key not in checked:
            checked.add(key)
            data_sources(data)


def _local_ray_resources() -> tuple[float, float]:
    """``(CPUs, GPUs)`` of the local Ray a sweep runs on: the running one's, else what
    :func:`init_ray` will start (every CPU and GPU of this machine)."""
    import ray

    if ray.is_initialized():
        total = ray.cluster_resources()
        return total.get("CPU", 0.0), total.get("GPU", 0.0)
    import torch

    return float(os.cpu_count() or 1), float(torch.cuda.device_count())


def check_decode_room(space: SweepSpec, options: SweepOptions, runner: str) -> None:
    """On a local Ray, trials whose data streams must leave CPUs free for the decode tasks:
    trials holding every CPU would wait forever for batches no task can decode.

    On a cluster (``ray_address`` / ``$RAY_ADDRESS``) nothing is checked: the autoscaler
    adds CPU nodes for waiting decode tasks (``cpu_worker`` in cluster.yaml).

    Raises:
        ConfigError: naming the space, what the trials hold and what would fit.
    """
    if options.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    from contrastlab.data.load import resolve_source

    specs = list(space.spaces.values()) if isinstance(space, ShootoutSpace) else [space]
    for spec in specs:
        data = build_config(spec.base, spec.method, spec.epochs, {}).data
        if resolve_source(data) != "stream":
            continue
        res = space.resources
        cpus, gpus = _local_ray_resources()
        # what one trial holds: its workers, and in trainer mode the waiting trial process
        per_trial = res.workers * res.cpus_per_worker + (0.01 if runner == "trainer" else 0)
        fits = int(cpus // per_trial)
        if res.gpus_per_worker > 0:
            fits = min(fits, int(gpus // (res.workers * res.gpus_per_worker)))
        running = min(space.concurrency, fits)
        free = cpus - running * per_trial
        need = data.stream_task_cpus
        if free + 1e-9 >= need:
            continue
        most = int((cpus - need) // per_trial)
        fixes = [f"concurrency <= {most} (it is {space.concurrency})"] if most >= 1 else []
        fixes += ["a smaller resources.cpus_per_worker", "a smaller data.stream_task_cpus"]
        raise ConfigError(
            f"{spec.path}: the trials stream their data (data.source resolves to 'stream'): "
            f"{running} trial(s) at once x {per_trial:g} CPUs hold {running * per_trial:g} of "
            f"this machine's {cpus:g} CPUs, leaving {free:g}, but each decode task needs "
            f"data.stream_task_cpus={need:g}, so no batch would ever arrive; allowed: "
            + ", ".join(fixes)
        )


def open_sweep(space: SweepSpec, kind: str, options: SweepOptions) -> SweepSettings:
    """Everything before Ray: check the store, pick the runner, create or find the parent run.

    ``kind`` is ``sweep`` or ``ablation`` (the parent run's tag and the messages' word).
    """
    name, storage_path, runner = options.name, options.storage_path, options.runner
    resume, reuse_actors = options.resume, options.reuse_actors
    storage_path = (
        os.path.abspath(storage_path) if "://" not in str(storage_path) else str(storage_path)
    )
    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    tracking.check_reachable(uri)  # fail in seconds, before any trial is scheduled
    check_data(space, options)
    if runner == "auto":
        runner = "direct" if space.resources.workers == 1 else "trainer"
    if runner not in ("direct", "trainer"):
        raise ConfigError(f"runner: {runner!r}; allowed: auto, direct, trainer")
    if runner == "direct" and space.resources.workers > 1:
        raise ConfigError(
            f"{space.path}: resources.workers={space.resources.workers} needs runner 'trainer'"
        )
    check_decode_room(space, options, runner)
    experiment = options.experiment or f"contrastlab-{space.name}"
    exp_id = tracking.experiment_id(uri, experiment)
    if resume:
        if name is None:
            raise ConfigError(f"--resume needs the {kind} --name to continue")
        # the sweep's state lives in MLflow: its parent run, found by the sweep-name tag
        parent_id = tracking.find_parent(uri, exp_id, name)
        if parent_id is None:
            raise ConfigError(
                f"cannot resume {kind} {name!r}: no parent run tagged with it in "
                f"MLflow experiment {experiment!r}"
            )
        client = tracking.client(uri)
        client.update_run(parent_id, status="RUNNING")
        client.set_tag(parent_id, "contrastlab.reuse_actors", str(reuse_actors))
    else:
        name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if tracking.find_parent(uri, exp_id, name) is not None:
            raise ConfigError(
                f"{kind} {name!r} already exists in MLflow; "
                "pass --resume to continue it or choose another --name"
            )
        prov = tracking.provenance()
        parent = tracking.client(uri).create_run(
            exp_id,
            run_name=name,
            tags={
                tracking.SWEEP_TAG: name,
                tracking.KIND_TAG: kind,
                "contrastlab.space": str(space.path),
                "contrastlab.method": space.method,
                "contrastlab.metric": space.metric,
                "contrastlab.mode": space.mode,
                "contrastlab.objectives": json.dumps(getattr(space, "objectives", ())),
                "contrastlab.epochs": str(space.epochs),
                "contrastlab.optuna_study": name,
                "contrastlab.runner": runner,
                "contrastlab.reuse_actors": str(reuse_actors),
                "contrastlab.storage": _experiment_dir(storage_path, name),
                **tracking.provenance_tags(prov),
            },
        )
        parent_id = parent.info.run_id
        _log_parent_files(uri, parent_id, space, prov)
    return SweepSettings(space, name, storage_path, uri, exp_id, parent_id, runner, reuse_actors)


def trainable_for(settings: SweepSettings):
    """The Tune trainable of a sweep, with the resources one trial holds."""
    from ray import tune

    fn = trial_direct if settings.runner == "direct" else trial_with_trainer
    res = settings.space.resources
    # The trial process itself: in 'direct' mode it trains, so it holds the worker's
    # resources; in 'trainer' mode it only waits for the TorchTrainer (a small CPU share;
    # zero is rejected by Ray).
    trial_res = (
        {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
        if settings.runner == "direct"
        else {"CPU": 0.01}
    )
    return tune.with_resources(tune.with_parameters(fn, settings=settings), trial_res)


def init_ray(ray_address: str | None = None) -> None:
    """Join ``ray_address`` / ``$RAY_ADDRESS``, else start a local Ray (dashboard on localhost)."""
    import ray

    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            include_dashboard=True,  # State API: Train V2 cleanup needs it
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )


def fit_tuner(settings: SweepSettings, make_tuner, resume: bool, max_failures: int):
    """Build (or restore) the Tuner and fit it; the parent run is FAILED if the driver fails."""
    from ray import tune

    exp_dir = _experiment_dir(settings.storage_path, settings.name)
    trainable = trainable_for(settings)
    run_config = tune.RunConfig(
        name=settings.name,
        storage_path=settings.storage_path,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1,
    )
    try:
        if resume and tune.Tuner.can_restore(exp_dir):
            tuner = tune.Tuner.restore(exp_dir, trainable, resume_errored=max_failures > 0)
        else:
            tuner = make_tuner(trainable, run_config)
        return tuner.fit()
    except BaseException:
        tracking.client(settings.tracking_uri).set_terminated(settings.parent_run_id, "FAILED")
        raise


def finish_sweep(settings: SweepSettings, results, started: float) -> SweepOutcome:
    """Settle the child runs, pick the best trial, close the parent run."""
    space, uri, parent_id = settings.space, settings.tracking_uri, settings.parent_run_id
    rows = _settle_mlflow(settings, results)
    outcome = SweepOutcome(
        settings.name,
        _experiment_dir(settings.storage_path, settings.name),
        parent_id,
        rows,
        wall_s=time.perf_counter() - started,
    )
    # the best config is the best among trials that ran the full budget: a trial stopped by
    # ASHA has only a value at an earlier epoch, not comparable with final values
    done = [r for r in rows if r["metric"] is not None and r["status"] == "FINISHED"]
    if done:
        pick = max if space.mode == "max" else min
        outcome.best = pick(done, key=lambda r: r["metric"])
    c = tracking.client(uri)
    if outcome.best is not None:
        c.log_metric(parent_id, f"best_{space.metric}", float(outcome.best["metric"]))
        c.set_tag(parent_id, "contrastlab.best_run_id", str(outcome.best["run_id"]))
    failed = sum(r["status"] == "FAILED" for r in rows)
    c.set_tag(parent_id, "contrastlab.trials", json.dumps({"total": len(rows), "failed": failed}))
    c.set_terminated(parent_id, "FINISHED")
    return outcome


def _send_spooled(settings: SweepSettings) -> None:
    """Metrics a trial could not send while MLflow was down (its spool file), sent now."""
    exp_dir = Path(_experiment_dir(settings.storage_path, settings.name))
    if "://" in settings.storage_path or not exp_dir.is_dir():
        return
    c = tracking.client(settings.tracking_uri)
    for spool in sorted(exp_dir.glob(f"*/run/{PENDING_FILE}")):
        # the file may be a synced copy from before the trial itself got through: send only
        # what the server lacks
        data = json.loads(spool.read_text())
        missing = tracking.undelivered(
            settings.tracking_uri, data["run_id"], [(e, m) for e, m in data["pending"]]
        )
        for epoch, metrics in missing:
            tracking.log_metrics(settings.tracking_uri, data["run_id"], metrics, step=epoch)
        if missing:
            c.set_tag(
                data["run_id"], "contrastlab.spooled_epochs", json.dumps([e for e, _ in missing])
            )
        spool.unlink()


def run_sweep(
    space: SearchSpace | ShootoutSpace,
    options: SweepOptions | None = None,
    *,
    optuna_storage: str | None = None,
    **changes: Any,
) -> SweepOutcome:
    """Run (or, with ``options.resume``, continue) a sweep; returns per-trial outcomes.

    Args:
        space: A validated search space, or a method shootout.
        options: How it runs (:class:`~contrastlab.sweep.spec.SweepOptions`); ``changes`` are
            applied over it (``run_sweep(space, name="x", tracking_uri=uri)``).
        optuna_storage: An Optuna RDB URL (``sqlite:///study.db``) to persist the study.
    """
    import optuna
    from ray import tune

    started = time.perf_counter()
    opts = (options or SweepOptions()).with_changes(**changes)
    settings = open_sweep(space, "sweep", opts)
    if optuna_storage:
        tracking.client(settings.tracking_uri).set_tag(
            settings.parent_run_id, "contrastlab.optuna_storage", optuna_storage
        )

    def make_tuner(trainable, run_config):
        storage = optuna.storages.RDBStorage(optuna_storage) if optuna_storage else None
        search, scheduler, samples = _search_and_schedule(space, settings.name, storage)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=search,
                scheduler=scheduler,
                num_samples=samples,
                max_concurrent_trials=space.concurrency,
                reuse_actors=settings.reuse_actors,
            ),
            run_config=run_config,
        )

    init_ray(opts.ray_address)
    results = fit_tuner(settings, make_tuner, opts.resume, opts.max_failures)
    return finish_sweep(settings, results, started)


def _search_and_schedule(space: SearchSpace | ShootoutSpace, name: str, storage: Any):
    """Tune's searcher, scheduler and number of trials for ``space``.

    One Optuna TPE study (multi-objective with two objectives: TPE handles both) and ASHA on
    the metric, or FIFO. A shootout gets one study and one scheduler per method behind
    :mod:`contrastlab.sweep.per_method`'s round-robin, and ``trials`` for each method.
    """
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    def study(sub: SearchSpace, study_name: str) -> OptunaSearch:
        metrics, modes = zip(*sub.objectives, strict=True)
        return OptunaSearch(
            space=sub.define_by_run,
            metric=list(metrics) if len(metrics) > 1 else metrics[0],
            mode=list(modes) if len(modes) > 1 else modes[0],
            sampler=optuna.samplers.TPESampler(seed=sub.seed),
            study_name=study_name,
            storage=storage,
        )

    def scheduler():
        if space.scheduler.name != "asha":
            return FIFOScheduler()
        return ASHAScheduler(
            metric=space.metric,
            mode=space.mode,
            time_attr="training_iteration",
            max_t=space.epochs,
            grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor,
        )

    if not isinstance(space, ShootoutSpace):
        return study(space, name), scheduler(), space.trials
    from contrastlab.sweep.per_method import PerMethodScheduler, PerMethodSearch

    searchers = {m: study(sub, f"{name}-{m}") for m, sub in space.spaces.items()}
    search = PerMethodSearch(searchers, space.metric, space.mode)
    sched = (
        PerMethodScheduler(scheduler, space.methods)
        if space.scheduler.name == "asha"
        else FIFOScheduler()
    )
    return search, sched, space.total_trials


def _log_parent_files(
    uri: str, parent_id: str, space: SearchSpace | ShootoutSpace, prov: dict
) -> None:
    c = tracking.client(uri)
    tracking.log_provenance_files(uri, parent_id, prov)
    # the space as it ran (after --smoke-test / --trials changes), and the file it came from
    with tempfile.TemporaryDirectory() as d:
        effective = Path(d) / f"{Path(space.path).stem}.yaml"
        effective.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
        c.log_artifact(parent_id, str(effective), "space")
    c.log_artifact(parent_id, str(space.path), "space/source")


__all__ = ["SweepOutcome", "SweepSettings", "load_space", "open_sweep", "run_sweep"]
