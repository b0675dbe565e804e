"""A method is known everywhere once registered: ``tests/toy_method.py`` (one file: a config
class and a training step) reaches configs, search spaces, smoke sweeps through Ray into MLflow,
the method table and the step benchmark, with no other edit. Each test runs in a fresh process
with ``CONTRASTLAB_METHODS=tests.toy_method``, as a user's process (and its Ray workers) would,
so the toy never leaks into this process's registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from contrastlab import tracking
from contrastlab.config import METHOD_CONFIGS, reported_metrics
from contrastlab.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, CONTRASTLAB_METHODS="tests.toy_method", OMP_NUM_THREADS="1")
    paths = [str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _run(args: list[str], cwd: Path, timeout: int = 600) -> str:
    out = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_this_process_has_only_the_built_in_methods():
    assert "toy" not in METHODS and "toy" not in METHOD_CONFIGS
    assert "toy_align" not in reported_metrics()
    assert set(METHODS) == set(METHOD_CONFIGS)


def test_a_registered_method_reaches_configs_and_search_spaces(tmp_path):
    code = textwrap.dedent(
        """
        import json
        from contrastlab.config import ConfigError, make_config, metric_owners, reported_metrics
        from contrastlab.sweep.runner import smoke_space
        from contrastlab.sweep.space import space_from_dict
        from contrastlab.sweep.spec import SpaceError

        out = {}
        cfg = make_config({"method": {"name": "toy"}})  # imports tests.toy_method on a miss
        out["t"] = cfg.method.t
        for raw in ({"method": {"name": "toy", "tt": 1}},
                    {"method": {"name": "toy"}, "train": {"batch_size": 2}}):
            try:
                make_config(raw)
            except ConfigError as e:
                out.setdefault("errors", []).append(str(e))
        out["metric"] = list(reported_metrics()["toy_align"])
        out["owners"] = metric_owners("toy_align")
        space = {
            "method": "toy",
            "params": {"method.t": {"dist": "loguniform", "low": 0.5, "high": 4.0}},
            "metric": "toy_align", "mode": "min", "trials": 2, "budget": {"epochs": 2},
        }
        smoke = smoke_space(space_from_dict(space, "toy.yaml"))
        out["smoke_base"] = smoke.base
        out["smoke_params"] = list(smoke.param_paths)
        for bad in ({**space, "mode": "max"}, {**space, "method": "simclr", "params": {
                "method.temperature": {"dist": "uniform", "low": 0.1, "high": 0.5}}}):
            try:
                space_from_dict(bad, "bad.yaml")
            except SpaceError as e:
                out.setdefault("space_errors", []).append(str(e))
        print(json.dumps(out))
        """
    )
    res = json.loads(_run([sys.executable, "-c", code], tmp_path).splitlines()[-1])
    assert res["t"] == 2.0
    unknown, rule = res["errors"]
    assert "method.tt: unknown key (did you mean 't'?); allowed: name, t, weight" in unknown
    assert "train.batch_size must be >= 3 for the toy's uniformity term" in rule
    assert res["metric"] == ["min", 0.0, 4.0] and res["owners"] == ["toy"]
    # the smoke test takes the tiny setting and keeps the toy's own searched field
    assert res["smoke_base"]["method"] == {"t": 2.0} or "method.t" in res["smoke_params"]
    assert res["smoke_params"] == ["method.t"]
    assert res["smoke_base"]["model"]["width"] == 8
    wrong_mode, not_reported = res["space_errors"]
    assert "mode: toy_align is better when lower; allowed: mode: min" in wrong_mode
    assert "metric: toy_align is only reported by toy, not simclr" in not_reported


@pytest.mark.slow
def test_a_registered_method_sweeps_through_ray_into_mlflow(tmp_path):
    space = {
        "method": "toy",
        "params": {"method.t": {"dist": "loguniform", "low": 0.5, "high": 4.0}},
        "metric": "toy_align",
        "mode": "min",
        "trials": 2,
        "budget": {"epochs": 2},
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _run(
        [
            sys.executable,
            "-m",
            "contrastlab",
            "sweep",
            "--space",
            "toy.yaml",
            "--smoke-test",
            "--name",
            "toy-smoke",
            "--storage-path",
            str(tmp_path / "sweeps"),
            "--tracking-uri",
            uri,
        ],
        tmp_path,
    )
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("contrastlab-toy")
    runs = c.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3  # --smoke-test runs 3 trials
    for run in children:
        assert run.info.status in ("FINISHED", "KILLED"), run.info.status
        assert run.data.params["method.name"] == "toy"
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "toy_align"))
        assert steps and steps == list(range(1, len(steps) + 1))
        assert all(
            0.0 <= m.value <= 4.0 for m in c.get_metric_history(run.info.run_id, "toy_align")
        )
    assert any(r.info.status == "FINISHED" for r in children)


@pytest.mark.slow
def test_the_method_table_trains_a_registered_method(tmp_path):
    out = _run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "method_table.py"),
            "--smoke-test",
            "--methods",
            "toy",
            "--run-root",
            str(tmp_path / "runs"),
        ],
        tmp_path,
    )
    row = next(line for line in out.splitlines() if line.startswith("| `toy`"))
    assert row.startswith("| `toy` | tiny (smoke test) | ") and "% → " in row


@pytest.mark.slow
def test_the_step_benchmark_times_a_registered_method(tmp_path):
    _run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "bench.py"),
            "--smoke-test",
            "--methods",
            "toy",
            "--baseline",
            "none",
            "--out",
            str(tmp_path / "bench.json"),
        ],
        tmp_path,
    )
    (row,) = json.loads((tmp_path / "bench.json").read_text())["methods"]
    assert row["method"] == "toy" and row["views_per_image"] == 2
    assert row["views_per_s"] > 0 and row["augment_views_per_s"] > 0
