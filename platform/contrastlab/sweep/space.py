"""Declarative sweep spaces for Ray Tune + Optuna, validated completely before any cluster work.

A search space is a YAML file (see ``search_spaces/README.md``)::

    method: moco
    base: {data: {dataset: cifar10, root: data/cifar10}}
    params:
      method.temperature: {dist: loguniform, low: 0.05, high: 0.5}
      train.batch_size: {dist: categorical, choices: [256, 512]}
    metric: knn_top1
    mode: max
    budget: {epochs: 100}
    trials: 64

:func:`load_space` checks everything a sweep could trip over later: unknown keys, types, ranges,
that every searched path is a field of the chosen method or section, that it is not also fixed
in ``base``, that the configs at the ends of every range and (when there are few) at every
combination of the categorical choices validate, the metric, the scheduler and the resources.
Every problem raises :class:`SpaceError`, whose message names the file, the key and what is
allowed. The Ray integration then only calls :meth:`SearchSpace.define_by_run` (Optuna) and
:meth:`SearchSpace.config_for` (the trial's :class:`~contrastlab.config.Config`).

This module imports neither torch nor Optuna, so a driver can validate spaces cheaply.
"""

from __future__ import annotations

import copy
import itertools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from contrastlab.config import Config, ConfigError, did_you_mean, rule
from contrastlab.sweep.spec import (
    MAX_SEED,
    Base,
    MethodName,
    MetricName,
    Mode,
    Param,
    Resources,
    SpaceError,
    SpecFile,
    SpecModel,
    UniqueKeyLoader,
    as_list,
    build_config,
    describe,
    field_annotation,
    field_info,
    is_integer,
    is_scalar,
    metric_errors,
    normalize_tuple,
    parse_spec,
    path_error,
    prefix_base,
    raise_errors,
    resource_errors,
    short_error,
    show_values,
    tuple_args,
)

if TYPE_CHECKING:
    import optuna


DISTRIBUTIONS = ("uniform", "loguniform", "int", "categorical")
ABLATIONS_DIR = "ablations"
"""Folder of ablation specs inside a search-space folder (skipped by :func:`find_spaces`)."""
MAX_COMBINATIONS = 256
"""Up to this many combinations of categorical choices are each built and validated on load."""


_MAX_INT = 2**53  # larger int ends lose precision in the float64 samplers


# --------------------------------------------------------------------------- file structure


class Asha(SpecModel):
    """Trial scheduler: ASHA early stopping on :attr:`SearchSpace.metric` (the default).

    Attributes:
        grace_period: Epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps the best ``1 / reduction_factor`` at each rung.
    """

    name: Literal["asha"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)


class Fifo(SpecModel):
    """Trial scheduler: every trial runs its whole budget."""

    name: Literal["fifo"] = "fifo"


Scheduler = Annotated[Asha | Fifo, Field(discriminator="name")]


def _not_text(value: Any) -> Any:
    """A number YAML read as text (``1e-3``: it wants a dot and a signed exponent) is named."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value  # the type check names it
        raise rule(
            f"must be a number, not the text {value!r}: YAML reads this as text; write floats "
            "with a dot and a signed exponent, e.g. 1.0e-6 or 1.0e+3"
        )
    return value


def _scalar(value: Any) -> Any:
    if not is_scalar(value):
        raise rule(f"value must be a scalar (compared with ==), got {describe(value)}")
    return value


Number = Annotated[float, BeforeValidator(_not_text)]
When = Annotated[dict[str, Annotated[Any, AfterValidator(_scalar)]], Field(min_length=1)] | None
"""``when``: ``{config path: value}``, every one must hold for the param to be sampled."""


class _ParamSpec(SpecModel):
    dist: str


class _RangeSpec(_ParamSpec):
    low: Number
    high: Number
    when: When = None

    @model_validator(mode="after")
    def _range(self) -> _RangeSpec:
        low, high = self.low, self.high
        step, log = getattr(self, "step", None), getattr(self, "log", False)
        if not low < high:
            raise rule(
                f"low ({low}) must be less than high ({high}); a value that is not searched "
                "belongs in base"
            )
        if self.dist == "loguniform" and low <= 0:
            raise rule(f"loguniform needs low > 0, got {low}; allowed: low > 0", at="low")
        if log and low < 1:
            raise rule(f"int with log: true needs low >= 1, got {low}", at="low")
        if log and step not in (None, 1):
            raise rule(f"int with log: true takes no step (got {step}); allowed: 1", at="step")
        if step is not None and (high - low) % step:
            raise rule(
                f"high - low ({high - low}) must be a multiple of step ({step}) so that high is "
                f"reachable; e.g. high: {low + (high - low) // step * step}",
                at="step",
            )
        return self


class UniformSpec(_RangeSpec):
    dist: Literal["uniform"]


class LogUniformSpec(_RangeSpec):
    dist: Literal["loguniform"]


class IntSpec(_RangeSpec):
    dist: Literal["int"]
    low: Annotated[int, BeforeValidator(_not_text), Field(ge=-_MAX_INT, le=_MAX_INT)]
    high: Annotated[int, BeforeValidator(_not_text), Field(ge=-_MAX_INT, le=_MAX_INT)]
    step: Annotated[int, Field(ge=1)] | None = None
    log: bool = False


class CategoricalSpec(_ParamSpec):
    dist: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)
    when: When = None


ParamSpec = Annotated[
    UniformSpec | LogUniformSpec | IntSpec | CategoricalSpec, Field(discriminator="dist")
]
"""One ``params`` entry as written; :func:`_param` checks it against the searched field."""


def _objectives(value: Any) -> str:
    """One objective (a name) or two (a list): only that form's errors are reported."""
    return "two" if isinstance(value, list) else "one"


