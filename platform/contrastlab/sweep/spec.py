"""The parts every sweep spec shares: params, resources, metrics, budget checks, the YAML loader.

A search space (:mod:`contrastlab.sweep.space`) and an ablation spec
(:mod:`contrastlab.sweep.ablation`) are both YAML files naming a method, a base config, a metric
and a budget. The parts they have in common (strict pydantic models of their own fields, with
the config's error wording: key, rule, "did you mean", what is allowed) and the checks against
the method's config live here, so both formats say the same thing about the same mistake.

This module imports neither torch nor Optuna, so a driver can validate specs cheaply.
"""

from __future__ import annotations

import copy
import json
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from contrastlab.config import (
    LABEL_FREE_METRICS,
    METHOD_CONFIGS,
    SECTIONS,
    Config,
    ConfigError,
    did_you_mean,
    error_lines,
    import_method_modules,
    make_config,
    metric_owners,
    reported_metrics,
    rule,
    tiny_raw,
)

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep or an ablation runs, as opposed to what it searches (its spec): one set of
    options for ``contrastlab sweep`` and ``contrastlab ablate``, ``run_sweep`` and
    ``run_ablation``.

    Attributes:
        name: Sweep name (Tune experiment name; default ``<space>-<timestamp>``).
        storage_path: Where Tune keeps trials and checkpoints (shared storage on a cluster).
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        experiment: MLflow experiment (default: ``contrastlab-<spec name>``).
        resume: Continue the sweep ``name`` whose driver died; finished trials are kept.
        runner: ``direct`` (train in the trial process), ``trainer`` (Ray Train
            TorchTrainer), or ``auto`` (direct for one worker, trainer for more).
        max_failures: Restarts of a failed trial from its last checkpoint.
        ray_address: Ray cluster to join (default: ``$RAY_ADDRESS``, else a local Ray).
        reuse_actors: A finished trial's process runs the next trial of the same resources,
            skipping process start and imports; False (default) starts a fresh process per
            trial. Off by default: Ray reuses a process only if the trial that ran there (e.g.
            stopped by ASHA) ends its current epoch within ``TUNE_FUNCTION_THREAD_TIMEOUT_S``
            (2 s), else it errors the next trial (seen on 2 loaded cores with 1-2 s epochs; one
            such sweep then hung); for epochs longer than that the saved start-up is negligible.
    """

    name: str | None = None
    storage_path: str | Path = "sweeps"
    tracking_uri: str | None = None
    experiment: str | None = None
    resume: bool = False
    runner: str = "auto"
    max_failures: int = 0
    ray_address: str | None = None
    reuse_actors: bool = False

    def with_changes(self, **changes: Any) -> SweepOptions:
        """A copy with some options changed (``TypeError`` names an unknown one)."""
        return replace(self, **changes) if changes else self


class SweepSpec(Protocol):
    """What the Tune runner needs of a spec: a :class:`~contrastlab.sweep.space.SearchSpace`
    and an :class:`~contrastlab.sweep.ablation.AblationSpec` both provide it."""

    path: Path
    name: str
    method: str
    base: dict[str, Any]
    metric: str
    mode: str
    epochs: int
    concurrency: int
    resources: Resources

    def config_for(self, sampled: Mapping[str, Any]) -> Config: ...

    def to_dict(self) -> dict[str, Any]: ...


KNN_METRICS = ("knn_top1", "knn_top5")
SMOKE_SECTIONS = ("train.", "data.", "model.", "eval.")
"""A smoke test fixes these sections at the tiny setting rather than search them."""


def smoke_base(method: str) -> dict[str, dict[str, Any]]:
    """The base config of a smoke sweep or ablation of ``method``: its tiny config
    (:func:`contrastlab.config.tiny_raw`) with digits' recipe and the monitor every epoch (the
    scheduler compares trials epoch by epoch); the budget sets the epochs."""
    raw = tiny_raw(method)
    del raw["method"]["name"], raw["train"]["epochs"]
    raw["augment"] = {"recipe": "digits"}
    raw["eval"]["knn_every"] = 1
    raw["train"].update(precision="fp32", compile=False)
    return raw


def smoke_fixed(method: str) -> tuple[str, ...]:
    """Path prefixes a smoke sweep of ``method`` fixes instead of searching: the tiny sections
    and the method's ``smoke_fixed`` sizes."""
    return SMOKE_SECTIONS + tuple(f"method.{f}" for f in METHOD_CONFIGS[method].smoke_fixed)


