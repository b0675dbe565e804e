"""Sweep spaces: every shipped file loads and samples valid configs; bad files are rejected
with the file, the key and what is allowed; Optuna sampling is conditional and seeded."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contrastlab.config import Config, ConfigError, reported_metrics
from contrastlab.methods import METHODS
from contrastlab.sweep.space import (
    DISTRIBUTIONS,
    SearchSpace,
    find_spaces,
    load_space,
    space_from_dict,
)
from contrastlab.sweep.spec import Param, SpaceError

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
# one-method spaces; a shootout (several methods) is tested in test_shootout.py
SHIPPED = [
    p for p in find_spaces(SPACES) if not isinstance(yaml.safe_load(p.read_text())["method"], list)
]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space: SearchSpace, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` param dicts a seeded TPE study draws (told a deterministic value)."""
    study = optuna.create_study(
        direction="maximize" if space.mode == "max" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    out = []
    for i in range(n):
        trial = study.ask()
        assert space.define_by_run(trial) == {}
        out.append(dict(trial.params))
        study.tell(trial, float((i * 7) % 5))
    return out


def _in_range(p: Param, value: Any) -> bool:
    if p.dist == "categorical":
        return value in p.choices
    if not p.low <= value <= p.high:
        return False
    return p.dist != "int" or (value - p.low) % (p.step or 1) == 0


# --------------------------------------------------------------------------- shipped files


def test_find_spaces_finds_the_shipped_files_and_skips_underscored(tmp_path):
    names = {p.name for p in SHIPPED}
    assert {"simclr.yaml", "supcon.yaml", "moco.yaml", "emp_ssl.yaml"} <= names
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("{}")
    (tmp_path / "sub" / "b.yaml").write_text("{}")
    (tmp_path / "_draft.yaml").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "ablations").mkdir()  # ablation specs: another format, loaded elsewhere
    (tmp_path / "ablations" / "c.yaml").write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in find_spaces(tmp_path)] == [
        "a.yaml",
        "sub/b.yaml",
    ]
    with pytest.raises(SpaceError, match="not found"):
        find_spaces(tmp_path / "missing")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_space_samples_valid_configs(path):
    space = load_space(path)
    assert space.name == path.stem and space.path == path
    assert space.metric in reported_metrics()
    assert 1 <= space.scheduler.grace_period <= space.epochs
    by_path = {p.path: p for p in space.params}
    for params in _sample(space, 10):
        assert params, "every trial samples something"
        cfg = space.config_for(params)
        assert isinstance(cfg, Config)
        assert cfg.method.name == space.method
        assert cfg.train.epochs == space.epochs
        flat = cfg.flat()
        for key, label in params.items():
            value = by_path[key].decode(label)  # a tuple field's choice is its JSON label
            assert flat[key] == value, key
            choice = tuple(value) if isinstance(value, list) else value
            assert _in_range(by_path[key], choice), (key, value)
        for key, value in space.base.get("data", {}).items():
            assert flat[f"data.{key}"] == value


def test_shipped_spaces_cover_the_usual_hyperparameters():
    searched = {p.path for path in SHIPPED for p in load_space(path).params}
    wanted = {
        "method.temperature",
        "method.num_patches",
        "method.eps",
        "method.queue_size",
        "method.momentum",
        "optim.lr",
        "optim.weight_decay",
        "train.batch_size",
    }
    assert wanted <= searched, wanted - searched
    assert {load_space(p).method for p in SHIPPED} == set(METHODS)  # one space per method


def test_moco_queue_sizes_fit_every_batch_size():
    space = load_space(SPACES / "moco.yaml")
    by_path = {p.path: p for p in space.params}
    for queue in by_path["method.queue_size"].choices:
        for batch in by_path["train.batch_size"].choices:
            assert queue % batch == 0


# --------------------------------------------------------------------------- sampling


def test_conditional_param_is_sampled_only_when_its_condition_holds():
    space = load_space(SPACES / "moco.yaml")
    conditional = [p for p in space.params if p.when]
    assert conditional, "moco.yaml ships a conditional param"
    p = conditional[0]
    (parent, wanted), *_ = p.when.items()
    fixed = space.config_for({}).flat()[p.path]  # the base/default value
    seen = set()
    for params in _sample(space, 40):
        holds = params[parent] == wanted
        seen.add(holds)
        assert (p.path in params) == holds, params
        value = space.config_for(params).flat()[p.path]
        assert value == (params[p.path] if holds else fixed)
    assert seen == {True, False}, "both branches come up in 40 trials"