class SpaceFile(SpecFile):
    """A search space file's structure (see the module docstring): its own keys, types and
    ranges. :func:`load_space` then checks it against the method's config."""

    metric: Annotated[
        Annotated[MetricName, Tag("one")]
        | Annotated[list[MetricName], Field(min_length=2, max_length=2), Tag("two")],
        Discriminator(_objectives),
    ]
    mode: Annotated[
        Annotated[Mode, Tag("one")]
        | Annotated[list[Mode], Field(min_length=2, max_length=2), Tag("two")],
        Discriminator(_objectives),
    ]
    params: dict[str, ParamSpec] = Field(min_length=1)
    scheduler: Scheduler = Asha()
    trials: int = Field(ge=1)
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="the sampler seed")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _asha_by_default(cls, value: Any) -> Any:
        return {"name": "asha", **value} if isinstance(value, dict) else value

    @model_validator(mode="before")
    @classmethod
    def _fifo_for_two_objectives(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("metric"), list):
            return {"scheduler": {"name": "fifo"}, **data}
        return data

    @model_validator(mode="after")
    def _fits(self) -> SpaceFile:
        epochs = self.budget.epochs
        metrics, modes = self.metric, self.mode
        if isinstance(metrics, list) or isinstance(modes, list):
            if not (isinstance(metrics, list) and isinstance(modes, list)):
                raise rule(
                    "two objectives need a list in both metric and mode, e.g. metric: "
                    "[knn_top1, train_seconds] with mode: [max, min]",
                    at="mode" if isinstance(metrics, list) else "metric",
                )
            if metrics[0] == metrics[1]:
                raise rule(
                    f"{metrics[0]} is listed twice; allowed: two different metrics", at="metric"
                )
            if isinstance(self.scheduler, Asha):
                # ASHA ranks trials on one metric: it would stop the trials that are on the
                # front by the other objective (e.g. cheap ones) before they report it
                raise rule(
                    "asha stops trials by one metric, which would cut trials that are on the "
                    "Pareto front by the other objective; a space with two objectives runs "
                    "every trial its whole budget: allowed: scheduler: {name: fifo} (the "
                    "default with two objectives)",
                    at="scheduler",
                )
        if isinstance(self.scheduler, Asha) and self.scheduler.grace_period > epochs:
            raise rule(
                f"{self.scheduler.grace_period} is more than budget.epochs ({epochs}); "
                f"allowed: 1 to {epochs}",
                at="scheduler.grace_period",
            )
        return self


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class SearchSpace:
    """A validated sweep: what to search, what to optimise, and with which budget.

    Build it with :func:`load_space` (or :func:`space_from_dict`); the constructor itself does
    not validate. ``params`` is ordered so that a param comes after every param its ``when``
    refers to.
    """

    path: Path
    name: str
    method: str
    base: dict[str, Any]
    params: tuple[Param, ...]
    metric: str
    mode: str
    epochs: int
    scheduler: Scheduler
    trials: int
    concurrency: int
    resources: Resources
    seed: int
    metrics: tuple[str, ...] = ()
    """With two objectives, both metrics (:attr:`metric` is the first); else empty."""
    modes: tuple[str, ...] = ()

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """``(metric, mode)`` of every objective: one, or two (accuracy vs compute)."""
        return tuple(zip(self.metrics, self.modes, strict=True)) or ((self.metric, self.mode),)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this space trains: one (see :class:`ShootoutSpace` for several)."""
        return (self.method,)

    @property
    def param_paths(self) -> tuple[str, ...]:
        """The searched paths, in sampling order."""
        return tuple(p.path for p in self.params)

    def is_active(self, param: Param, values: Mapping[str, Any]) -> bool:
        """Whether ``param`` is sampled, given the values of the params sampled before it.

        Conditions on fixed paths were checked to hold when the space was loaded, so only
        conditions on searched paths are evaluated here; a searched parent that is itself
        inactive (absent from ``values``) makes ``param`` inactive.
        """
        searched = self.param_paths
        return _is_active(param, values, searched)

    def define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest every active param on ``trial``.

        Args:
            trial: An Optuna trial (``study.ask()`` or the one Ray's ``OptunaSearch`` passes).

        Returns:
            ``{}``: the space has no constants; the sampled values are ``trial.params``.
        """
        values: dict[str, Any] = {}
        searched = self.param_paths
        for p in self.params:
            if _is_active(p, values, searched):
                values[p.path] = p.suggest(trial)
        return {}

    def config_for(self, sampled: Mapping[str, Any]) -> Config:
        """The trial's config: ``base`` + method name + budget epochs + the sampled values.

        Args:
            sampled: ``{dotted path: value}`` (``trial.params``). Params left out keep their
                ``base``/default value. A tuple field's value may be its Optuna label
                (``"[0.08, 1.0]"``) or the list itself.

        Returns:
            The validated :class:`Config`.

        Raises:
            SpaceError: An unknown path, a value for a param whose ``when`` does not hold, or
                values the config rejects.
        """
        if not isinstance(sampled, Mapping):
            raise SpaceError(f"{self.path}: sampled values must be a mapping, got {sampled!r}")
        searched = self.param_paths
        for key in sampled:
            if key not in searched:
                raise SpaceError(
                    f"{self.path}: {key!r} is not a param of this space"
                    f"{did_you_mean(str(key), searched)}; allowed: {', '.join(searched)}"
                )
        # Optuna's labels of tuple choices back to lists (other values pass through)
        by_path = {p.path: p for p in self.params}
        sampled = {k: by_path[k].decode(v) for k, v in sampled.items()}
        for p in self.params:
            if p.path in sampled and not _is_active(p, sampled, searched):
                raise SpaceError(
                    f"{self.path}: params.{p.path} was given but is inactive: its condition "
                    f"{show_values(p.when)} does not hold for {show_values(dict(sampled))}"
                )
        try:
            return build_config(self.base, self.method, self.epochs, sampled)
        except ConfigError as e:
            raise SpaceError(
                f"{self.path}: sampled values {show_values(dict(sampled))} give an invalid config: "
                f"{short_error(e)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The space in its YAML form (round-trips through :func:`space_from_dict`)."""
        return {
            "method": self.method,
            "base": copy.deepcopy(self.base),
            "params": {p.path: p.to_dict() for p in self.params},
            "metric": list(self.metrics) if self.metrics else self.metric,
            "mode": list(self.modes) if self.modes else self.mode,
            "budget": {"epochs": self.epochs},
            "scheduler": self.scheduler.to_dict(),
            "trials": self.trials,
            "concurrency": self.concurrency,
            "resources": self.resources.to_dict(),
            "seed": self.seed,
        }

    def with_overrides(self, **changes: Any) -> SearchSpace:
        """A copy with some settings changed, validated again (e.g. for ``--smoke-test``).

        Args:
            **changes: Any of ``method``, ``base`` (replaces it), ``base_overrides`` (merged
                deep into ``base``), ``params`` (mapping in YAML form, or Params; replaces
                them all), ``param_overrides`` (``{path: spec}`` replaces or adds one param,
                ``{path: None}`` stops searching it, e.g. to fix it in ``base``), ``metric``,
                ``mode``, ``epochs``, ``scheduler``/``resources`` (a model, or a mapping
                merged over the current one), ``trials``, ``concurrency``, ``seed``. Lowering
                ``epochs`` without passing ``scheduler`` lowers ASHA's ``grace_period`` to fit,
                and a ``train.epochs`` in ``base`` follows ``epochs``.

        Returns:
            The new, validated space (same :attr:`path` and :attr:`name`).

        Raises:
            SpaceError: An unknown change, or a result that does not validate.
        """
        allowed = (
            "method",
            "base",
            "base_overrides",
            "params",
            "param_overrides",
            "metric",
            "mode",
            "epochs",
            "scheduler",
            "trials",
            "concurrency",
            "resources",
            "seed",
        )
        for key in changes:
            if key not in allowed:
                raise SpaceError(
                    f"{self.path}: with_overrides: unknown setting {key!r}"
                    f"{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
                )
        raw = self.to_dict()
        for key in ("method", "metric", "mode", "trials", "concurrency", "seed"):
            if key in changes:
                raw[key] = changes[key]
        if "base" in changes:
            raw["base"] = copy.deepcopy(changes["base"])
        if "epochs" in changes:
            epochs = changes["epochs"]
            raw["budget"] = {"epochs": epochs}
            train = raw["base"].get("train") if isinstance(raw["base"], Mapping) else None
            if isinstance(train, dict) and "epochs" in train:
                train["epochs"] = epochs
            sched = raw["scheduler"]
            if "scheduler" not in changes and sched["name"] == "asha" and is_integer(epochs):
                sched["grace_period"] = max(1, min(sched["grace_period"], epochs))
        if "base_overrides" in changes:
            if not isinstance(changes["base_overrides"], Mapping):
                raise SpaceError(
                    f"{self.path}: with_overrides: base_overrides must be a mapping, "
                    f"got {changes['base_overrides']!r}"
                )
            if not isinstance(raw["base"], Mapping):
                raise SpaceError(f"{self.path}: with_overrides: base must be a mapping")
            raw["base"] = _deep_merge(raw["base"], changes["base_overrides"])
        if "params" in changes:
            params = changes["params"]
            if isinstance(params, Mapping):
                raw["params"] = copy.deepcopy(dict(params))
            elif isinstance(params, list | tuple) and all(isinstance(p, Param) for p in params):
                raw["params"] = {p.path: p.to_dict() for p in params}
            else:
                raw["params"] = params  # rejected by validation with the usual message
        if "param_overrides" in changes:
            po = changes["param_overrides"]
            if not isinstance(po, Mapping) or not isinstance(raw["params"], Mapping):
                raise SpaceError(
                    f"{self.path}: with_overrides: param_overrides must be a mapping of "
                    f"param paths to specs (or None to stop searching one), got {po!r}"
                )
            merged: dict[Any, Any] = dict(raw["params"])
            for key, spec in po.items():
                if spec is None:
                    merged.pop(key, None)
                else:
                    merged[key] = copy.deepcopy(spec.to_dict() if isinstance(spec, Param) else spec)
            raw["params"] = merged
        for key in ("scheduler", "resources"):
            if key not in changes:
                continue
            value = changes[key]
            if isinstance(value, SpecModel):
                raw[key] = value.to_dict()
            elif isinstance(value, Mapping):
                same = key != "scheduler" or value.get("name", raw[key]["name"]) == "asha"
                raw[key] = {**(raw[key] if same else {}), **value}
            else:
                raw[key] = value  # rejected by validation with the usual message
        return _validate(raw, self.path)


# --------------------------------------------------------------------------- method shootout


METHOD_KEY = "method.name"
"""The key of a shootout trial's method in its sampled values (what Tune's config holds)."""


class MethodBlock(SpecModel):
    """``methods.<name>`` of a shootout: that method's own base and searched params."""

    base: Base = None
    params: dict[str, ParamSpec] = {}


class ShootoutFile(SpaceFile):
    """A shootout file's structure: several methods, each with its own block (see
    :class:`ShootoutSpace`); the other keys are a search space's, shared by every method."""

    method: Annotated[list[MethodName], Field(min_length=2)]
    params: dict[str, ParamSpec] = {}
    methods: dict[MethodName, MethodBlock] = {}

    @model_validator(mode="after")
    def _blocks(self) -> ShootoutFile:
        listed = self.method
        twice = sorted({m for m in listed if listed.count(m) > 1})
        if twice:
            raise rule(f"{', '.join(twice)} listed twice; each method is listed once", at="method")
        extra = [m for m in self.methods if m not in listed]
        if extra:
            raise rule(
                f"{', '.join(extra)} has a block but is not in `method`; allowed: "
                + ", ".join(listed),
                at="methods",
            )
        return self


@dataclass(frozen=True)
class ShootoutSpace:
    """A method shootout: several methods searched side by side, on equal terms.

    The YAML names a list of methods; each method's own fields live in its block, so they are
    conditional on the method by construction::

        method: [simclr, moco, supcon]
        base: {data: {dataset: cifar10}}             # shared by every method
        params:                                      # shared: searched for every method
          optim.lr: {dist: loguniform, low: 0.05, high: 1.0}
        methods:
          moco:
            base: {method: {queue_size: 4096}}
            params: {method.temperature: {dist: loguniform, low: 0.05, high: 0.5}}
          simclr: {params: {method.temperature: {dist: loguniform, low: 0.05, high: 0.5}}}
        metric: knn_top1                             # every method must report it
        mode: max
        budget: {epochs: 100}                        # epochs per trial, for every method
        trials: 16                                   # trials PER METHOD

    Each method's block merged with the shared keys is validated as an ordinary
    :class:`SearchSpace` of that method (its config class owns the fields and the metrics it
    reports), so every error of a one-method space is caught here too, prefixed with the
    method. The runner gives every method its own Optuna study and hands out trials
    round-robin by trial number, so equal trial counts are a guarantee (one TPE study over a
    categorical method would favour the method that led early); with ASHA each method also
    gets its own rungs, so early stopping compares a method's trials with each other only.

    Attributes:
        path: The file.
        name: Its stem.
        spaces: ``{method: SearchSpace}``, in the file's order; they share every setting but
            the method, its base and its params.
    """

    path: Path
    name: str
    spaces: dict[str, SearchSpace]

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods, in the file's order (the round-robin order of trials)."""
        return tuple(self.spaces)

    @property
    def _first(self) -> SearchSpace:
        return next(iter(self.spaces.values()))

    @property
    def method(self) -> str:
        """The methods as one text (the parent run's ``contrastlab.method`` tag)."""
        return ",".join(self.methods)

    metric = property(lambda self: self._first.metric, doc="The (first) objective's metric.")
    mode = property(lambda self: self._first.mode, doc="The (first) objective's mode.")
    metrics = property(lambda self: self._first.metrics, doc="As SearchSpace.metrics.")
    modes = property(lambda self: self._first.modes, doc="As SearchSpace.modes.")
    objectives = property(lambda self: self._first.objectives, doc="As SearchSpace.objectives.")
    epochs = property(lambda self: self._first.epochs, doc="Epochs of every trial.")
    scheduler = property(lambda self: self._first.scheduler, doc="Each method's scheduler.")
    trials = property(lambda self: self._first.trials, doc="Trials per method.")
    concurrency = property(lambda self: self._first.concurrency, doc="Trials run at once.")
    resources = property(lambda self: self._first.resources, doc="What one trial reserves.")
    seed = property(lambda self: self._first.seed, doc="Every method's sampler seed.")

    @property
    def total_trials(self) -> int:
        """Trials of the whole shootout: :attr:`trials` for each method."""
        return self.trials * len(self.spaces)

    @property
    def param_paths(self) -> tuple[str, ...]:
        """:data:`METHOD_KEY`, then every method's searched paths (each once)."""
        paths = [METHOD_KEY]
        for sub in self.spaces.values():
            paths += [p for p in sub.param_paths if p not in paths]
        return tuple(paths)

    def config_for(self, sampled: Mapping[str, Any]) -> Config:
        """The trial's config: ``sampled[METHOD_KEY]`` picks the method, the rest are its
        sampled values (see :meth:`SearchSpace.config_for`).

        Raises:
            SpaceError: No or an unknown method, or what the method's space rejects.
        """
        if not isinstance(sampled, Mapping) or sampled.get(METHOD_KEY) not in self.spaces:
            got = sampled.get(METHOD_KEY) if isinstance(sampled, Mapping) else sampled
            raise SpaceError(
                f"{self.path}: sampled values need {METHOD_KEY}: one of "
                f"{', '.join(self.methods)}; got {got!r}"
            )
        rest = {k: v for k, v in sampled.items() if k != METHOD_KEY}
        return self.spaces[sampled[METHOD_KEY]].config_for(rest)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (round-trips through :func:`space_from_dict`): what every method's
        space has alike is shared, the rest goes in its block."""
        subs = {m: s.to_dict() for m, s in self.spaces.items()}
        first = next(iter(subs.values()))
        base: dict[str, Any] = {}
        for section, values in first["base"].items():
            if section == "method" or not isinstance(values, Mapping):
                continue
            same = {
                k: v
                for k, v in values.items()
                if all((d["base"].get(section) or {}).get(k, ...) == v for d in subs.values())
            }
            if same:
                base[section] = same
        params = {
            k: v
            for k, v in first["params"].items()
            if not k.startswith("method.") and all(d["params"].get(k) == v for d in subs.values())
        }
        blocks: dict[str, Any] = {}
        for m, d in subs.items():
            own_base = {
                section: {k: v for k, v in (values or {}).items() if k not in base.get(section, {})}
                for section, values in d["base"].items()
            }
            own_base = {k: v for k, v in own_base.items() if v}
            own_params = {k: v for k, v in d["params"].items() if k not in params}
            blocks[m] = {
                **({"base": own_base} if own_base else {}),
                **({"params": own_params} if own_params else {}),
            }
        out = {"method": list(subs), "base": base, "params": params, "methods": blocks}
        out.update({k: v for k, v in first.items() if k not in ("method", "base", "params")})
        return out

    def with_overrides(self, **changes: Any) -> ShootoutSpace:
        """Every method's space with the same changes (:meth:`SearchSpace.with_overrides`;
        ``trials`` is per method; ``method`` cannot change)."""
        if "method" in changes:
            raise SpaceError(
                f"{self.path}: with_overrides: a shootout's methods are its file's `method` "
                "list; change the file"
            )
        return self.map(lambda sub: sub.with_overrides(**changes))

    def map(self, fn: Any) -> ShootoutSpace:
        """A shootout of ``fn(space)`` for every method's space (e.g. its smoke version)."""
        spaces = {m: fn(s) for m, s in self.spaces.items()}
        shootout = ShootoutSpace(self.path, self.name, spaces)
        return _validate_shootout(shootout.to_dict(), self.path)