MAX_SEED = 2**32 - 1  # numpy's seed range, which Optuna's samplers use


class SpaceError(ConfigError):
    """A search space is invalid. The message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Param:
    """One searched config field.

    Attributes:
        path: Dotted config path, ``section.field`` (e.g. ``method.temperature``).
        dist: One of :data:`DISTRIBUTIONS`.
        low: Lower end (inclusive) for ``uniform``/``loguniform``/``int``, else ``None``.
        high: Upper end (inclusive), as ``low``.
        step: Grid step of an ``int`` param (``None`` = 1).
        log: ``int`` sampled on a log scale (``loguniform`` is the float one).
        choices: The values of a ``categorical`` param, else ``None``. For a tuple field
            (``augment.crop_scale``, ``optim.betas``, ...) each choice is a tuple; Optuna, whose
            choices must be scalars, sees each one as its label, the JSON list text
            ``"[0.08, 1.0]"`` (:attr:`optuna_choices`, :meth:`encode`, :meth:`decode`).
        when: ``{path: value}``: the param is sampled only when every listed path has that
            value (a searched value, or the fixed one from ``base``/the config defaults).
    """

    path: str
    dist: str
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    when: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> Any:
        """The value that stands for this param when another one is being checked."""
        return self.choices[0] if self.choices is not None else self.low

    @property
    def ends(self) -> tuple[Any, ...]:
        """Values checked on load: both range ends, or every choice."""
        return self.choices if self.choices is not None else (self.low, self.high)

    @property
    def optuna_choices(self) -> list[Any]:
        """The choices as Optuna sees them: each tuple choice as its label (see ``choices``)."""
        return [choice_label(c) if isinstance(c, tuple) else c for c in self.choices or ()]

    def decode(self, value: Any) -> Any:
        """A value as Optuna gives it back (a tuple choice's label) -> the config value (a
        list); anything else is returned as is."""
        if isinstance(value, str) and self.choices is not None:
            for c in self.choices:
                if isinstance(c, tuple) and choice_label(c) == value:
                    return as_list(c)
        return value

    def encode(self, value: Any) -> Any:
        """A config value (e.g. a list read back from MLflow) -> the value Optuna knows: the
        label of the tuple choice equal to it; anything else is returned as is."""
        if isinstance(value, list | tuple) and self.choices is not None:
            for c in self.choices:
                if isinstance(c, tuple) and as_list(c) == as_list(value):
                    return choice_label(c)
        return value

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this param from an Optuna trial (its name in Optuna is :attr:`path`).

        Returns the config value: for a tuple field the chosen list (Optuna records its label).
        """
        if self.dist == "categorical":
            return self.decode(trial.suggest_categorical(self.path, self.optuna_choices))
        assert self.low is not None and self.high is not None
        if self.dist == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=self.step or 1, log=self.log
            )
        return trial.suggest_float(
            self.path, float(self.low), float(self.high), log=self.dist == "loguniform"
        )

    def to_dict(self) -> dict[str, Any]:
        """The param's YAML form (the value of ``params.<path>``)."""
        out: dict[str, Any] = {"dist": self.dist}
        if self.choices is not None:
            out["choices"] = [as_list(c) for c in self.choices]
        else:
            out["low"], out["high"] = self.low, self.high
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        if self.when:
            out["when"] = dict(self.when)
        return out


class SpecModel(BaseModel):
    """A part of a sweep spec as its YAML holds it: unknown keys raise, types are strict (no
    ``"3"`` for 3, no ``3.0`` or ``true`` for an integer, no nan), nothing mutates after parsing.
    Errors read like the config's (:func:`~contrastlab.config.error_lines`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form."""
        return self.model_dump()


