"""Faults on a real local Ray: a trial's process is SIGKILLed mid-trial, the MLflow server goes
away mid-sweep. Nothing is lost and nothing is silently wrong."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from contrastlab import tracking
from contrastlab.sweep.reproduce import reproduce
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import load_space
from tests import ui

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _space(epochs: int, samples: int = 256):
    """One trial, FIFO (no early stop), ``epochs`` epochs of a tiny digits model."""
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"), trials=1, epochs=epochs)
    return space.with_overrides(
        concurrency=1,
        scheduler={"name": "fifo"},
        base_overrides={"data": {"max_train_samples": samples}},
    )


def _epochs_done(storage: Path) -> int:
    """Epochs the running trial has finished, from its metrics.jsonl (0 = init evaluation)."""
    files = list(storage.glob("*/*/run/metrics.jsonl"))
    if not files:
        return -1
    lines = files[0].read_text().splitlines()
    return max((json.loads(x)["epoch"] for x in lines), default=-1)


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_a_killed_trial_process_restarts_from_its_checkpoint_and_ends_identical(
    tmp_path, ray_local
):
    import ray
    from ray.util.state import list_actors

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "sweeps"
    killed: list[int] = []

    def killer():
        if not _wait(lambda: _epochs_done(storage) >= 3, 300):
            return
        address = ray.get_runtime_context().gcs_address  # this test's Ray, not another one
        for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")]):
            if actor.class_name == "ImplicitFunc" and actor.pid:
                os.kill(actor.pid, signal.SIGKILL)  # the trial's process, mid-epoch 4
                killed.append(actor.pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = run_sweep(
        _space(epochs=8, samples=1024),
        name="kill",
        storage_path=storage,
        tracking_uri=uri,
        max_failures=2,
    )
    t.join(timeout=5)
    assert killed, "the trial finished before it could be killed"
    assert [r["status"] for r in out.trials] == ["FINISHED"]
    c = tracking.client(uri)
    parent = c.get_run(out.parent_run_id)
    (run,) = tracking.child_runs(uri, parent.info.experiment_id, out.parent_run_id)
    assert run.info.status == "FINISHED"  # one run, reopened by the restarted trial
    for key in ("loss", "knn_top1"):
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, key))
        first = 0 if key == "knn_top1" else 1
        assert steps == list(range(first, 9)), (key, steps)  # every epoch exactly once
    # the interrupted-and-restarted trial equals an uninterrupted run of its config, bit for bit
    rep = reproduce(run_id=run.info.run_id, tracking_uri=uri, output_dir=tmp_path / "ref")
    assert rep.ok and rep.exact, rep.text


def test_mlflow_outage_mid_sweep_loses_no_metric(tmp_path, ray_local):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    port = ui.free_port()
    storage = tmp_path / "sweeps"
    server: dict = {}
    events: list[str] = []

    def start():
        server["cm"] = ui.mlflow_server(db, tmp_path / "artifacts", port=port)
        return server["cm"].__enter__()

    url = start()

    def outage():
        if not _wait(lambda: _epochs_done(storage) >= 2, 300):
            return
        down = _epochs_done(storage)
        events.append(f"down after epoch {down}")
        server["cm"].__exit__(None, None, None)  # the server process is gone
        _wait(lambda: _epochs_done(storage) >= down + 4, 120)  # training goes on meanwhile
        events.append(f"up after epoch {_epochs_done(storage)}")
        start()

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    try:
        out = run_sweep(
            _space(epochs=20, samples=1347), name="outage", storage_path=storage, tracking_uri=url
        )
        t.join(timeout=60)
    finally:
        server["cm"].__exit__(None, None, None)
    assert len(events) == 2, events
    down, up = (int(e.split()[-1]) for e in events)
    assert up > down, events  # epochs were trained while MLflow was down
    assert [r["status"] for r in out.trials] == ["FINISHED"]
    c = tracking.client(db)
    parent = c.get_run(out.parent_run_id)
    (run,) = tracking.child_runs(db, parent.info.experiment_id, out.parent_run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "knn_top1"))
    assert steps == list(range(0, 21)), steps  # nothing lost, nothing twice
    assert not list(storage.glob("*/*/run/mlflow_pending.json"))  # the spool was sent
