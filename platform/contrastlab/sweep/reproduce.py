"""Reproduce a tracked trial locally, without Ray, and compare its metrics with the original.

``reproduce(run_id=...)`` (or ``best_of=SWEEP or EXPERIMENT``) fetches the trial's resolved
``config.yaml`` from MLflow, checks which code produced it (the sweep's git SHA and source
hash against this checkout: a difference is a warning, shown in the output), trains the same
config with the same seed, in one process or ``workers`` local DDP processes, and prints the
original and reproduced metrics epoch by epoch with their difference.

Tolerance: on CPU, the same code, seed and thread count give bit-identical results, so the
comparison demands exact equality. Across devices or with CUDA (non-deterministic kernels,
bf16) it allows ``gpu_tolerance`` (absolute, percentage points for kNN accuracy; relative for
the loss). The number of CPU threads changes float reduction order, so the trial's thread
count (tagged on its run) is used again.

The reproduction is itself an MLflow run in the original's experiment, tagged
``contrastlab.reproduces=<run id>``; the original gets ``contrastlab.reproduced_by``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from contrastlab import tracking
from contrastlab.config import Config, ConfigError, make_config, saved_config
from contrastlab.data import stream
from contrastlab.data.load import resolve_source
from contrastlab.distributed import exit_spawned_worker
from contrastlab.rundir import RunPlace, read_metrics

# rankme: what a run on unlabeled data (no kNN) is compared by besides its loss
COMPARED = ("loss", "knn_top1", "knn_top5", "rankme")
THREADS_TAG = tracking.THREADS_TAG
GPU_TOLERANCE = {"knn_top1": 0.5, "knn_top5": 0.5, "loss": 0.01, "rankme": 0.01}
"""Allowed |difference| off CPU: kNN in percentage points, loss and rankme relative."""
_RELATIVE = ("loss", "rankme")


@dataclass
class Reproduction:
    original_run_id: str
    run_dir: Path
    rows: list[dict[str, Any]]
    ok: bool
    exact: bool
    warnings: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    text: str = ""


class _StopAfterError(Exception):
    """Raised by the hook to end a reproduction after ``--epochs`` epochs."""


def best_run(uri: str, name: str) -> str:
    """The run ``--best-of NAME`` reproduces: the best finished trial of sweep ``name`` (the
    run ``contrastlab report NAME`` names as best), else, when no sweep has that name, the best
    over every sweep of MLflow experiment ``name``. A sweep name wins over an experiment name.

    Raises:
        ConfigError: ``name`` is neither, is an ablation, or has no finished sweep trial.
    """
    from contrastlab.sweep.report import best_of_sweep, locate_sweep

    c = tracking.client(uri)
    found = locate_sweep(uri, name)
    if found is not None:
        exp_id, parent_id = found
        if c.get_run(parent_id).data.tags.get(tracking.KIND_TAG, "sweep") != "sweep":
            raise ConfigError(
                f"--best-of {name!r} is an ablation (cells x seeds, no search): pick one of its "
                "runs with --run-id (its analysis/results.parquet lists them)"
            )
        best = best_of_sweep(uri, exp_id, parent_id)
        if best is None:
            raise ConfigError(
                f"--best-of: sweep {name!r} has no finished trial (trials stopped early or "
                "failed do not count)"
            )
        return best["run_id"]
    exp = c.get_experiment_by_name(name)
    if exp is None:
        raise ConfigError(
            f"--best-of {name!r}: no sweep (a parent run tagged contrastlab.sweep) and no MLflow "
            f"experiment has that name in {uri}; `contrastlab report NAME` takes the same sweep "
            "names"
        )
    runs = c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tracking.SWEEP_TAG}` != ''", max_results=10_000
    )
    best, best_key = None, None
    for parent in runs:
        tags = parent.data.tags
        if tracking.PARENT_TAG in tags or tags.get(tracking.KIND_TAG, "sweep") != "sweep":
            continue
        top = best_of_sweep(uri, exp.experiment_id, parent.info.run_id)
        if top is None:
            continue
        # sweeps of one experiment may differ in mode: compare on a scale where higher wins
        key = top["value"] if tags.get("contrastlab.mode", "max") == "max" else -top["value"]
        if best_key is None or key > best_key:
            best, best_key = top["run_id"], key
    if best is None:
        raise ConfigError(f"--best-of: experiment {name!r} has no finished sweep trial")
    return best


def front_run(uri: str, sweep: str, index: int) -> str:
    """The run ``--best-of SWEEP --front-index I`` reproduces: trial ``index`` of the sweep's
    Pareto front, in the order ``contrastlab report SWEEP`` lists it (best first by the first
    objective).

    Raises:
        ConfigError: No such sweep, or ``index`` is not on its front.
    """
    from contrastlab.sweep.report import front_of_sweep, locate_sweep

    found = locate_sweep(uri, sweep)
    if found is None:
        raise ConfigError(
            f"--best-of {sweep!r} --front-index: no sweep of that name in {uri} (--front-index "
            "takes a sweep name, not an experiment)"
        )
    front = front_of_sweep(uri, *found)
    if not 0 <= index < len(front):
        raise ConfigError(
            f"--front-index {index}: sweep {sweep!r} has {len(front)} trial(s) on its Pareto "
            f"front; allowed: 0 to {len(front) - 1} (`contrastlab report {sweep}` lists them)"
            if front
            else f"--front-index: sweep {sweep!r} has no finished trial on a Pareto front"
        )
    return front[index]["run_id"]


def fetch_config(uri: str, run_id: str) -> Config:
    """The resolved config a trial ran with (its ``config.yaml`` artifact; one logged by an
    earlier version loads too, see :func:`~contrastlab.config.saved_config`)."""
    c = tracking.client(uri)
    try:
        c.get_run(run_id)
    except Exception as e:  # MlflowException for an unknown id
        raise ConfigError(f"--run-id: no MLflow run {run_id!r} in {uri} ({e})") from None
    with tempfile.TemporaryDirectory() as d:
        try:
            path = c.download_artifacts(run_id, "config.yaml", d)
        except Exception as e:
            raise ConfigError(
                f"run {run_id} has no config.yaml artifact (not a contrastlab trial?): {e}"
            ) from None
        return saved_config(Path(path).read_text())


def code_differences(uri: str, run_id: str) -> list[str]:
    """Warnings where this checkout's code differs from the code that produced ``run_id``."""
    c = tracking.client(uri)
    run = c.get_run(run_id)
    tags = dict(run.data.tags)
    parent_id = tags.get(tracking.PARENT_TAG)
    if parent_id:
        tags = {**c.get_run(parent_id).data.tags, **tags}
    out = []
    here_src = tracking.source_digest()
    there_src = tags.get("contrastlab.source_sha256")
    if there_src and there_src != here_src:
        out.append(
            f"package sources differ: the trial ran source hash {there_src}, this checkout is "
            f"{here_src} (git {tags.get('contrastlab.git_sha', '?')[:12]} then)"
        )
    if tags.get("contrastlab.git_dirty") == "True":
        out.append("the trial ran from a checkout with uncommitted changes (see git_diff.patch)")
    for pkg in ("torch", "ray", "mlflow"):
        there = tags.get(f"version.{pkg}")
        if there is None:
            continue
        try:
            import importlib.metadata

            here = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            here = "not installed"
        if there != here:
            out.append(f"{pkg} {there} then, {here} here")
    return out