def _validate_shootout(data: Mapping[str, Any], path: Path) -> ShootoutSpace:
    """A shootout file (:class:`ShootoutFile`), then every method's merged space."""
    where = str(path)
    f = parse_spec(ShootoutFile, data, where)
    errs = []
    if "method" in (f.base or {}):
        errs.append(
            "base.method: a method's fields differ by method; put them in methods.<name>.base "
            "(e.g. methods: {moco: {base: {method: {queue_size: 4096}}}})"
        )
    for key in f.params:
        if key.startswith("method."):
            errs.append(
                f"params.{key}: a method's own field is searched in its block, e.g. "
                f"methods: {{{f.method[0]}: {{params: {{{key}: ...}}}}}}"
            )
    blocks = data.get("methods") or {}
    for m, block in f.methods.items():
        for key in block.params:
            if key in f.params:
                errs.append(
                    f"methods.{m}.params.{key}: also in the shared params; a param is either "
                    "shared or a method's own: remove one"
                )
    raise_errors(where, errs)
    shared = {k: v for k, v in data.items() if k not in ("method", "methods", "base", "params")}
    spaces: dict[str, SearchSpace] = {}
    for m in f.method:
        block = blocks.get(m) or {}
        raw = {
            **copy.deepcopy(shared),
            "method": m,
            "base": _deep_merge(data.get("base") or {}, block.get("base") or {}),
            "params": {**copy.deepcopy(data.get("params") or {}), **(block.get("params") or {})},
        }
        try:
            spaces[m] = _validate_one(raw, path)
        except SpaceError as e:
            text = str(e).removeprefix(f"{where}: ")
            raise SpaceError(
                f"{where}: method {m} (methods.{m} with the shared keys): {text}"
            ) from None
    return ShootoutSpace(path, path.stem, spaces)


