"""Method shootouts and accuracy-vs-compute sweeps: real smoke sweeps through Ray into MLflow,
the report's method table and Pareto front checked against what MLflow holds."""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

import pytest
import yaml

from contrastlab import tracking
from contrastlab.sweep.report import sweep_report
from contrastlab.sweep.reproduce import front_run
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import METHOD_KEY, ShootoutSpace, load_space, space_from_dict
from contrastlab.sweep.spec import SpaceError

ROOT = Path(__file__).resolve().parents[1]
SHOOTOUT = ROOT / "search_spaces" / "shootout.yaml"


def _raw() -> dict:
    return yaml.safe_load(SHOOTOUT.read_text())


# --------------------------------------------------------------------------- validation


def test_shootout_validates_each_method_against_its_own_config():
    space = load_space(SHOOTOUT)
    assert isinstance(space, ShootoutSpace)
    assert space.methods == ("simclr", "moco", "supcon")
    assert space.total_trials == 3 * space.trials
    moco = space.spaces["moco"]
    assert "method.queue_size" in moco.param_paths
    assert "method.queue_size" not in space.spaces["simclr"].param_paths
    cfg = space.config_for({METHOD_KEY: "moco", **{p.path: p.reference for p in moco.params}})
    assert cfg.method.name == "moco" and cfg.method.bn_mode == "shuffle"
    assert space_from_dict(space.to_dict(), SHOOTOUT) == space  # round trip


@pytest.mark.parametrize(
    "change, words",
    [
        # a method's field searched for a method that has no such field
        (
            lambda r: r["methods"]["simclr"]["params"].update(
                {"method.queue_size": {"dist": "categorical", "choices": [4096]}}
            ),
            ["method simclr", "params.method.queue_size", "a field of moco"],
        ),
        # a method's own field in the shared params
        (
            lambda r: r["params"].update(
                {"method.temperature": {"dist": "uniform", "low": 0.1, "high": 0.5}}
            ),
            ["params.method.temperature", "methods: {simclr"],
        ),
        (lambda r: r["methods"].update({"cmc": {}}), ["methods", "not in `method`"]),
        (lambda r: r.update(method=["simclr", "simclr"]), ["method", "listed twice"]),
        # a metric only MoCo reports: not one every method reports
        (lambda r: r.update(metric="moco_acc"), ["method simclr", "only reported by moco"]),
        (lambda r: r["base"].update(method={"temperature": 0.1}), ["base.method", "methods."]),
    ],
)
def test_bad_shootout_names_the_method_and_key(change, words):
    raw = _raw()
    change(raw)
    with pytest.raises(SpaceError) as e:
        space_from_dict(raw, "so.yaml")
    assert str(e.value).startswith("so.yaml: ")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_two_objectives_need_fifo_and_a_mode_each():
    raw = yaml.safe_load((ROOT / "search_spaces" / "simclr.yaml").read_text())
    raw.update(metric=["knn_top1", "train_seconds"], mode=["max", "min"])
    with pytest.raises(SpaceError, match="scheduler.*fifo"):
        space_from_dict(copy.deepcopy(raw), "mo.yaml")  # the file asks for asha
    del raw["scheduler"]
    space = space_from_dict(copy.deepcopy(raw), "mo.yaml")  # fifo by default
    assert space.scheduler.name == "fifo" and space.metric == "knn_top1"
    assert space.objectives == (("knn_top1", "max"), ("train_seconds", "min"))
    assert space_from_dict(space.to_dict(), "mo.yaml") == space
    for bad, words in (
        ({"mode": "max"}, "mode"),
        ({"mode": ["max", "max"]}, "train_seconds is better when lower"),
        ({"metric": ["knn_top1", "knn_top1"]}, "listed twice"),
    ):
        with pytest.raises(SpaceError, match=words):
            space_from_dict({**raw, **bad}, "mo.yaml")


# --------------------------------------------------------------------------- through Ray