def data_differences(original: Any, sources: list) -> list[str]:
    """Warnings where the data a reproduction is about to train on (``sources``, from
    :func:`contrastlab.data.lineage.data_sources`) differs from the data the original run
    logged (its MLflow dataset inputs)."""
    then = tracking.data_digests(original)
    if not then:
        return ["the original run logged no dataset input: its data cannot be compared"]
    out = []
    for now in sources:
        source, digest = then.get(now.context, ("?", None))
        if digest is not None and digest != now.digest:
            out.append(
                f"{now.context} data differs: {source} had digest {digest} when the run "
                f"trained, {now.source} has {now.digest} now (files changed since)"
            )
    return out


def _ddp_worker(
    rank: int, world: int, rendezvous: str, cfg_yaml: str, place: RunPlace, stop: int, threads: int
):
    import torch.distributed as dist

    from contrastlab.train import train

    torch.set_num_threads(threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)
    try:
        cfg = make_config(yaml.safe_load(cfg_yaml))
        train(cfg, place, hooks=[_stop_hook(stop)])
    except _StopAfterError:
        pass
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_spawned_worker()  # every rank done: leave the group and skip a racy teardown


def _stop_hook(stop: int):
    def hook(epoch: int, metrics: dict[str, float], ckpt: Path | None) -> None:
        if epoch >= stop:
            raise _StopAfterError

    return hook