def test_moco_v1_gets_a_linear_head_and_v2_the_sampled_mlp():
    space = load_space(SPACES / "moco.yaml")
    base = {"method.temperature": 0.1, "method.queue_size": 4096, "train.batch_size": 256}
    v1 = space.config_for({**base, "method.variant": "v1"})
    assert v1.method.variant == "v1" and v1.model.head == "linear"
    v2 = space.config_for({**base, "method.variant": "v2", "model.head_hidden_dim": 2048})
    assert v2.model.head == "mlp" and v2.model.head_hidden_dim == 2048


def _space(tmp_path, name: str = "space", **changes: Any) -> Path:
    raw: dict[str, Any] = {
        "method": "simclr",
        "params": {"method.temperature": {"dist": "loguniform", "low": 0.05, "high": 1.0}},
        "metric": "knn_top1",
        "mode": "max",
        "trials": 4,
        "budget": {"epochs": 10},
    }
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "metric, mode",
    [("rankme", "max"), ("alignment", "min"), ("uniformity", "min"), ("nuisance_r2", "min")],
)
def test_a_space_may_optimise_a_label_free_monitor(tmp_path, metric, mode):
    # no labels needed: any method may use them (ASHA then stops collapsed trials on rankme)
    for method in ("simclr", "cpc"):
        params = {"optim.lr": {"dist": "loguniform", "low": 0.01, "high": 1.0}}
        space = load_space(_space(tmp_path, metric=metric, mode=mode, method=method, params=params))
        assert space.metric == metric and space.mode == mode
        assert space.config_for(_sample(space, 1)[0]).eval.label_free


def test_nested_conditions_are_sampled_parents_first(tmp_path):
    # listed child-first in the file: the loader orders parents before children
    params = {
        "model.head_layers": {
            "dist": "int",
            "low": 2,
            "high": 3,
            "when": {"method.symmetric": True},
        },
        "method.symmetric": {
            "dist": "categorical",
            "choices": [True, False],
            "when": {"method.variant": "v2"},
        },
        "method.variant": {"dist": "categorical", "choices": ["v1", "v2"]},
        "optim.lr": {"dist": "loguniform", "low": 0.01, "high": 0.5, "when": {"optim.name": "sgd"}},
    }
    space = load_space(_space(tmp_path, method="moco", params=params))
    order = [p.path for p in space.params]
    assert order.index("method.variant") < order.index("method.symmetric")
    assert order.index("method.symmetric") < order.index("model.head_layers")
    for sampled in _sample(space, 40):
        assert "optim.lr" in sampled  # condition on a fixed value that holds
        assert ("method.symmetric" in sampled) == (sampled["method.variant"] == "v2")
        assert ("model.head_layers" in sampled) == (sampled.get("method.symmetric") is True)
        space.config_for(sampled)


def test_seeded_sampler_is_reproducible():
    space = load_space(SPACES / "moco.yaml")
    first = _sample(space, 12, seed=space.seed)
    assert first == _sample(space, 12, seed=space.seed)
    assert first != _sample(space, 12, seed=space.seed + 1)


def test_config_for_rejects_unknown_and_inactive_params():
    space = load_space(SPACES / "moco.yaml")
    with pytest.raises(SpaceError, match="moco.yaml.*method.temprature.*did you mean"):
        space.config_for({"method.temprature": 0.1})
    with pytest.raises(SpaceError, match="moco.yaml.*model.head_hidden_dim.*inactive"):
        space.config_for({"method.variant": "v1", "model.head_hidden_dim": 512})
    with pytest.raises(SpaceError, match="moco.yaml.*queue_size"):
        space.config_for({"method.queue_size": 100})
    assert space.config_for({}).method.name == "moco"  # unsampled params keep base/defaults