def one_of(allowed: Callable[[], Iterable[str]], what: str) -> AfterValidator:
    """A text value that must be one of ``allowed()`` (looked up when validating); ``what``
    says what it is not, with ``{value}`` for the value."""

    def check(value: str) -> str:
        names = tuple(allowed())
        if value not in names:
            hint = did_you_mean(value, names)
            raise rule(f"{what.format(value=repr(value))}{hint}; allowed: {', '.join(names)}")
        return value

    return AfterValidator(check)


def _registered_methods() -> Iterable[str]:
    import_method_modules()  # a user's own methods (config.METHODS_ENV) are registered too
    return METHOD_CONFIGS


MethodName = Annotated[str, one_of(_registered_methods, "unknown method {value}")]
MetricName = Annotated[str, one_of(reported_metrics, "{value} is not a metric the trainer reports")]
Mode = Literal["max", "min"]
Base = dict[str, dict[str, Any] | None] | None
"""``base``: config sections to fields, as in a config file."""


class Budget(SpecModel):
    """``budget``: what each trial may spend."""

    epochs: int = Field(ge=1, description="epochs per trial, the most ASHA runs")


class Resources(SpecModel):
    """What one trial reserves.

    Attributes:
        workers: Training processes per trial; more than 1 means a DDP ``TorchTrainer``.
        cpus_per_worker: CPUs each worker reserves.
        gpus_per_worker: GPUs each worker reserves; below 1, several trials share a GPU.
    """

    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _gpu_shares(self) -> Resources:
        gpus, workers = self.gpus_per_worker, self.workers
        if gpus > 1 and gpus != int(gpus):
            raise rule(
                f"{gpus} is neither a fraction of one GPU nor a whole number of GPUs; allowed: "
                "0 to 1, or a whole number",
                at="gpus_per_worker",
            )
        if workers > 1 and 0 < gpus < 1:
            raise rule(
                f"{gpus} with workers: {workers} could put two DDP ranks of one trial on the same "
                "GPU, which NCCL refuses; allowed with workers > 1: a whole number of GPUs (or 0)",
                at="gpus_per_worker",
            )
        return self


class SpecFile(SpecModel):
    """What every sweep spec file holds: the method, its base config, the metric to optimise,
    the budget of each trial and what trials reserve. A format adds its own keys."""

    method: MethodName
    base: Base = None
    metric: MetricName
    mode: Mode
    budget: Budget
    concurrency: int = Field(default=1, ge=1, description="trials run at once")
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _base_fits(self) -> SpecFile:
        # the top-level method and budget are the only place these are set
        base, epochs = self.base or {}, self.budget.epochs
        m, t = base.get("method") or {}, base.get("train") or {}
        if "name" in m and m["name"] != self.method:
            raise rule(
                f"{m['name']!r} contradicts method: {self.method}; the method is set by the "
                "top-level `method` key: remove base.method.name",
                at="base.method.name",
            )
        if "epochs" in t and t["epochs"] != epochs:
            raise rule(
                f"{t['epochs']!r} contradicts budget.epochs ({epochs}); the budget sets the "
                "epochs of every trial: remove base.train.epochs",
                at="base.train.epochs",
            )
        return self


M = TypeVar("M", bound=SpecFile)


def parse_spec(model: type[M], data: Any, where: str) -> M:
    """Check a spec file's structure (keys, types, ranges of its own fields) into ``model``.

    Raises:
        SpaceError: One error listing every problem, the file (``where``) first.
    """
    required = ", ".join(n for n, f in model.model_fields.items() if f.is_required())
    if data is None:
        raise SpaceError(f"{where}: the file is empty; required keys: {required}")
    if not isinstance(data, Mapping):
        raise SpaceError(
            f"{where}: top level must be a mapping with the required keys {required}, "
            f"got {type(data).__name__}"
        )
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        raise SpaceError(problems(where, error_lines(e, model))) from None


def tuple_args(path: str, method: str | None) -> tuple[Any, ...] | None:
    """The element types of a tuple-typed config field (``(float, float)``), else None."""
    ann = field_annotation(path, method)
    return typing.get_args(ann) if typing.get_origin(ann) is tuple else None