def _run_locally(cfg: Config, place: RunPlace, stop: int, workers: int, threads: int):
    """Train ``cfg`` into ``place`` in this process (with ``threads`` CPU threads) or in
    ``workers`` local DDP processes, stopping after ``stop`` epochs."""
    if workers == 1:
        torch.set_num_threads(threads)
        from contrastlab.train import train

        with contextlib.suppress(_StopAfterError):
            train(cfg, place, hooks=[_stop_hook(stop)])
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d, _shared_ray(cfg):
            mp.spawn(
                _ddp_worker,
                args=(
                    workers,
                    f"file://{d}/rendezvous",
                    cfg.to_yaml(),
                    place,
                    stop,
                    threads,
                ),
                nprocs=workers,
            )


@contextlib.contextmanager
def _shared_ray(cfg: Config) -> Iterator[None]:
    """For a streamed run: one Ray, started here, whose address the DDP processes inherit
    (``RAY_ADDRESS``), so every worker's decode tasks share it; nothing for in-memory data."""
    if resolve_source(cfg.data) != "stream":
        yield
        return
    import ray

    stream.ensure_ray(cfg.data.stream_object_store_mb)
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAY_ADDRESS"]
        else:
            os.environ["RAY_ADDRESS"] = before


def reproduce(
    run_id: str | None = None,
    best_of: str | None = None,
    *,
    tracking_uri: str | None = None,
    workers: int | None = None,
    output_dir: str | Path = "runs/reproduce",
    epochs: int | None = None,
    log_to_mlflow: bool = True,
    gpu_tolerance: dict[str, float] | None = None,
    front_index: int | None = None,
) -> Reproduction:
    """Re-run a tracked trial locally and compare (see the module docstring).

    Args:
        run_id: the trial's MLflow run id.
        best_of: instead, the best finished trial of this sweep (as ``contrastlab report``
            names it) or, if no sweep has this name, of this MLflow experiment's sweeps.
        tracking_uri: MLflow store (default as for sweeps).
        workers: local DDP processes (one per GPU when CUDA is there, else gloo on CPU);
            default: as many as the trial had (its ``contrastlab.workers`` tag).
        output_dir: parent folder of the reproduction's run directory.
        epochs: stop after this many epochs (the schedule is still the full run's, so the
            first ``epochs`` epochs are comparable); default: all.
        log_to_mlflow: record the reproduction as an MLflow run linked to the original.
        gpu_tolerance: allowed differences off CPU (default :data:`GPU_TOLERANCE`).
        front_index: with ``best_of`` (a sweep), trial ``front_index`` of its Pareto front
            instead of its best (:func:`front_run`).
    """
    if (run_id is None) == (best_of is None):
        raise ConfigError("give exactly one of --run-id or --best-of")
    if front_index is not None and best_of is None:
        raise ConfigError(
            "--front-index picks a trial of a sweep's front: it needs --best-of SWEEP"
        )
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    if best_of is not None and front_index is not None:
        run_id = front_run(uri, best_of, front_index)
    elif best_of is not None:
        run_id = best_run(uri, best_of)
    assert run_id is not None
    cfg = fetch_config(uri, run_id)
    notes = code_differences(uri, run_id)
    c = tracking.client(uri)
    original = c.get_run(run_id)
    from contrastlab.data.lineage import data_sources

    sources = data_sources(cfg.data)  # listed once: compared here, logged with the run
    notes += data_differences(original, sources)
    trial_workers = int(original.data.tags.get("contrastlab.workers", "1"))
    workers = trial_workers if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if workers != trial_workers:
        notes.append(
            f"the trial ran with {trial_workers} worker(s), this reproduction with {workers}: "
            "per-worker BatchNorm statistics differ, so metrics are not expected to match"
        )
    stop = min(epochs or cfg.train.epochs, cfg.train.epochs)
    if cfg.train.batch_size % workers:
        raise ConfigError(
            f"--workers {workers}: the trial's train.batch_size ({cfg.train.batch_size}) is not "
            "divisible by it"
        )
    threads = int(original.data.tags.get(THREADS_TAG, torch.get_num_threads()))
    caller_threads = torch.get_num_threads()  # restored below: the caller's numerics are its own
    name = f"{run_id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    place = RunPlace(Path(output_dir) / name, progress=sys.stderr.isatty())
    on_cpu = not torch.cuda.is_available() or cfg.train.device == "cpu"

    started = time.perf_counter()
    try:
        _run_locally(cfg, place, stop, workers, threads)
    finally:
        torch.set_num_threads(caller_threads)
    wall = time.perf_counter() - started
    history = read_metrics(place.dir)

    tol = {} if on_cpu else (gpu_tolerance or GPU_TOLERANCE)
    rows, ok = [], True
    for key in COMPARED:
        orig = {m.step: m.value for m in c.get_metric_history(run_id, key)}
        for h in history:
            ep = int(h["epoch"])
            if key not in h or ep not in orig:
                continue
            diff = h[key] - orig[ep]
            allowed = tol.get(key, 0.0) * (abs(orig[ep]) if key in _RELATIVE else 1.0)
            match = abs(diff) <= allowed
            ok &= match
            rows.append(
                {
                    "metric": key,
                    "epoch": ep,
                    "original": orig[ep],
                    "reproduced": h[key],
                    "diff": diff,
                    "match": match,
                }
            )
    if not rows:
        ok = False
        notes.append("no metric of the original run could be compared")
    exact = all(r["diff"] == 0 for r in rows) and bool(rows)
    rep = Reproduction(run_id, place.dir, rows, ok, exact, notes)

    if log_to_mlflow:
        rep.mlflow_run_id = _log(uri, original, cfg, sources, history, rep, workers, wall)
    rep.text = _text(rep, original, on_cpu, tol, wall, workers)
    return rep