def test_with_overrides_returns_a_validated_space():
    space = load_space(SPACES / "simclr.yaml")
    smoke = space.with_overrides(
        trials=2,
        concurrency=1,
        epochs=1,
        resources={"gpus_per_worker": 0},
        base_overrides={
            "model": {"backbone": "convnet", "width": 8},
            "data": {"dataset": "digits"},
        },
    )
    assert isinstance(smoke, SearchSpace)
    assert (smoke.trials, smoke.concurrency, smoke.epochs) == (2, 1, 1)
    assert smoke.scheduler.grace_period == 1  # lowered to fit the budget
    assert smoke.resources.gpus_per_worker == 0 and smoke.resources.cpus_per_worker == 2
    assert smoke.base["model"] == {**space.base["model"], "backbone": "convnet", "width": 8}
    assert smoke.name == space.name and smoke.params == space.params
    cfg = smoke.config_for(_sample(smoke, 1)[0])
    assert cfg.train.epochs == 1 and cfg.model.backbone == "convnet"
    assert space.epochs == 100  # the original is untouched
    # a searched path is changed through param_overrides; None stops searching it
    small = space.with_overrides(
        param_overrides={
            "train.batch_size": {"dist": "categorical", "choices": [32, 64]},
            "optim.weight_decay": None,
        },
        base_overrides={"optim": {"weight_decay": 0.0}},
    )
    by_path = {p.path: p for p in small.params}
    assert by_path["train.batch_size"].choices == (32, 64)
    assert "optim.weight_decay" not in by_path
    assert small.config_for({}).optim.weight_decay == 0.0
    with pytest.raises(SpaceError, match="simclr.yaml.*trails.*did you mean 'trials'"):
        space.with_overrides(trails=2)
    with pytest.raises(SpaceError, match="simclr.yaml.*base.optim.lrr"):
        space.with_overrides(base_overrides={"optim": {"lrr": 0.1}})
    with pytest.raises(SpaceError, match="params.optim.lr: also fixed in base"):
        space.with_overrides(base_overrides={"optim": {"lr": 0.1}})


def test_to_dict_round_trips():
    for path in SHIPPED:
        space = load_space(path)
        again = space_from_dict(space.to_dict(), path)
        assert again == space


# --------------------------------------------------------------------------- rejections

_MOCO_COMBO = {
    "method.queue_size": {"dist": "categorical", "choices": [4096, 6400]},
    "train.batch_size": {"dist": "categorical", "choices": [256, 512]},
}