# --------------------------------------------------------------------------- public loading


def load_space(path: str | Path) -> SearchSpace | ShootoutSpace:
    """Read and fully validate a search space file.

    Args:
        path: A YAML file (read with a ``yaml.SafeLoader`` that also rejects duplicate keys).

    Returns:
        The validated :class:`SearchSpace` (a :class:`ShootoutSpace` when ``method`` is a
        list); its ``name`` is the file stem.

    Raises:
        SpaceError: Anything wrong with the file; the message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: search space file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"{path}: cannot read the file: {e}") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from None
    return _validate(data, path)


def space_from_dict(data: Any, path: str | Path = "<dict>") -> SearchSpace | ShootoutSpace:
    """Validate an already-parsed space (the YAML form) into a :class:`SearchSpace`.

    Args:
        data: The mapping a space file holds.
        path: Where it came from; used in messages and for :attr:`SearchSpace.name`.

    Raises:
        SpaceError: As :func:`load_space`.
    """
    return _validate(copy.deepcopy(data), Path(path))


def find_spaces(root: str | Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` file under ``root``, recursively, sorted.

    Files or folders (below ``root``) whose name starts with ``_`` (drafts, shared snippets) or
    ``.`` (hidden) are skipped, and so is the ``ablations/`` folder directly below ``root``: it
    holds ablation specs (:mod:`contrastlab.sweep.ablation`), a different format.

    Raises:
        SpaceError: ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SpaceError(f"{root}: search space folder not found")
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(("_", ".")) for part in rel) or rel[0] == ABLATIONS_DIR:
            continue
        if p.is_file() and p.suffix in (".yaml", ".yml"):
            out.append(p)
    return sorted(out)


# --------------------------------------------------------------------------- validation


def _validate(data: Any, path: Path) -> SearchSpace | ShootoutSpace:
    """Check a space's structure (:class:`SpaceFile`), then each part against the method's
    config; raise one :class:`SpaceError` listing the problems of the first stage that has any.
    A list of methods makes a :class:`ShootoutSpace` (see :func:`_validate_shootout`).
    """
    if isinstance(data, Mapping) and isinstance(data.get("method"), list):
        return _validate_shootout(data, path)
    return _validate_one(data, path)


def _validate_one(data: Any, path: Path) -> SearchSpace:
    where = str(path)
    f = parse_spec(SpaceFile, data, where)
    method, base, epochs = f.method, copy.deepcopy(f.base or {}), f.budget.epochs
    errs: list[str] = []
    parsed = [p for key, spec in f.params.items() if (p := _param(key, spec, method, errs))]
    raise_errors(where, errs)

    # ---- base must be a valid config on its own
    try:
        base_cfg = build_config(base, method, epochs, {})
    except ConfigError as e:
        raise SpaceError(f"{where}: {prefix_base(e)}") from None
    base_flat = base_cfg.flat()

    # ---- params against the method, the base and each other
    for p in parsed:
        section, name = p.path.split(".")
        fixed = base.get(section)
        if isinstance(fixed, Mapping) and name in fixed:
            errs.append(
                f"params.{p.path}: also fixed in base ({section}: {{{name}: {fixed[name]!r}}}); "
                "a path is either searched or fixed: remove one"
            )
        errs.extend(_field_kind_errors(p, method))
    ordered = _order(parsed, errs)
    raise_errors(where, errs)
    searched = tuple(p.path for p in ordered)
    by_path = {p.path: p for p in ordered}
    for p in ordered:
        errs.extend(_when_errors(p, by_path, base_flat))
    raise_errors(where, errs)
    required: dict[str, dict[str, Any]] = {}
    for p in ordered:
        req = _conditions(p, by_path, errs)
        if req is not None:
            required[p.path] = req
    raise_errors(where, errs)

    # ---- metric, schedule, resources against the resolved base config
    metrics = tuple(f.metric) if isinstance(f.metric, list) else (f.metric,)
    modes = tuple(f.mode) if isinstance(f.mode, list) else (f.mode,)
    for metric, mode in zip(metrics, modes, strict=True):
        errs.extend(metric_errors(metric, mode, method, base_cfg, searched))
    errs.extend(resource_errors(f.resources, base_cfg, by_path))
    raise_errors(where, errs)

    space = SearchSpace(
        path=path,
        name=path.stem,
        method=method,
        base=base,
        params=tuple(ordered),
        metric=metrics[0],
        mode=modes[0],
        epochs=epochs,
        scheduler=f.scheduler,
        trials=f.trials,
        concurrency=f.concurrency,
        resources=f.resources,
        seed=f.seed,
        metrics=metrics if len(metrics) > 1 else (),
        modes=modes if len(modes) > 1 else (),
    )
    _check_values(space, required, base_flat)
    return space


def _check_values(space: SearchSpace, required: dict[str, dict[str, Any]], base_flat: dict) -> None:
    """Build configs at every range end / choice and every categorical combination."""
    where = str(space.path)
    searched = space.param_paths
    # fixed values the conditions rely on must not move with the searched values
    fixed_when = sorted({k for p in space.params for k in p.when if k not in searched})

    def build(values: Mapping[str, Any]) -> str | None:
        try:
            cfg = build_config(space.base, space.method, space.epochs, values)
        except ConfigError as e:
            return short_error(e)
        flat = cfg.flat() if fixed_when else {}
        for key in fixed_when:
            if flat[key] != base_flat[key]:
                raise SpaceError(
                    f"{where}: {key} is used in a `when` condition but its resolved value "
                    f"changes with the searched values ({base_flat[key]!r} in base, "
                    f"{flat[key]!r} with {show_values(dict(values))}); condition on a searched "
                    "param or fix it in base"
                )
        return None

    def reference(values: dict[str, Any]) -> dict[str, Any]:
        # every other active param, in sampling order, at its reference value
        out: dict[str, Any] = {}
        for q in space.params:
            if q.path in values:
                out[q.path] = values[q.path]
            elif _is_active(q, out, searched):
                out[q.path] = q.reference
        return out

    # 1. each value on its own (with its conditions): a failure that persists with the other
    #    params at their reference values is this value's fault
    for p in space.params:
        for value in p.ends:
            alone = {**required[p.path], p.path: value}
            err = build(alone)
            if err is not None and build(reference(alone)) is not None:
                shown = as_list(value)  # a tuple field's choice as written in YAML
                raise SpaceError(f"{where}: params.{p.path}: value {shown!r} is invalid: {err}")
    # 2. each value beside the others' reference values (catches combinations with
    #    non-categorical params too)
    for p in space.params:
        for value in p.ends:
            ref = reference({**required[p.path], p.path: value})
            err = build(ref)
            if err is not None:
                raise SpaceError(
                    f"{where}: params: the combination {show_values(ref)} is invalid: {err}"
                )

    categorical = [p for p in space.params if p.dist == "categorical"]
    if not categorical or math.prod(len(p.choices or ()) for p in categorical) > MAX_COMBINATIONS:
        return
    seen: set[tuple[tuple[str, str], ...]] = set()
    for combo in itertools.product(*(p.choices or () for p in categorical)):
        chosen = dict(zip((p.path for p in categorical), combo, strict=True))
        values: dict[str, Any] = {}
        for q in space.params:
            if _is_active(q, values, searched):
                values[q.path] = chosen.get(q.path, q.low)
        key = tuple(sorted((k, repr(v)) for k, v in values.items()))
        if key in seen:
            continue
        seen.add(key)
        err = build(values)
        if err is not None:
            shown = {k: v for k, v in values.items() if k in chosen}
            raise SpaceError(
                f"{where}: params: the combination {show_values(shown)} is invalid "
                f"(other params at their low end): {err}"
            )


def _param(path: str, spec: ParamSpec, method: str, errs: list[str]) -> Param | None:
    """One ``params`` entry against the method's config: the path is a field, the distribution
    fits the field's kind, the choices its type, the conditions name fields. Problems go to
    ``errs``."""
    key = f"params.{path}"
    n_errs = len(errs)
    why = path_error(path, method, what="searched") or _dist_kind_error(path, method, spec.dist)
    if why is not None:
        errs.append(f"{key}: {why}")
        return None
    when = dict(spec.when or {})
    for cond in when:
        why = "a param cannot depend on itself" if cond == path else None
        why = why or path_error(cond, method, what="conditioned on")
        if why is not None:
            errs.append(f"{key}.when.{cond}: {why}")
    if not isinstance(spec, CategoricalSpec):
        step, log = (spec.step, spec.log) if isinstance(spec, IntSpec) else (None, False)
        p = Param(path, spec.dist, low=spec.low, high=spec.high, step=step, log=log, when=when)
        return p if len(errs) == n_errs else None
    args = tuple_args(path, method)
    choices = (
        _tuple_choices(key, spec.choices, args, errs)
        if args is not None
        else _choices(key, spec.choices, errs)
    )
    return Param(path, spec.dist, choices=choices, when=when) if len(errs) == n_errs else None


def _choices(key: str, choices: list[Any], errs: list[str]) -> tuple[Any, ...] | None:
    seen: list[tuple[type, Any]] = []
    for c in choices:
        if not is_scalar(c):
            errs.append(
                f"{key}.choices: {describe(c)} is not allowed; allowed: scalars "
                "(numbers, strings, true/false, null)"
            )
            return None
        if (type(c), c) in seen:
            errs.append(f"{key}.choices: {c!r} is listed twice")
            return None
        seen.append((type(c), c))
    return tuple(choices)


def _tuple_choices(
    key: str, choices: list[Any], args: tuple[Any, ...], errs: list[str]
) -> tuple[Any, ...] | None:
    """Choices of a tuple field: each one a list matching the field (kept as tuples)."""
    out: list[tuple[Any, ...]] = []
    for c in choices:
        value, why = normalize_tuple(c, args)
        if value is None:
            errs.append(
                f"{key}.choices: {describe(c)} is not allowed: {why}; this field is a tuple, "
                f"each choice must be {_tuple_kind(args)}, e.g. {_tuple_example(args)}"
            )
            return None
        if value in out:
            errs.append(f"{key}.choices: {as_list(value)!r} is listed twice")
            return None
        out.append(value)
    return tuple(out)


def _tuple_kind(args: tuple[Any, ...]) -> str:
    """What a value of a ``tuple[*args]`` field looks like in YAML."""
    if len(args) == 2 and args[1] is Ellipsis:
        return "a list"
    return f"a list of {len(args)} {'numbers' if all(a is float for a in args) else 'values'}"


def _tuple_example(args: tuple[Any, ...]) -> str:
    if all(a is float for a in args) and len(args) == 2:
        return "[0.08, 1.0]"
    return "[...]"


def _dist_kind_error(path: str, method: str | None, dist: str) -> str | None:
    """A distribution that cannot produce values of the field's kind (tuple, choice list)."""
    ann = field_annotation(path, method)
    if typing.get_origin(ann) is tuple and dist != "categorical":
        default = field_info(path, method).default
        shown = f"[{as_list(default)!r}, ...]" if default is not None else "[[...], [...]]"
        return (
            f"is a tuple field ({_type_name(ann)}); only dist: categorical can search it, with "
            f"lists as choices, e.g. {{dist: categorical, choices: {shown}}}; not {dist}"
        )
    if typing.get_origin(ann) is typing.Literal and dist != "categorical":
        allowed = ", ".join(str(a) for a in typing.get_args(ann))
        return (
            f"takes one of {allowed}; allowed: dist: categorical with those as choices, not {dist}"
        )
    return None