def normalize_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, None] | tuple[None, str]:
    """``(value as nested tuples, None)`` if ``value`` fits a ``tuple[*args]`` field, else
    ``(None, why)``. Float elements become floats, so [0.08, 1] and [0.08, 1.0] are equal.
    """
    if not isinstance(value, list | tuple):
        return None, "not a list"
    variable = len(args) == 2 and args[1] is Ellipsis
    kinds = [args[0]] * len(value) if variable else list(args)
    if len(kinds) != len(value):
        return None, f"has {len(value)} values, not {len(args)}"
    out: list[Any] = []
    for v, kind in zip(value, kinds, strict=True):
        if typing.get_origin(kind) is tuple:
            inner, why = normalize_tuple(v, typing.get_args(kind))
            if inner is None:
                return None, f"{v!r} {why}"
            out.append(inner)
        elif kind is float:
            if not is_finite_number(v):
                return None, f"{v!r} is not a finite number"
            out.append(float(v))
        elif kind is int:
            if not is_integer(v):
                return None, f"{v!r} is not an integer"
            out.append(v)
        elif not is_scalar(v):
            return None, f"{v!r} is not a scalar"
        else:
            out.append(v)
    return tuple(out), None


def choice_label(choice: tuple[Any, ...]) -> str:
    """The label Optuna sees for a tuple choice: its JSON list text, as MLflow logs it."""
    return json.dumps(as_list(choice))


def as_list(x: Any) -> Any:
    """Tuples (nested too) -> lists: the YAML and config form of a tuple value."""
    return [as_list(v) for v in x] if isinstance(x, list | tuple) else x


def path_error(path: str, method: str | None, what: str) -> str | None:
    """Why ``path`` is not a config field of ``method`` that can be ``what``, else None."""
    parts = path.split(".")
    sections = ("method", *SECTIONS)
    if len(parts) != 2 or not all(parts):
        return f"must be section.field, e.g. method.temperature; sections: {', '.join(sections)}"
    section, name = parts
    if section == "method":
        if method is None:
            return None  # reported under `method`
        if name == "name":
            return "the method is set by the top-level `method` key, it cannot be " + what
        fields = tuple(sorted(f for f in METHOD_CONFIGS[method].model_fields if f != "name"))
        if name not in fields:
            owners = [m for m, c in METHOD_CONFIGS.items() if name in c.model_fields]
            owned = f" (a field of {', '.join(owners)})" if owners else ""
            return (
                f"method {method!r} has no field {name!r}{owned}{did_you_mean(name, fields)}; "
                f"allowed: {', '.join(fields)}"
            )
        return None
    if section not in SECTIONS:
        hint = did_you_mean(section, sections)
        return f"unknown section {section!r}{hint}; allowed: {', '.join(sections)}"
    fields = tuple(sorted(SECTIONS[section].model_fields))
    if name not in fields:
        hint = did_you_mean(name, fields)
        return f"{section} has no field {name!r}{hint}; allowed: {', '.join(fields)}"
    if path == "train.epochs" and what == "searched":
        return "the epochs of a trial are the budget: set budget.epochs instead"
    return None


def field_info(path: str, method: str | None) -> Any:
    """The pydantic FieldInfo of a valid ``section.field`` path (``method`` known for
    ``method.*`` paths)."""
    section, name = path.split(".")
    if section == "method":
        assert method is not None
        return METHOD_CONFIGS[method].model_fields[name]
    return SECTIONS[section].model_fields[name]


def field_annotation(path: str, method: str | None) -> Any:
    return field_info(path, method).annotation