# (name, changes to a valid space, words the message must contain besides the file name)
BAD = [
    (
        "typo_param",
        {"params": {"method.temprature": {"dist": "uniform", "low": 0.1, "high": 1.0}}},
        ["params.method.temprature", "did you mean 'temperature'", "allowed: n_views, temperature"],
    ),
    (
        "not_of_method",
        {"params": {"method.queue_size": {"dist": "categorical", "choices": [1024]}}},
        ["params.method.queue_size", "'simclr'", "allowed: n_views, temperature"],
    ),
    (
        "low_above_high",
        {"params": {"optim.lr": {"dist": "uniform", "low": 1.0, "high": 0.1}}},
        ["params.optim.lr", "low (1.0) must be less than high (0.1)"],
    ),
    (
        "unknown_dist",
        {"params": {"optim.lr": {"dist": "gaussian", "low": 0.1, "high": 1.0}}},
        ["params.optim.lr.dist", "'gaussian'", "allowed: uniform, loguniform, int, categorical"],
    ),
    (
        "loguniform_zero",
        {"params": {"optim.lr": {"dist": "loguniform", "low": 0.0, "high": 1.0}}},
        ["params.optim.lr.low", "allowed: low > 0"],
    ),
    (
        "empty_choices",
        {"params": {"train.batch_size": {"dist": "categorical", "choices": []}}},
        ["params.train.batch_size.choices", "List should have at least 1 item"],
    ),
    (
        "unknown_top_key",
        {"trails": 8},
        [
            "trails",
            "did you mean 'trials'",
            "allowed: method, base, metric, mode, budget, concurrency, resources, params, "
            "scheduler, trials, seed",
        ],
    ),
    (
        "unknown_param_key",
        {"params": {"optim.lr": {"dist": "uniform", "low": 0.1, "high": 1.0, "step": 0.1}}},
        ["params.optim.lr.step", "allowed: dist, low, high, when"],
    ),
    (
        "grace_over_budget",
        {"scheduler": {"name": "asha", "grace_period": 20, "reduction_factor": 3}},
        ["scheduler.grace_period", "budget.epochs (10)", "allowed: 1 to 10"],
    ),
    (
        "reduction_factor_one",
        {"scheduler": {"name": "asha", "reduction_factor": 1}},
        ["scheduler.reduction_factor", "greater than or equal to 2 (got 1)"],
    ),
    (
        "metric_not_reported",
        {"metric": "accuracy"},
        ["metric", "'accuracy'", "allowed: loss, knn_top1, knn_top5"],
    ),
    (
        "knn_not_every_epoch",
        {"base": {"eval": {"knn_every": 5}}},
        ["base.eval.knn_every", "knn_top1", "allowed: eval: {knn_every: 1}"],
    ),
    (
        "invalid_value_at_range_end",
        {"method": "emp_ssl", "params": {"method.eps": {"dist": "uniform", "low": 0.0, "high": 1}}},
        ["params.method.eps: value 0.0 is invalid", "greater than 0"],
    ),
    (
        "moco_combo_not_divisible",
        {"method": "moco", "params": _MOCO_COMBO},
        ["method.queue_size: 6400", "train.batch_size: 512", "must be a multiple of"],
    ),
    (
        "fixed_in_base",
        {"base": {"method": {"temperature": 0.2}}},
        ["params.method.temperature", "also fixed in base"],
    ),
    (
        "epochs_as_param",
        {"params": {"train.epochs": {"dist": "int", "low": 10, "high": 100}}},
        ["params.train.epochs", "budget.epochs"],
    ),
    (
        "missing_required",
        {"metric": None},
        [
            "metric: required key is missing",
            "required: method, metric, mode, budget, params, trials",
        ],
    ),
    (
        "unknown_method",
        {"method": "byol"},
        ["method", "'byol'", "allowed: simclr, supcon, moco, emp_ssl"],
    ),
    (
        "float_dist_on_int_field",
        {"params": {"train.batch_size": {"dist": "uniform", "low": 64, "high": 512}}},
        ["params.train.batch_size", "allowed: dist: int"],
    ),
    (
        "yaml_reads_text",
        {"params": {"optim.lr": {"dist": "loguniform", "low": "1e-3", "high": 1.0}}},
        ["params.optim.lr.low", "must be a number", "1.0e-6"],
    ),
    (
        "int_step_misses_high",
        {
            "method": "emp_ssl",
            "params": {"method.num_patches": {"dist": "int", "low": 4, "high": 30, "step": 4}},
        },
        ["params.method.num_patches.step", "multiple of step (4)", "high: 28"],
    ),
    (
        "when_never_holds",
        {
            "params": {
                "optim.lr": {"dist": "uniform", "low": 0.1, "high": 1, "when": {"optim.name": "x"}}
            }
        },
        ["params.optim.lr.when.optim.name", "never holds", "'sgd'"],
    ),
    (
        "when_not_a_choice",
        {
            "method": "moco",
            "params": {
                "method.variant": {"dist": "categorical", "choices": ["v1", "v2"]},
                "method.momentum": {
                    "dist": "uniform",
                    "low": 0.9,
                    "high": 0.99,
                    "when": {"method.variant": "v3"},
                },
            },
        },
        ["params.method.momentum.when.method.variant", "'v3'", "allowed: 'v1', 'v2'"],
    ),
    (
        "base_invalid",
        {"base": {"optim": {"lrr": 0.1}}},
        ["base.optim.lrr", "did you mean 'lr'"],
    ),
    (
        "base_method_contradicts",
        {"base": {"method": {"name": "moco"}}},
        ["base.method.name", "'moco'", "top-level `method`"],
    ),
    (
        "mode_against_metric",
        {"mode": "min"},
        ["mode", "knn_top1", "allowed: mode: max"],
    ),
    (
        "metric_of_other_method",
        {"metric": "moco_acc", "mode": "max"},
        ["metric", "moco_acc", "allowed for simclr"],
    ),
    (
        "ddp_fractional_gpu",
        {"resources": {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0.5}},
        ["resources.gpus_per_worker", "NCCL", "allowed with workers > 1"],
    ),
    (
        "unknown_resource",
        {"resources": {"gpu": 1}},
        ["resources.gpu", "allowed: workers, cpus_per_worker, gpus_per_worker"],
    ),
    (
        "zero_trials",
        {"trials": 0},
        ["trials: Input should be greater than or equal to 1 (got 0)"],
    ),
    (
        "label_free_metric_switched_off",
        {"metric": "rankme", "base": {"eval": {"label_free": False}}},
        ["base.eval.label_free", "rankme", "allowed: eval: {label_free: true}"],
    ),
    (
        "label_free_metric_not_every_epoch",
        {"metric": "nuisance_r2", "mode": "min", "base": {"eval": {"knn_every": 2}}},
        ["base.eval.knn_every", "nuisance_r2", "allowed: eval: {knn_every: 1}"],
    ),
    (
        "rankme_minimised",
        {"metric": "rankme", "mode": "min"},
        ["mode", "rankme", "allowed: mode: max"],
    ),
]