def _log(
    uri, original, cfg: Config, sources, history, rep: Reproduction, workers: int, wall: float
) -> str:
    c = tracking.client(uri)
    prov = tracking.provenance()
    run = c.create_run(
        original.info.experiment_id,
        run_name=f"reproduce-{original.info.run_name}",
        tags={
            tracking.KIND_TAG: "reproduction",
            "contrastlab.reproduces": rep.original_run_id,
            "contrastlab.method": cfg.method.name,
            "contrastlab.workers": str(workers),
            THREADS_TAG: str(torch.get_num_threads()),
            **tracking.provenance_tags(prov),
        },
    )
    rid = run.info.run_id
    tracking.log_params(uri, rid, cfg.flat())
    tracking.log_data_inputs(uri, rid, sources)
    for h in history:
        tracking.log_metrics(uri, rid, h, step=int(h["epoch"]))
    c.log_text(rid, cfg.to_yaml(), "config.yaml")
    c.log_text(
        rid,
        json.dumps(
            {"ok": rep.ok, "exact": rep.exact, "rows": rep.rows, "warnings": rep.warnings}, indent=1
        ),
        "comparison.json",
    )
    c.log_metric(rid, "reproduction_wall_s", wall)
    c.set_tag(rid, "contrastlab.reproduction_ok", str(rep.ok))
    c.set_tag(rep.original_run_id, "contrastlab.reproduced_by", rid)
    c.set_terminated(rid, "FINISHED" if rep.ok else "FAILED")
    return rid


def _text(rep: Reproduction, original, on_cpu: bool, tol, wall: float, workers: int) -> str:
    lines = [
        f"reproduced run {rep.original_run_id} ({original.info.run_name}) in {wall:.0f} s "
        f"with {workers} worker(s); run dir {rep.run_dir}",
    ]
    lines += [f"warning: {w}" for w in rep.warnings]
    last: dict[str, dict[str, Any]] = {}
    for r in rep.rows:
        last[r["metric"]] = r
    lines.append(f"{'metric':<10} {'epoch':>5} {'original':>12} {'reproduced':>12} {'diff':>11}")
    for key, r in last.items():
        lines.append(
            f"{key:<10} {r['epoch']:>5} {r['original']:>12.6g} {r['reproduced']:>12.6g} "
            f"{r['diff']:>+11.3g}"
        )
    n_bad = sum(not r["match"] for r in rep.rows)
    rule = "exact equality (CPU)" if on_cpu else f"tolerance {tol}"
    verdict = "MATCH" if rep.ok else "MISMATCH"
    lines.append(
        f"{verdict}: {len(rep.rows)} epoch values compared under {rule}; {n_bad} differ"
        + (" (bit-identical)" if rep.exact else "")
    )
    if rep.mlflow_run_id:
        lines.append(f"logged as MLflow run {rep.mlflow_run_id} (contrastlab.reproduces tag)")
    return "\n".join(lines)


__all__ = [
    "Reproduction",
    "best_run",
    "code_differences",
    "data_differences",
    "fetch_config",
    "front_run",
    "reproduce",
]