@pytest.fixture(scope="module")
def shootout(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("shootout")
    uri = f"sqlite:///{tmp}/mlflow.db"
    space = smoke_space(load_space(SHOOTOUT), trials=2)
    out = run_sweep(space, name="so", storage_path=tmp / "sweeps", tracking_uri=uri)
    return uri, out, space, tmp


@pytest.mark.slow
def test_smoke_shootout_gives_every_method_the_same_trials_and_reports_them(shootout):
    uri, out, space, tmp = shootout
    c = tracking.client(uri)
    runs = tracking.child_runs(
        uri, c.get_run(out.parent_run_id).info.experiment_id, out.parent_run_id
    )
    by_method: dict[str, list] = {}
    for r in runs:
        by_method.setdefault(r.data.params[METHOD_KEY], []).append(r)
    assert {m: len(rs) for m, rs in by_method.items()} == {m: 2 for m in space.methods}
    for m, rs in by_method.items():  # each trial trained its method's own config
        assert {r.data.tags["contrastlab.method"] for r in rs} == {m}

    rep = sweep_report("so", tracking_uri=uri, out_dir=tmp / "report")
    table = rep.methods.set_index("method")
    assert list(table.index) == list(space.methods)
    for m, rs in by_method.items():
        row = table.loc[m]
        assert row["trials"] == len(rs)
        assert row["finished"] == sum(r.info.status == "FINISHED" for r in rs)
        assert row["stopped_early"] == sum(r.info.status == "KILLED" for r in rs)
        done = [
            c.get_metric_history(r.info.run_id, "knn_top1")
            for r in rs
            if r.info.status == "FINISHED"
        ]
        finals = [max(h, key=lambda x: x.step).value for h in done]
        if finals:
            assert row["best_knn_top1"] == max(finals)
            assert row["median_knn_top1"] == pytest.approx(statistics.median(finals))
        seconds = sum(
            sum(x.value for x in c.get_metric_history(r.info.run_id, "epoch_time_s")) for r in rs
        )
        assert row["trial_seconds"] == pytest.approx(seconds) and seconds > 0
        assert math.isnan(row["gpu_seconds"])  # CPU trials
    assert rep.files["compute"].read_bytes()[:4] == b"\x89PNG"
    assert "## Methods" in rep.text


@pytest.fixture(scope="module")
def two_objectives(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("pareto")
    uri = f"sqlite:///{tmp}/mlflow.db"
    raw = yaml.safe_load((ROOT / "search_spaces" / "simclr.yaml").read_text())
    raw.update(metric=["knn_top1", "train_seconds"], mode=["max", "min"])
    del raw["scheduler"]
    (tmp / "pareto.yaml").write_text(yaml.safe_dump(raw))  # the parent run logs the file
    space = smoke_space(load_space(tmp / "pareto.yaml"), trials=4)
    out = run_sweep(space, name="po", storage_path=tmp / "sweeps", tracking_uri=uri)
    return uri, out, space, tmp


@pytest.mark.slow
def test_two_objective_sweep_reports_a_pareto_front_of_non_dominated_trials(two_objectives):
    uri, out, space, tmp = two_objectives
    assert space.scheduler.name == "fifo"
    rep = sweep_report("po", tracking_uri=uri, out_dir=tmp / "report")
    c = tracking.client(uri)
    exp = c.get_run(out.parent_run_id).info.experiment_id
    # the values MLflow holds: each finished trial's last epoch of both objectives
    values = {}
    for r in tracking.child_runs(uri, exp, out.parent_run_id):
        if r.info.status != "FINISHED":
            continue
        last = [
            max(c.get_metric_history(r.info.run_id, m), key=lambda x: x.step).value
            for m in ("knn_top1", "train_seconds")
        ]
        values[r.info.run_id] = (last[0], -last[1])  # higher is better in both
    assert values, "no finished trial"

    def dominated(p):
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in values.values())

    front = [t["run_id"] for t in rep.front]
    assert front
    assert set(front) == {rid for rid, p in values.items() if not dominated(p)}
    assert rep.files["pareto"].read_bytes()[:4] == b"\x89PNG"
    for i, rid in enumerate(front):
        assert front_run(uri, "po", i) == rid
        assert f"--best-of po --front-index {i}" in rep.text and rid in rep.text


def test_a_restored_shootout_search_continues_where_it_stopped(tmp_path):
    """What ``--resume`` relies on: the round-robin position, each trial's method and every
    method's Optuna study come back from the saved state (no pickle of ours: JSON, and each
    OptunaSearch saves itself)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from contrastlab.sweep.per_method import PerMethodSearch

    def fresh():
        searchers = {
            m: OptunaSearch(
                space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
                metric="knn_top1",
                mode="max",
                seed=0,
            )
            for m in ("simclr", "moco")
        }
        return PerMethodSearch(searchers, "knn_top1", "max")

    before = fresh()
    first = [before.suggest(f"t{i}") for i in range(3)]
    before.on_trial_complete("t0", {"knn_top1": 50.0})
    path = str(tmp_path / "search.json")
    before.save(path)
    after = fresh()
    after.restore(path)
    assert after.suggested == 3 and after.owner == {"t0": "simclr", "t1": "moco", "t2": "simclr"}
    assert [c["method.name"] for c in first] == ["simclr", "moco", "simclr"]
    nxt = after.suggest("t3")  # the round-robin goes on with moco
    assert nxt["method.name"] == "moco"
    ref = before.suggest("t3")  # the same draw as the uninterrupted searcher
    assert nxt == ref
    done = after.searchers["simclr"]._ot_study.trials
    assert [t.state.name for t in done][:1] == ["COMPLETE"] and done[0].values == [50.0]
