"""Sweep reports and reproductions, on a real smoke sweep that ran through Ray into MLflow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from contrastlab import tracking
from contrastlab.cli import main
from contrastlab.config import ConfigError, make_config
from contrastlab.sweep.report import best_trial, sweep_report
from contrastlab.sweep.reproduce import best_run, reproduce
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import load_space

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp}/mlflow.db"
    space = smoke_space(load_space(ROOT / "search_spaces" / "supcon.yaml"), trials=4)
    out = run_sweep(
        space, name="rep", storage_path=tmp / "sweeps", tracking_uri=uri, experiment="exp-rep"
    )
    return uri, out, space, tmp


def test_report_has_leaderboard_best_config_and_optuna_plots(sweep):
    uri, out, space, tmp = sweep
    rep = sweep_report("rep", tracking_uri=uri, out_dir=tmp / "report")
    board = rep.leaderboard
    assert len(board) == space.trials == len(out.trials)
    ranked = board.dropna(subset=["knn_top1"])["knn_top1"].tolist()
    assert ranked == sorted(ranked, reverse=True)  # mode max: best first
    assert set(space.param_paths) <= set(board.columns)
    assert pd.read_csv(rep.files["leaderboard"])["run_id"].tolist() == board["run_id"].tolist()
    # the best finished trial, and exactly the config it ran with
    assert rep.best is not None and rep.best["run_id"] == out.best["run_id"]
    c = tracking.client(uri)
    logged = make_config(yaml.safe_load(rep.files["best_config"].read_text()))
    child = c.get_run(rep.best["run_id"])
    for path in space.param_paths:
        assert str(logged.flat()[path]) == child.data.params[path]
    assert set(rep.importances) == set(space.param_paths)
    assert sum(rep.importances.values()) == pytest.approx(1.0)
    for key in ("history", "importances", "slice", "contour"):
        assert rep.files[key].read_bytes()[:4] == b"\x89PNG", key
    assert rep.best["run_id"] in rep.files["markdown"].read_text()
    assert "<table>" in rep.files["html"].read_text()
    on_parent = {a.path for a in c.list_artifacts(out.parent_run_id, "report")}
    assert {f"report/{f.name}" for f in rep.files.values()} <= on_parent
    # `reproduce --best-of` takes the sweep's name too, and picks the run the report names
    assert best_run(uri, "rep") == rep.best["run_id"] == best_run(uri, "exp-rep")
    c.create_experiment("rep")  # an experiment with the sweep's name: the sweep name wins
    assert best_run(uri, "rep") == rep.best["run_id"]


def test_best_trial_is_the_best_finished_one_earliest_first():
    def t(run_id, status, value):
        return {"run_id": run_id, "status": status, "value": value}

    trials = [
        t("a", "FINISHED", 80.0),
        t("b", "KILLED", 99.0),  # stopped early by ASHA: its value is from an earlier epoch
        t("c", "FAILED", None),
        t("d", "FINISHED", float("nan")),
        t("e", "FINISHED", 90.0),
        t("f", "FINISHED", 90.0),
    ]
    assert best_trial(trials, "max")["run_id"] == "e"  # a tie: the earlier trial
    assert best_trial(trials, "min")["run_id"] == "a"
    assert best_trial(trials[1:4], "max") is None


def test_report_of_an_unknown_sweep_names_it(sweep):
    uri = sweep[0]
    with pytest.raises(ConfigError, match="no sweep named 'nope'"):
        sweep_report("nope", tracking_uri=uri)
    assert main(["report", "nope", "--tracking-uri", uri]) == 2


def test_reproduce_best_of_a_sweep_is_bit_identical_and_linked(sweep):
    uri, out, _, tmp = sweep
    rep = reproduce(best_of="rep", tracking_uri=uri, output_dir=tmp / "repro")
    assert rep.original_run_id == out.best["run_id"]
    assert rep.ok and rep.exact, rep.text
    epochs = {r["epoch"] for r in rep.rows if r["metric"] == "knn_top1"}
    assert epochs == {0, 1, 2}  # random init and every trained epoch
    assert "MATCH" in rep.text and "bit-identical" in rep.text
    c = tracking.client(uri)
    mine = c.get_run(rep.mlflow_run_id)
    assert mine.data.tags["contrastlab.reproduces"] == rep.original_run_id
    assert mine.data.tags[tracking.KIND_TAG] == "reproduction"
    assert c.get_run(rep.original_run_id).data.tags["contrastlab.reproduced_by"] == mine.info.run_id
    # the reproduction is no sweep trial: it can never be picked as the best again
    assert tracking.PARENT_TAG not in mine.data.tags


def test_reproduce_reports_a_mismatch_and_code_changes(sweep):
    """A run whose recorded metrics are off by 1 point fails the comparison, loudly."""
    uri, out, _, tmp = sweep
    c = tracking.client(uri)
    orig = c.get_run(out.best["run_id"])
    fake = c.create_run(
        orig.info.experiment_id,
        run_name="tampered",
        tags={"contrastlab.source_sha256": "0" * 16, "contrastlab.torch_threads": "1"},
    )
    rid = fake.info.run_id
    cfg_dir = tmp / "cfg"
    cfg_dir.mkdir()
    c.download_artifacts(orig.info.run_id, "config.yaml", str(cfg_dir))
    c.log_artifact(rid, str(cfg_dir / "config.yaml"))
    for m in c.get_metric_history(orig.info.run_id, "knn_top1"):
        c.log_metric(rid, "knn_top1", m.value + (1.0 if m.step == 2 else 0.0), step=m.step)
    rep = reproduce(run_id=rid, tracking_uri=uri, output_dir=tmp / "repro", log_to_mlflow=False)
    assert not rep.ok
    bad = [r for r in rep.rows if not r["match"]]
    assert [(r["epoch"], r["diff"]) for r in bad] == [(2, pytest.approx(-1.0))]
    assert any("sources differ" in w for w in rep.warnings)
    assert "MISMATCH" in rep.text
    code = main(
        [
            "reproduce",
            "--run-id",
            rid,
            "--tracking-uri",
            uri,
            "--no-log",
            "--output-dir",
            str(tmp / "repro"),
            "--epochs",
            "2",
        ]
    )
    assert code == 3


def test_reproduce_of_a_run_logged_with_the_run_place_in_its_config(sweep):
    """An MLflow run logged by an earlier version: its config.yaml artifact holds
    train.output_dir, train.run_name and train.progress. It still reproduces, bit-identical."""
    uri, out, _, tmp = sweep
    c = tracking.client(uri)
    orig = c.get_run(out.best["run_id"])
    threads = orig.data.tags[tracking.THREADS_TAG]
    rid = c.create_run(
        orig.info.experiment_id, run_name="older", tags={tracking.THREADS_TAG: threads}
    ).info.run_id
    cfg_dir = tmp / "older"
    cfg_dir.mkdir()
    c.download_artifacts(orig.info.run_id, "config.yaml", str(cfg_dir))
    raw = yaml.safe_load((cfg_dir / "config.yaml").read_text())
    raw["train"].update(output_dir="/gone/sweeps/rep/trial", run_name="run", progress=False)
    (cfg_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    c.log_artifact(rid, str(cfg_dir / "config.yaml"))
    for m in c.get_metric_history(orig.info.run_id, "knn_top1"):
        c.log_metric(rid, "knn_top1", m.value, step=m.step)
    rep = reproduce(run_id=rid, tracking_uri=uri, output_dir=tmp / "repro", log_to_mlflow=False)
    assert rep.ok and rep.exact, rep.text


def test_reproduce_of_a_run_without_config_is_a_clear_error(sweep):
    uri = sweep[0]
    c = tracking.client(uri)
    rid = c.create_run(c.get_experiment_by_name("exp-rep").experiment_id).info.run_id
    with pytest.raises(ConfigError, match="no config.yaml artifact"):
        reproduce(run_id=rid, tracking_uri=uri, log_to_mlflow=False)
    with pytest.raises(ConfigError, match="--best-of 'missing': no sweep .* and no MLflow exp"):
        reproduce(best_of="missing", tracking_uri=uri)
    assert main(["reproduce", "--best-of", "missing", "--tracking-uri", uri]) == 2
    exp = c.get_experiment_by_name("exp-rep").experiment_id
    c.create_run(exp, tags={tracking.SWEEP_TAG: "abl", tracking.KIND_TAG: "ablation"})
    with pytest.raises(ConfigError, match="--best-of 'abl' is an ablation"):
        best_run(uri, "abl")


def test_mlflow_ui_compare_page_shows_the_trials_and_their_metrics(sweep):
    """A real `mlflow server` on 127.0.0.1, its compare view rendered in headless Chromium."""
    import os

    from tests import ui

    if ui.chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing on CI: the README's setup command installs it")
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    uri, out, _, tmp = sweep
    c = tracking.client(uri)
    exp_id = c.get_run(out.parent_run_id).info.experiment_id
    runs = [c.get_run(r["run_id"]) for r in out.trials]
    with ui.mlflow_server(uri, tmp / "served-artifacts") as server:
        url = ui.compare_url(server, exp_id, [r.info.run_id for r in runs])
        dom = ui.render_dom(url)
        shot = ui.screenshot(url, tmp / "compare.png")
    assert f"Comparing {len(runs)} Runs" in dom
    for r in runs:
        assert r.info.run_name in dom  # every trial is a column
        # its final kNN accuracy, as the metrics table prints it (2 decimals)
        assert f">{r.data.metrics['knn_top1']:.2f}<" in dom, r.info.run_name
    assert "knn_top1" in dom and "method.temperature" in dom  # metric and searched param rows
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