def _type_name(ann: Any) -> str:
    return str(ann).replace("typing.", "")


def _field_kind_errors(p: Param, method: str) -> list[str]:
    """A float distribution on an integer field would sample values the config rejects."""
    ann = field_annotation(p.path, method)
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    args = typing.get_args(ann) if union else (ann,)
    kinds = {a for a in args if a is not type(None)}
    if p.dist in ("uniform", "loguniform") and kinds == {int}:
        return [
            f"params.{p.path}: is an integer field; allowed: dist: int (or categorical), "
            f"not {p.dist}"
        ]
    if p.dist != "categorical" and kinds == {bool}:
        return [
            f"params.{p.path}: is a true/false field; allowed: dist: categorical with "
            "choices: [true, false]"
        ]
    return []


def _order(params: list[Param], errs: list[str]) -> list[Param]:
    """Params sorted so that each comes after the searched params its ``when`` names.

    Stable: otherwise file order. A cycle is reported in ``errs``.
    """
    paths = {p.path for p in params}
    placed: list[Param] = []
    done: set[str] = set()
    todo = list(params)
    while todo:
        for p in todo:
            if all(k in done for k in p.when if k in paths):
                placed.append(p)
                done.add(p.path)
                todo.remove(p)
                break
        else:
            cycle = ", ".join(f"params.{p.path}" for p in todo)
            errs.append(f"{cycle}: their `when` conditions depend on each other in a cycle")
            return placed + todo
    return placed