@pytest.mark.parametrize("name, changes, words", BAD, ids=[b[0] for b in BAD])
def test_bad_space_is_rejected_naming_file_key_and_allowed(tmp_path, name, changes, words):
    changes = copy.deepcopy(changes)
    drop = [k for k, v in changes.items() if v is None]
    for k in drop:
        del changes[k]
    path = _space(tmp_path, name, **changes)
    if drop:
        raw = yaml.safe_load(path.read_text())
        for k in drop:
            del raw[k]
        path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError) as e:
        load_space(path)
    msg = str(e.value)
    assert f"{name}.yaml" in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    assert isinstance(e.value, ConfigError)


@pytest.mark.parametrize(
    "text, words",
    [
        ("- method: simclr\n", ["top level must be a mapping", "required"]),
        ("just a string\n", ["top level must be a mapping", "str"]),
        ("", ["empty", "required"]),
        ("method: simclr\nmethod: moco\n", ["found the key 'method' twice"]),
        ("method: [simclr\n", ["not valid YAML"]),
    ],
    ids=["list", "scalar", "empty", "duplicate_key", "broken_yaml"],
)
def test_file_that_is_not_a_space_mapping_is_rejected(tmp_path, text, words):
    path = tmp_path / "weird.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as e:
        load_space(path)
    assert "weird.yaml" in str(e.value)
    for word in words:
        assert word in str(e.value)
    with pytest.raises(SpaceError, match="nope.yaml: search space file not found"):
        load_space(tmp_path / "nope.yaml")


def test_several_problems_are_reported_together(tmp_path):
    path = _space(tmp_path, "many", trials=0, mode="up", seed=-1)
    with pytest.raises(SpaceError) as e:
        load_space(path)
    msg = str(e.value)
    assert "many.yaml: 3 problems" in msg
    assert "trials:" in msg and "mode:" in msg and "seed:" in msg


def test_when_on_a_default_that_moves_with_the_search_is_rejected(tmp_path):
    # model.head resolves to 'linear' for MoCo v1 and 'mlp' for v2: not a fixed value
    params = {
        "method.variant": {"dist": "categorical", "choices": ["v1", "v2"]},
        "model.head_hidden_dim": {
            "dist": "categorical",
            "choices": [512, 1024],
            "when": {"model.head": "mlp"},
        },
    }
    with pytest.raises(SpaceError, match="moving.yaml: model.head .*changes with the searched"):
        load_space(_space(tmp_path, "moving", method="moco", params=params))


# --------------------------------------------------------------------------- fuzzing

_VALID = {
    "uniform": ("optim.lr", {"dist": "uniform", "low": 0.1, "high": 0.5}),
    "loguniform": ("optim.lr", {"dist": "loguniform", "low": 0.01, "high": 0.5}),
    "int": ("train.batch_size", {"dist": "int", "low": 64, "high": 128}),
    "categorical": ("train.batch_size", {"dist": "categorical", "choices": [64, 128]}),
}
# what YAML's safe_load can produce
_YAML_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.dates(),
)
_YAML_ANY = st.recursive(
    _YAML_SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
_NOT_A_NUMBER = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.dates(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400]),
)
_NOT_AN_INT = st.one_of(_NOT_A_NUMBER, st.floats())
_BAD_CHOICES = st.one_of(
    st.just([]),
    st.none(),
    st.text(max_size=8),
    st.integers(),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
    st.lists(
        st.one_of(st.lists(st.integers(), max_size=2), st.just({"a": 1}), st.just(math.nan)),
        min_size=1,
        max_size=3,
    ),
)
_BAD_WHEN = st.one_of(
    st.just({}),
    st.text(max_size=5),
    st.integers(),
    st.lists(st.integers(), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=6), _YAML_SCALAR, min_size=1, max_size=2),
    st.fixed_dictionaries({"method.temperature": st.lists(st.integers(), max_size=2)}),
)