def metric_errors(
    metric: str, mode: str, method: str, base_cfg: Config, searched: tuple[str, ...]
) -> list[str]:
    errs = []
    only = metric_owners(metric)
    if only is not None and method not in only:
        mine = [m for m in reported_metrics() if method in (metric_owners(m) or (method,))]
        errs.append(
            f"metric: {metric} is only reported by {', '.join(only)}, not {method}; allowed for "
            f"{method}: " + ", ".join(mine)
        )
    better = reported_metrics()[metric].mode
    if better is not None and mode != better:
        errs.append(
            f"mode: {metric} is better when {'higher' if better == 'max' else 'lower'}; "
            f"allowed: mode: {better}"
        )
    if metric in LABEL_FREE_METRICS:
        if "eval.label_free" in searched:
            errs.append(f"params.eval.label_free: cannot be searched with metric: {metric}")
        elif not base_cfg.eval.label_free:
            errs.append(
                f"base.eval.label_free: is false, but metric: {metric} is a label-free monitor "
                "that needs it; allowed: eval: {label_free: true}"
            )
    if metric in KNN_METRICS and not base_cfg.data.has_labels:
        errs.append(
            f"metric: {metric} needs labels, but base.data.labels is false and no labeled "
            "evaluation set is named (data.eval_root / data.eval_dataset); allowed: a label-free "
            f"metric ({', '.join(LABEL_FREE_METRICS)}) or name a labeled evaluation set"
        )
    if metric in KNN_METRICS or metric in LABEL_FREE_METRICS:
        if "eval.knn_every" in searched:
            errs.append(f"params.eval.knn_every: cannot be searched with metric: {metric}")
        elif base_cfg.eval.knn_every != 1:
            errs.append(
                f"base.eval.knn_every: is {base_cfg.eval.knn_every}, but metric: {metric} must be "
                "reported every epoch (the scheduler compares trials epoch by epoch); allowed: "
                "eval: {knn_every: 1}"
            )
    return errs


def resource_errors(res: Resources, base_cfg: Config, by_path: dict[str, Param]) -> list[str]:
    errs = []
    if res.gpus_per_worker == 0 and base_cfg.train.device == "cuda":
        errs.append(
            "resources.gpus_per_worker: is 0 but base.train.device is cuda; reserve GPUs or "
            "allowed: train.device auto/cpu"
        )
    w = res.workers
    if w > 1:
        batch = by_path.get("train.batch_size")
        if batch is None:
            bad = [] if base_cfg.train.batch_size % w == 0 else [base_cfg.train.batch_size]
        elif batch.dist == "categorical":
            bad = [c for c in batch.choices or () if not is_integer(c) or c % w]
        else:
            low = int(batch.low or 0)
            bad = [] if low % w == 0 and (batch.step or 1) % w == 0 else [low]
        if bad:
            errs.append(
                f"train.batch_size: {', '.join(map(repr, bad))} is not divisible by "
                f"resources.workers ({w}); the batch size is global and split over the workers"
            )
    return errs


def build_config(
    base: Mapping[str, Any], method: str, epochs: int, values: Mapping[str, Any]
) -> Config:
    raw = copy.deepcopy(dict(base))
    raw["method"] = {**(raw.get("method") or {}), "name": method}
    raw["train"] = {**(raw.get("train") or {}), "epochs": epochs}
    for path, value in values.items():
        section, name = path.split(".")
        raw[section] = {**(raw.get(section) or {}), name: value}
    return make_config(raw)


def problems(where: str, errs: list[str]) -> str:
    """``where: the problem`` or ``where: N problems:`` and one indented line each."""
    if len(errs) == 1:
        return f"{where}: {errs[0]}"
    return f"{where}: {len(errs)} problems:\n  " + "\n  ".join(errs)


def raise_errors(where: str, errs: list[str]) -> None:
    if errs:
        raise SpaceError(problems(where, errs))


def short_error(err: ConfigError) -> str:
    """A ConfigError's lines on one line, without the 'invalid config:' header."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and ln != "invalid config:"]
    return "; ".join(lines)


def prefix_base(err: ConfigError) -> str:
    """A ConfigError about ``base``, each key prefixed with ``base.``."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and ln != "invalid config:"]
    out = [f"base.{ln}" if re.match(r"[\w.]+[: ]", ln) else f"base: {ln}" for ln in lines]
    return out[0] if len(out) == 1 else "invalid base config: " + "; ".join(out)


def is_integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_finite_number(x: Any) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def is_scalar(x: Any) -> bool:
    if x is None or isinstance(x, str | bool | int):
        return True
    return isinstance(x, float) and math.isfinite(x)


def describe(x: Any) -> str:
    return f"{x!r} ({type(x).__name__})"


def show_values(values: Mapping[str, Any]) -> str:
    # tuple values (a tuple field's choices) as the lists the YAML has
    return "{" + ", ".join(f"{k}: {as_list(v)!r}" for k, v in values.items()) + "}"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (else the last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