def _when_errors(p: Param, by_path: dict[str, Param], base_flat: dict[str, Any]) -> list[str]:
    """Each condition must be able to hold (else the param would never be sampled)."""
    errs = []
    for cond, value in p.when.items():
        key = f"params.{p.path}.when.{cond}"
        parent = by_path.get(cond)
        if parent is None:
            fixed = base_flat[cond]
            if fixed != value:
                errs.append(
                    f"{key}: never holds: {cond} is fixed to {fixed!r} (base or default), "
                    f"not {value!r}, so the param would never be sampled"
                )
        elif parent.dist == "categorical":
            if value not in (parent.choices or ()):
                errs.append(
                    f"{key}: {value!r} is not one of the choices of params.{cond}; "
                    f"allowed: {', '.join(repr(c) for c in parent.choices or ())}"
                )
        elif parent.dist == "int":
            step = parent.step or 1
            grid = is_integer(value) and parent.low <= value <= parent.high
            if not grid or (value - parent.low) % step:
                errs.append(
                    f"{key}: {value!r} is not a value params.{cond} can take; allowed: integers "
                    f"{parent.low} to {parent.high} in steps of {step}"
                )
        else:
            errs.append(
                f"{key}: params.{cond} is continuous ({parent.dist}), so an exact value "
                "practically never comes up; allowed: condition on categorical or int params, "
                "or on fixed values"
            )
    return errs


