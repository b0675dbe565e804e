"""Malformed configs and ablation specs, generated: each is accepted or rejected with an error
that names the key, never a traceback from deep inside pydantic, torch or Ray."""

from __future__ import annotations

import copy
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contrastlab.config import METHOD_CONFIGS, SECTIONS, ConfigError, make_config
from contrastlab.sweep.ablation import AblationError, ablation_from_dict

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
FIELDS = [(s, f) for s, model in SECTIONS.items() for f in model.model_fields]
METHOD_FIELDS = sorted({f for c in METHOD_CONFIGS.values() for f in c.model_fields})


@st.composite
def broken_configs(draw):
    """A config dict with 1-3 fields (known or misspelt) set to arbitrary values."""
    raw: dict = {"method": {"name": draw(st.sampled_from(sorted(METHOD_CONFIGS)))}}
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            section, name = draw(st.sampled_from(FIELDS))
        else:
            section, name = "method", draw(st.sampled_from(METHOD_FIELDS))
        if draw(st.integers(0, 9)) == 0:
            name += "x"  # a typo
        raw.setdefault(section, {})[name] = draw(JUNK)
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_configs())
def test_malformed_configs_are_rejected_with_the_key(raw):
    try:
        make_config(raw)
    except ConfigError as e:
        bad = {f"{s}.{k}" for s, fields in raw.items() if isinstance(fields, dict) for k in fields}
        keys = {k.split(".")[-1] for k in bad} | {"method", "data.root"}
        assert any(k in str(e) for k in keys), (str(e), raw)


@pytest.mark.parametrize(
    "section, values, rule",
    [
        (
            "method",
            {"name": "emp_ssl", "num_patches": 1},
            r"method.num_patches.*greater than or equal to 2",
        ),
        ("method", {"name": "emp_ssl", "eps": 0.0}, r"method.eps.*greater than 0"),
        ("method", {"name": "emp_ssl", "eps": -1.0}, r"method.eps.*greater than 0"),
        ("method", {"name": "supcon", "contrast_count": 1}, r"method.contrast_count"),
        ("method", {"name": "moco", "queue_size": 1000}, r"queue_size \(1000\) must be a multiple"),
        ("method", {"name": "moco", "queue_size": -4}, r"method.queue_size"),
        ("train", {"batch_size": 1}, r"train.batch_size"),
        ("train", {"batch_size": -64}, r"train.batch_size"),
        ("data", {"image_size": 0}, r"data.image_size"),
        ("augment", {"crop_scale": [0.9, 0.1]}, r"crop_scale must satisfy 0 < low <= high"),
        ("optim", {"lr": "fast"}, r"optim.lr"),
        ("optim", {"name": "rmsprop"}, r"optim.name.*'sgd', 'lars' or 'adamw'"),
    ],
)
def test_each_documented_rule_is_named(section, values, rule):
    raw = {section: values}
    with pytest.raises(ConfigError, match=rule):
        make_config(raw)


VALID_SPEC = {
    "method": "moco",
    "base": {"data": {"dataset": "digits"}, "train": {"batch_size": 64}},
    "factors": {"method.queue_size": [128, 256]},
    "seeds": 2,
    "couple": {"optim.lr": {"follows": "method.queue_size", "rule": "sqrt", "reference": 128}},
    "metric": "knn_top1",
    "mode": "max",
    "budget": {"epochs": 2},
    "concurrency": 2,
    "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
}
SPEC_PATHS = [
    ("method",),
    ("factors",),
    ("factors", "method.queue_size"),
    ("seeds",),
    ("couple",),
    ("couple", "optim.lr"),
    ("couple", "optim.lr", "rule"),
    ("couple", "optim.lr", "reference"),
    ("metric",),
    ("mode",),
    ("budget",),
    ("budget", "epochs"),
    ("concurrency",),
    ("resources", "workers"),
    ("resources", "gpus_per_worker"),
    ("base", "train", "batch_size"),
    ("base", "method"),
    ("nonsense",),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SPEC_PATHS), JUNK)
def test_malformed_ablation_specs_are_rejected_with_the_key(path, value):
    spec = copy.deepcopy(VALID_SPEC)
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        ablation_from_dict(spec, "spec.yaml")
    except AblationError as e:
        msg = str(e)
        assert msg.startswith("spec.yaml: "), msg
        named = [p for p in path if p in msg] or re.findall(r"queue_size|batch_size|base", msg)
        assert named, (path, msg)