@st.composite
def _malformed(draw) -> tuple[str, Any]:
    dist = draw(st.sampled_from(DISTRIBUTIONS))
    path, spec = _VALID[dist]
    spec = dict(spec)
    numeric = dist != "categorical"
    options = ["dist", "extra", "when", "not_a_mapping"]
    options += ["low", "high", "step", "log", "drop_end"] if numeric else ["choices"]
    broken = draw(st.sampled_from(options))
    if broken == "dist":
        spec["dist"] = draw(_YAML_SCALAR.filter(lambda d: d not in DISTRIBUTIONS))
    elif broken == "extra":
        spec[draw(st.sampled_from(["lo", "max", "values", "choice", "seed"]))] = 1
    elif broken == "when":
        spec["when"] = draw(_BAD_WHEN)
    elif broken == "not_a_mapping":
        spec = draw(st.one_of(_YAML_SCALAR, st.lists(_YAML_SCALAR, max_size=3)))
    elif broken in ("low", "high"):
        spec[broken] = draw(_NOT_AN_INT if dist == "int" else _NOT_A_NUMBER)
    elif broken == "step":
        spec["step"] = draw(st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3)))
        if dist != "int":
            spec["step"] = 1  # float distributions take no step at all
    elif broken == "log":
        spec["log"] = draw(st.one_of(st.integers(), st.text(max_size=3), st.none()))
        if dist != "int":
            spec["log"] = True
    elif broken == "drop_end":
        del spec[draw(st.sampled_from(["low", "high"]))]
    else:
        spec["choices"] = draw(_BAD_CHOICES)
    return path, spec


def _with_param(path: str, spec: Any) -> dict[str, Any]:
    return {
        "method": "simclr",
        "params": {"method.temperature": {"dist": "uniform", "low": 0.1, "high": 0.5}, path: spec},
        "metric": "loss",
        "mode": "min",
        "trials": 2,
        "budget": {"epochs": 3},
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_malformed())
def test_malformed_param_spec_always_raises_space_error(case):
    path, spec = case
    with pytest.raises(SpaceError) as e:
        space_from_dict(_with_param(path, spec), "fuzz.yaml")
    assert str(e.value).startswith("fuzz.yaml: ")
    assert f"params.{path}" in str(e.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["optim.lr", "train.batch_size", "method.temperature", "method.n_views"]),
    st.dictionaries(
        st.sampled_from(["dist", "low", "high", "step", "log", "choices", "when", "x"]),
        st.one_of(st.sampled_from(DISTRIBUTIONS), _YAML_ANY),
        max_size=5,
    ),
)
def test_arbitrary_param_spec_loads_or_raises_space_error(path, spec):
    try:
        space = space_from_dict(_with_param(path, spec), "fuzz.yaml")
    except SpaceError as e:
        assert str(e).startswith("fuzz.yaml: ")
        return
    # whatever got through samples valid configs
    for params in _sample(space, 3):
        space.config_for(params)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["method", "base", "params", "budget", "scheduler", "resources", "seed"]),
        _YAML_ANY,
        max_size=3,
    )
)
def test_arbitrary_top_level_values_raise_space_error_only(changes):
    raw = {**_with_param("optim.lr", {"dist": "uniform", "low": 0.1, "high": 1.0}), **changes}
    try:
        space_from_dict(raw, "fuzz.yaml")
    except SpaceError as e:
        assert str(e).startswith("fuzz.yaml: ")


# --------------------------------------------------------------------------- augment.* fields

_AUG_PARAMS: dict[str, Any] = {
    "augment.recipe": {"dist": "categorical", "choices": ["simclr", "emp_ssl", "digits"]},
    "augment.channel_shuffle_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
    "augment.channel_gain": {"dist": "categorical", "choices": [[1.0, 1.0], [0.5, 1.5]]},
    "augment.crop_scale": {"dist": "categorical", "choices": [[0.08, 1.0], [0.3, 1]]},
}


def _aug_space(tmp_path, params: dict[str, Any] | None = None, name: str = "aug") -> Path:
    return _space(tmp_path, name, params=copy.deepcopy(params or _AUG_PARAMS))


