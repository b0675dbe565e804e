"""Sweeps really run through Ray Tune + Optuna + ASHA and really land in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from contrastlab import tracking
from contrastlab.config import DataConfig
from contrastlab.data.lineage import data_sources
from contrastlab.sweep.reproduce import reproduce
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import load_space

ROOT = Path(__file__).resolve().parents[1]


def _children(uri, outcome):
    c = tracking.client(uri)
    parent = c.get_run(outcome.parent_run_id)
    return parent, tracking.child_runs(uri, parent.info.experiment_id, outcome.parent_run_id)


@pytest.mark.slow
def test_smoke_sweep_lands_in_mlflow(tmp_path, ray_local):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"))
    study_db = f"sqlite:///{tmp_path}/optuna.db"
    out = run_sweep(
        space,
        name="smoke",
        storage_path=tmp_path / "sweeps",
        tracking_uri=uri,
        optuna_storage=study_db,
    )
    parent, children = _children(uri, out)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["contrastlab.method"] == "simclr"
    assert parent.data.tags["version.torch"]  # provenance
    assert len(children) == space.trials == len(out.trials)
    c = tracking.client(uri)
    statuses = {r.info.status for r in children}
    assert statuses <= {"FINISHED", "KILLED"}, statuses  # none left RUNNING
    searched = [p.path for p in space.params]
    (digits,) = data_sources(DataConfig())  # the smoke sweep's data
    for run in children:
        assert run.data.params["method.name"] == "simclr"
        (data,) = c.get_run(run.info.run_id).inputs.dataset_inputs  # lineage, once per run
        assert (data.dataset.name, data.dataset.digest) == ("digits", digits.digest)
        assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
        for path in searched:  # every searched value is a param of its child run
            assert path in run.data.params
        hist = c.get_metric_history(run.info.run_id, "knn_top1")
        n = len(hist) - 1  # step 0 is the random-init baseline, then one step per epoch
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(0, n + 1))
        assert len(c.get_metric_history(run.info.run_id, "loss")) == n
        assert len(c.get_metric_history(run.info.run_id, "views_per_s")) == n
        if run.info.status == "FINISHED":
            assert n == space.epochs
            names = {a.path for a in c.list_artifacts(run.info.run_id)}
            assert {"config.yaml", "checkpoint"} <= names
            cfg_text = c.download_artifacts(run.info.run_id, "config.yaml")
            assert "method:" in Path(cfg_text).read_text()
        else:
            assert n < space.epochs
            assert "stopped early" in run.data.tags["contrastlab.end_reason"]
    assert out.best is not None and out.best["status"] != "FAILED"
    # the Optuna study persisted in its RDB storage, one trial per Tune trial
    import optuna

    study = optuna.load_study(study_name="smoke", storage=optuna.storages.RDBStorage(study_db))
    assert len(study.trials) == space.trials
    assert {p.path for p in space.params} == set(study.trials[0].params)
    assert parent.data.metrics[f"best_{space.metric}"] == pytest.approx(out.best["metric"])


def test_unreachable_tracking_server_fails_fast(tmp_path):
    from contrastlab.tracking import TrackingError

    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"))
    with pytest.raises(TrackingError, match="127.0.0.1:9"):
        run_sweep(space, name="x", storage_path=tmp_path, tracking_uri="http://127.0.0.1:9")


@pytest.mark.slow
def test_trainer_runner_ddp_trials_land_in_mlflow(tmp_path, ray_local):
    """workers=2: each trial is a Ray Train TorchTrainer with two DDP workers (gloo on CPU)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = smoke_space(load_space(ROOT / "search_spaces" / "moco.yaml")).with_overrides(
        trials=1, concurrency=1, resources={"workers": 2, "cpus_per_worker": 0.9}
    )
    out = run_sweep(space, name="ddp", storage_path=tmp_path / "sweeps", tracking_uri=uri)
    assert [r["status"] for r in out.trials] == ["FINISHED"]
    parent, children = _children(uri, out)
    assert parent.data.tags["contrastlab.runner"] == "trainer"
    (run,) = children
    assert run.info.status == "FINISHED"
    c = tracking.client(uri)
    hist = c.get_metric_history(run.info.run_id, "knn_top1")  # rank 0's kNN, every epoch
    # epoch 0 is the random-init baseline
    assert sorted(m.step for m in hist) == list(range(0, space.epochs + 1))
    assert "checkpoint" in {a.path for a in c.list_artifacts(run.info.run_id)}
    assert run.data.tags["contrastlab.workers"] == "2"
    # the DDP trial reproduces bit for bit in two local gloo processes, without Ray
    rep = reproduce(run_id=run.info.run_id, tracking_uri=uri, output_dir=tmp_path / "repro")
    assert rep.ok and rep.exact, rep.text
    assert {r["epoch"] for r in rep.rows if r["metric"] == "knn_top1"} == {0, 1, 2}


@pytest.mark.slow
def test_a_diverging_trial_is_failed_with_its_reason(tmp_path, ray_local):
    """lr=1e30 makes the loss NaN in the first epoch: the trial fails, MLflow says why."""
    import yaml

    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"))
    raw = space.to_dict()
    raw["params"] = {"optim.lr": {"dist": "loguniform", "low": 1e29, "high": 1e30}}
    raw["trials"] = 1
    path = tmp_path / "diverging.yaml"
    path.write_text(yaml.safe_dump(raw))
    diverging = load_space(path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_sweep(diverging, name="nan", storage_path=tmp_path / "sweeps", tracking_uri=uri)
    assert [r["status"] for r in out.trials] == ["FAILED"]
    parent, (child,) = _children(uri, out)
    assert child.info.status == "FAILED"
    assert "DivergenceError" in child.data.tags["contrastlab.end_reason"]
    assert "loss is nan" in child.data.tags["contrastlab.end_reason"]
    assert parent.info.status == "FINISHED" and out.best is None


@pytest.mark.slow
def test_a_reused_trial_process_changes_no_result(tmp_path, ray_local):
    """reuse_actors (opt-in): three trials run one after the other in one process, and
    the last one, which ran after two others there, still reproduces bit for bit in a fresh
    process: nothing a trial leaves behind (RNG, threads, flags, caches) changes the next."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"), trials=3, epochs=1)
    out = run_sweep(
        space.with_overrides(concurrency=1),
        name="reuse",
        storage_path=tmp_path / "sweeps",
        tracking_uri=uri,
        reuse_actors=True,
    )
    parent, runs = _children(uri, out)
    assert parent.data.tags["contrastlab.reuse_actors"] == "True"
    runs = sorted(runs, key=lambda r: r.info.start_time)
    assert len({r.data.tags["contrastlab.pid"] for r in runs}) == 1
    assert [r.data.tags["contrastlab.trial_in_process"] for r in runs] == ["1", "2", "3"]
    rep = reproduce(run_id=runs[-1].info.run_id, tracking_uri=uri, output_dir=tmp_path / "repro")
    assert rep.ok and rep.exact, rep.text