def _conditions(p: Param, by_path: dict[str, Param], errs: list[str]) -> dict[str, Any] | None:
    """Every searched value that must hold for ``p`` to be active (its ancestors' too)."""
    out: dict[str, Any] = {}
    stack = [p]
    while stack:
        q = stack.pop()
        for cond, value in q.when.items():
            if cond not in by_path:
                continue
            if cond in out and out[cond] != value:
                errs.append(
                    f"params.{p.path}.when: needs {cond} to be both {out[cond]!r} and {value!r} "
                    "(through its parents' conditions), so it would never be sampled"
                )
                return None
            out[cond] = value
            stack.append(by_path[cond])
    return out


# --------------------------------------------------------------------------- helpers


def _is_active(param: Param, values: Mapping[str, Any], searched: Iterable[str]) -> bool:
    searched = set(searched)
    for cond, value in param.when.items():
        if cond in searched and (cond not in values or values[cond] != value):
            return False
    return True


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


__all__ = [
    "DISTRIBUTIONS",
    "MAX_COMBINATIONS",
    "Asha",
    "Fifo",
    "Param",
    "ParamSpec",
    "Resources",
    "Scheduler",
    "METHOD_KEY",
    "SearchSpace",
    "ShootoutSpace",
    "SpaceFile",
    "SpaceError",
    "find_spaces",
    "load_space",
    "space_from_dict",
]