def test_space_searching_recipe_and_tuple_fields_samples_valid_configs(tmp_path):
    space = load_space(_aug_space(tmp_path))
    by_path = {p.path: p for p in space.params}
    crop = by_path["augment.crop_scale"]
    assert crop.choices == ((0.08, 1.0), (0.3, 1.0))  # tuples, ints of a float field as floats
    assert crop.optuna_choices == ["[0.08, 1.0]", "[0.3, 1.0]"]  # scalars for Optuna
    seen: dict[str, set] = {p: set() for p in by_path}
    for params in _sample(space, 30):
        cfg = space.config_for(params)  # Optuna's labels are decoded
        aug = cfg.augment
        for path, value in params.items():
            seen[path].add(value)
            want = by_path[path].decode(value)
            got = getattr(aug, path.split(".")[1])
            assert (list(got) if isinstance(got, tuple) else got) == want, path
        # the searched recipe fills the fields not searched; the searched ones win
        if params["augment.recipe"] == "emp_ssl":
            assert (aug.blur_p, aug.solarize_p, aug.crop_ratio) == (0.1, 0.1, (1.0, 1.0))
        if params["augment.recipe"] == "digits":
            assert (aug.flip_p, aug.blur_p) == (0.0, 0.0)
    assert seen["augment.recipe"] == {"simclr", "emp_ssl", "digits"}
    assert seen["augment.crop_scale"] == {"[0.08, 1.0]", "[0.3, 1.0]"}
    # config_for takes the list itself as well as its label (e.g. a value read from MLflow)
    a = space.config_for({"augment.crop_scale": [0.3, 1.0], "augment.recipe": "emp_ssl"})
    b = space.config_for({"augment.crop_scale": "[0.3, 1.0]", "augment.recipe": "emp_ssl"})
    assert a == b and a.augment.crop_scale == (0.3, 1.0) and a.augment.recipe == "emp_ssl"


def test_tuple_choices_round_trip_through_yaml_and_mlflow_params(tmp_path):
    from contrastlab import tracking
    from contrastlab.sweep.report import rebuild_study

    space = load_space(_aug_space(tmp_path))
    raw = space.to_dict()
    assert raw["params"]["augment.crop_scale"]["choices"] == [[0.08, 1.0], [0.3, 1.0]]
    text = yaml.safe_dump(raw, sort_keys=False)  # plain YAML lists, no python/tuple tags
    assert "!!python" not in text
    again = space_from_dict(yaml.safe_load(text), space.path)
    assert again == space
    # a trial's config as MLflow logs it (tracking.log_params) and reads it back
    params = _sample(space, 1)[0]
    cfg = space.config_for(params)
    logged = {
        k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in cfg.flat().items()
    }
    back = {k: tracking.param_value(v) for k, v in logged.items()}
    crop = next(p for p in space.params if p.path == "augment.crop_scale")
    assert crop.encode(back["augment.crop_scale"]) == params["augment.crop_scale"]
    study = rebuild_study(
        [
            {
                "params": back,
                "status": "FINISHED",
                "value": 0.5,
                "curve": {1: 0.5},
                "run_id": "r",
                "epochs": 1,
            }
        ],
        space,
    )
    assert study.trials[0].params == params  # the report's study sees the sampled values


def test_every_augment_field_can_be_searched(tmp_path):
    """One space per field of AugmentConfig; a new field must be added here (and searchable)."""
    from contrastlab.config import AugmentConfig

    specs: dict[str, Any] = {
        "recipe": {"dist": "categorical", "choices": ["simclr", "digits"]},
        "crop_scale": {"dist": "categorical", "choices": [[0.08, 1.0], [0.2, 1.0]]},
        "crop_ratio": {"dist": "categorical", "choices": [[0.75, 1.3333], [1.0, 1.0]]},
        "flip_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "rotate_degrees": {"dist": "uniform", "low": 0.0, "high": 180.0},
        "rotate_fill": {"dist": "categorical", "choices": ["image", "zeros"]},
        "channel_shuffle_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "channel_gain": {"dist": "categorical", "choices": [[1.0, 1.0], [0.0, 2.0]]},
        "jitter_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "brightness": {"dist": "uniform", "low": 0.0, "high": 0.8},
        "contrast": {"dist": "uniform", "low": 0.0, "high": 0.8},
        "saturation": {"dist": "uniform", "low": 0.0, "high": 0.8},
        "hue": {"dist": "uniform", "low": 0.0, "high": 0.5},
        "grayscale_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "blur_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "blur_sigma": {"dist": "categorical", "choices": [[0.1, 2.0], [0.5, 1.0]]},
        "blur_kernel_frac": {"dist": "loguniform", "low": 0.05, "high": 0.2},
        "solarize_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "solarize_threshold": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "invert_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "normalize": {"dist": "categorical", "choices": [True, False]},
        "erase_p": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "erase_scale": {"dist": "categorical", "choices": [[0.02, 0.33], [0.1, 0.5]]},
        "erase_ratio": {"dist": "categorical", "choices": [[0.3, 3.3], [1.0, 1.0]]},
        "erase_value": {"dist": "categorical", "choices": [0.0, "random", -1.0]},
    }
    assert set(specs) == set(AugmentConfig.model_fields)
    for name, spec in specs.items():
        path = f"augment.{name}"
        space = load_space(_space(tmp_path, name, params={path: spec}))
        for params in _sample(space, 4):
            value = getattr(space.config_for(params).augment, name)
            p = space.params[0]
            want = p.decode(params[path])
            assert (list(value) if isinstance(value, tuple) else value) == want, path
    # erase_value is a number or 'random': a float range works as well
    space_from_dict(
        _with_param("augment.erase_value", {"dist": "uniform", "low": -1.0, "high": 1.0}), "x.yaml"
    )


BAD_AUG = [
    (
        "uniform_on_tuple",
        {"augment.crop_scale": {"dist": "uniform", "low": 0.08, "high": 1.0}},
        ["params.augment.crop_scale", "tuple field", "dist: categorical", "[[0.2, 1.0], ...]"],
    ),
    (
        "int_on_tuple",
        {"augment.channel_gain": {"dist": "int", "low": 1, "high": 2}},
        ["params.augment.channel_gain", "tuple field", "not int"],
    ),
    (
        "scalar_choice_on_tuple",
        {"augment.crop_scale": {"dist": "categorical", "choices": [0.08, 0.3]}},
        ["params.augment.crop_scale.choices", "0.08", "not a list", "a list of 2 numbers"],
    ),
    (
        "wrong_length",
        {"augment.erase_scale": {"dist": "categorical", "choices": [[0.1, 0.2, 0.3]]}},
        ["params.augment.erase_scale.choices", "has 3 values, not 2"],
    ),
    (
        "text_in_tuple",
        {"augment.blur_sigma": {"dist": "categorical", "choices": [[0.1, "two"]]}},
        ["params.augment.blur_sigma.choices", "'two' is not a finite number"],
    ),
    (
        "duplicate_tuple",
        {"augment.crop_scale": {"dist": "categorical", "choices": [[0.3, 1], [0.3, 1.0]]}},
        ["params.augment.crop_scale.choices", "[0.3, 1.0]", "listed twice"],
    ),
    (
        "invalid_tuple_value",
        {"augment.channel_gain": {"dist": "categorical", "choices": [[1.0, 1.0], [1.5, 0.5]]}},
        ["params.augment.channel_gain: value [1.5, 0.5] is invalid", "augment.channel_gain"],
    ),
    (
        "list_choice_on_scalar",
        {"augment.invert_p": {"dist": "categorical", "choices": [[0.1, 0.2]]}},
        ["params.augment.invert_p.choices", "allowed: scalars"],
    ),
    (
        "uniform_on_recipe",
        {"augment.recipe": {"dist": "uniform", "low": 0.0, "high": 1.0}},
        ["params.augment.recipe", "takes one of simclr, emp_ssl, digits", "dist: categorical"],
    ),
    (
        "unknown_recipe",
        {"augment.recipe": {"dist": "categorical", "choices": ["simclr", "fancy"]}},
        ["params.augment.recipe: value 'fancy' is invalid", "unknown recipe"],
    ),
    (
        "out_of_range_op",
        {"augment.rotate_degrees": {"dist": "uniform", "low": 0.0, "high": 200.0}},
        ["params.augment.rotate_degrees: value 200.0 is invalid", "less than or equal to 180"],
    ),
    (
        "bad_fill",
        {"augment.rotate_fill": {"dist": "categorical", "choices": ["image", "border"]}},
        ["params.augment.rotate_fill: value 'border' is invalid"],
    ),
]


@pytest.mark.parametrize("name, params, words", BAD_AUG, ids=[b[0] for b in BAD_AUG])
def test_bad_augment_param_is_rejected_naming_the_key(tmp_path, name, params, words):
    with pytest.raises(SpaceError) as e:
        load_space(_space(tmp_path, name, params=params))
    msg = str(e.value)
    assert f"{name}.yaml" in msg, msg
    for word in words:
        assert word in msg, (word, msg)


def test_smoke_space_keeps_a_searched_recipe(tmp_path):
    from contrastlab.sweep.runner import smoke_space

    space = load_space(_aug_space(tmp_path))
    smoke = smoke_space(space, trials=2, epochs=1)
    assert "augment.recipe" in smoke.param_paths  # not fixed to digits by the smoke base
    assert "recipe" not in smoke.base.get("augment", {})
    assert smoke.base["data"]["dataset"] == "digits"
    for params in _sample(smoke, 3):
        assert smoke.config_for(params).augment.recipe == params["augment.recipe"]
