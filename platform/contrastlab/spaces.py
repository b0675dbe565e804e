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
import difflib
import itertools
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from contrastlab.config import _SECTIONS, METHOD_CONFIGS, Config, ConfigError, make_config

if TYPE_CHECKING:
    import optuna

REPORTED_METRICS = (
    "loss",
    "knn_top1",
    "knn_top5",
    "views_per_s",
    "epoch_time_s",
    "lr",
    "moco_acc",
    "tcr",
    "invariance",
    "cmc_acc",
    "cpc_acc",
    "rankme",
    "alignment",
    "uniformity",
    "nuisance_r2",
)
"""Metrics the trainer reports every epoch (the ``metric`` a space may optimise)."""

DISTRIBUTIONS = ("uniform", "loguniform", "int", "categorical")
SCHEDULERS = ("asha", "fifo")
MODES = ("max", "min")
ABLATIONS_DIR = "ablations"
"""Folder of ablation specs inside a search-space folder (skipped by :func:`find_spaces`)."""
MAX_COMBINATIONS = 256
"""Up to this many combinations of categorical choices are each built and validated on load."""

_KNN_METRICS = ("knn_top1", "knn_top5")
# the label-free monitors (no labels needed): measured with the kNN monitor, when eval.label_free
_LABEL_FREE_METRICS = ("rankme", "alignment", "uniformity", "nuisance_r2")
# metrics only some methods report
_METRIC_METHODS = {"moco_acc": ("moco",), "tcr": ("emp_ssl",), "invariance": ("emp_ssl",)}
# metrics with an obvious direction: optimising the other way is a mistake
_METRIC_MODES = {
    "loss": "min",
    "knn_top1": "max",
    "knn_top5": "max",
    "views_per_s": "max",
    "epoch_time_s": "min",
    "moco_acc": "max",
}
# the contrastive tasks' top-1 accuracies of CMC (view to view) and CPC (patch to patch)
_METRIC_METHODS.update({"cmc_acc": ("cmc",), "cpc_acc": ("cpc",)})
METRIC_RANGES: dict[str, tuple[float | None, float | None]] = {
    "loss": (None, None),  # EMP-SSL's loss subtracts TCR: no bound holds for every method
    "knn_top1": (0.0, 100.0),  # percent
    "knn_top5": (0.0, 100.0),
    "views_per_s": (0.0, None),
    "epoch_time_s": (0.0, None),
    "lr": (0.0, None),
    "moco_acc": (0.0, 1.0),  # fractions
    "tcr": (None, None),
    "invariance": (None, None),
    "cmc_acc": (0.0, 1.0),
    "cpc_acc": (0.0, 1.0),
    "rankme": (1.0, None),  # exp(entropy) of the normalised singular values
    "alignment": (0.0, 4.0),  # E||z1 - z2||^2 of unit vectors (evaluate.ALIGN_ALPHA = 2)
    "uniformity": (-8.0, 0.0),  # [-4t, 0] with evaluate.UNIFORM_T = 2
    "nuisance_r2": (None, 1.0),  # held-out R^2: 1 at best, unbounded below
}
"""``(low, high)`` each metric can take (None: unbounded on that side): interval estimates
(ablation summaries) never leave it."""
_METRIC_MODES.update({"cmc_acc": "max", "cpc_acc": "max"})
# a higher effective rank (no collapse), closer positives, a more even spread, and features
# that predict less of the per-image colour are better; ASHA then stops collapsed trials
_METRIC_MODES.update(
    {"rankme": "max", "alignment": "min", "uniformity": "min", "nuisance_r2": "min"}
)

_TOP_KEYS = (
    "method",
    "base",
    "params",
    "metric",
    "mode",
    "budget",
    "scheduler",
    "trials",
    "concurrency",
    "resources",
    "seed",
)
_REQUIRED = ("method", "params", "metric", "mode", "trials", "budget")
_DIST_KEYS = {
    "uniform": ("dist", "low", "high", "when"),
    "loguniform": ("dist", "low", "high", "when"),
    "int": ("dist", "low", "high", "step", "log", "when"),
    "categorical": ("dist", "choices", "when"),
}
_SCHEDULER_KEYS = {
    "asha": ("name", "grace_period", "reduction_factor"),
    "fifo": ("name",),
}
_RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker")
_DEFAULT_SCHEDULER = {"name": "asha", "grace_period": 1, "reduction_factor": 3}
_DEFAULT_RESOURCES = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
_MAX_SEED = 2**32 - 1  # numpy's seed range, which Optuna's samplers use
_MAX_INT = 2**53  # larger int ends lose precision in the float64 samplers
_EXAMPLE = "{dist: loguniform, low: 0.01, high: 1.0}"


class SpaceError(ConfigError):
    """A search space is invalid. The message names the file, the key and what is allowed."""


# --------------------------------------------------------------------------- data model


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
        return [_label(c) if isinstance(c, tuple) else c for c in self.choices or ()]

    def decode(self, value: Any) -> Any:
        """A value as Optuna gives it back (a tuple choice's label) -> the config value (a
        list); anything else is returned as is."""
        if isinstance(value, str) and self.choices is not None:
            for c in self.choices:
                if isinstance(c, tuple) and _label(c) == value:
                    return _as_list(c)
        return value

    def encode(self, value: Any) -> Any:
        """A config value (e.g. a list read back from MLflow) -> the value Optuna knows: the
        label of the tuple choice equal to it; anything else is returned as is."""
        if isinstance(value, list | tuple) and self.choices is not None:
            for c in self.choices:
                if isinstance(c, tuple) and _as_list(c) == _as_list(value):
                    return _label(c)
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
            out["choices"] = [_as_list(c) for c in self.choices]
        else:
            out["low"], out["high"] = self.low, self.high
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        if self.when:
            out["when"] = dict(self.when)
        return out


@dataclass(frozen=True)
class Scheduler:
    """Trial scheduler: ``asha`` (early stopping on :attr:`SearchSpace.metric`) or ``fifo``.

    Attributes:
        name: ``asha`` or ``fifo``.
        grace_period: Epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps the best ``1 / reduction_factor`` at each rung.
    """

    name: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 3

    def to_dict(self) -> dict[str, Any]:
        """The scheduler's YAML form."""
        if self.name == "fifo":
            return {"name": "fifo"}
        return {
            "name": self.name,
            "grace_period": self.grace_period,
            "reduction_factor": self.reduction_factor,
        }


@dataclass(frozen=True)
class Resources:
    """What one trial reserves.

    Attributes:
        workers: Training processes per trial; more than 1 means a DDP ``TorchTrainer``.
        cpus_per_worker: CPUs each worker reserves.
        gpus_per_worker: GPUs each worker reserves; below 1, several trials share a GPU.
    """

    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0

    def to_dict(self) -> dict[str, Any]:
        """The resources' YAML form."""
        return {
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
        }


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
                    f"{_hint(str(key), searched)}; allowed: {', '.join(searched)}"
                )
        # Optuna's labels of tuple choices back to lists (other values pass through)
        by_path = {p.path: p for p in self.params}
        sampled = {k: by_path[k].decode(v) for k, v in sampled.items()}
        for p in self.params:
            if p.path in sampled and not _is_active(p, sampled, searched):
                raise SpaceError(
                    f"{self.path}: params.{p.path} was given but is inactive: its condition "
                    f"{_show(p.when)} does not hold for {_show(dict(sampled))}"
                )
        try:
            return _build_config(self.base, self.method, self.epochs, sampled)
        except ConfigError as e:
            raise SpaceError(
                f"{self.path}: sampled values {_show(dict(sampled))} give an invalid config: "
                f"{_short(e)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The space in its YAML form (round-trips through :func:`space_from_dict`)."""
        return {
            "method": self.method,
            "base": copy.deepcopy(self.base),
            "params": {p.path: p.to_dict() for p in self.params},
            "metric": self.metric,
            "mode": self.mode,
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
                ``mode``, ``epochs``, ``scheduler``/``resources`` (a dataclass, or a mapping
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
                    f"{_hint(key, allowed)}; allowed: {', '.join(allowed)}"
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
            if "scheduler" not in changes and sched["name"] == "asha" and _is_int(epochs):
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
        for key, cls in (("scheduler", Scheduler), ("resources", Resources)):
            if key not in changes:
                continue
            value = changes[key]
            if isinstance(value, cls):
                raw[key] = value.to_dict()
            elif isinstance(value, Mapping):
                same = key != "scheduler" or value.get("name", raw[key]["name"]) == "asha"
                raw[key] = {**(raw[key] if same else {}), **value}
            else:
                raw[key] = value  # rejected by validation with the usual message
        return _validate(raw, self.path)


# --------------------------------------------------------------------------- public loading


def load_space(path: str | Path) -> SearchSpace:
    """Read and fully validate a search space file.

    Args:
        path: A YAML file (read with a ``yaml.SafeLoader`` that also rejects duplicate keys).

    Returns:
        The validated :class:`SearchSpace`; its ``name`` is the file stem.

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
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from None
    return _validate(data, path)


def space_from_dict(data: Any, path: str | Path = "<dict>") -> SearchSpace:
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
    holds ablation specs (:mod:`contrastlab.ablate`), a different format.

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


def _validate(data: Any, path: Path) -> SearchSpace:
    """Check every part of a space; raise one :class:`SpaceError` listing the problems."""
    where = str(path)
    _check_top_keys(data, where, _TOP_KEYS, _REQUIRED)
    errs: list[str] = []

    # ---- scalars and small sections
    method, metric, mode = _parse_method_metric_mode(data, errs)
    trials = _int_at_least(data["trials"], 1, "trials", errs)
    concurrency = _int_at_least(data.get("concurrency", 1), 1, "concurrency", errs)
    seed = data.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
        errs.append(f"seed: must be an integer in [0, 2**32 - 1] (the sampler seed), got {seed!r}")
    epochs = _parse_budget(data["budget"], errs)
    scheduler = _parse_scheduler(data.get("scheduler", _DEFAULT_SCHEDULER), epochs, errs)
    resources = _parse_resources(data.get("resources", _DEFAULT_RESOURCES), errs)
    base = _parse_base(data.get("base"), method, epochs, errs)
    params_raw = data["params"]
    if not isinstance(params_raw, Mapping) or not params_raw:
        errs.append(
            f"params: must be a non-empty mapping of dotted config paths to distributions, "
            f"e.g. method.temperature: {_EXAMPLE}; got {params_raw!r}"
        )
        params_raw = {}
    parsed: list[Param] = []
    for key, spec in params_raw.items():
        if not isinstance(key, str):
            errs.append(f"params: key {key!r} must be a dotted config path like optim.lr")
            continue
        param = _parse_param(key, spec, method, errs)
        if param is not None:
            parsed.append(param)
    _raise(where, errs)
    # all set once no error was reported (for type checkers)
    assert method is not None and base is not None and epochs is not None
    assert trials is not None and concurrency is not None

    # ---- base must be a valid config on its own
    try:
        base_cfg = _build_config(base, method, epochs, {})
    except ConfigError as e:
        raise SpaceError(f"{where}: {_prefix_base(e)}") from None
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
    _raise(where, errs)
    searched = tuple(p.path for p in ordered)
    by_path = {p.path: p for p in ordered}
    for p in ordered:
        errs.extend(_when_errors(p, by_path, base_flat))
    _raise(where, errs)
    required: dict[str, dict[str, Any]] = {}
    for p in ordered:
        req = _conditions(p, by_path, errs)
        if req is not None:
            required[p.path] = req
    _raise(where, errs)

    # ---- metric, schedule, resources against the resolved base config
    errs.extend(_metric_errors(metric, mode, method, base_cfg, searched))
    errs.extend(_resource_errors(resources, base_cfg, by_path))
    _raise(where, errs)

    space = SearchSpace(
        path=path,
        name=path.stem,
        method=method,
        base=base,
        params=tuple(ordered),
        metric=metric,
        mode=mode,
        epochs=epochs,
        scheduler=scheduler,
        trials=trials,
        concurrency=concurrency,
        resources=resources,
        seed=seed,
    )
    _check_values(space, required, base_flat)
    return space


def _check_top_keys(
    data: Any, where: str, top_keys: tuple[str, ...], required: tuple[str, ...]
) -> None:
    """A mapping with only known top-level keys and every required one (else SpaceError)."""
    if data is None:
        raise SpaceError(f"{where}: the file is empty; required keys: {', '.join(required)}")
    if not isinstance(data, Mapping):
        raise SpaceError(
            f"{where}: top level must be a mapping with the required keys {', '.join(required)}, "
            f"got {type(data).__name__}"
        )
    errs = [_unknown(str(key), str(key), top_keys) for key in data if key not in top_keys]
    errs += [
        f"{key}: required key is missing; required: {', '.join(required)}"
        for key in required
        if key not in data
    ]
    _raise(where, errs)


def _parse_method_metric_mode(data: Mapping[str, Any], errs: list[str]) -> tuple[Any, Any, Any]:
    """``method`` (None when unknown), ``metric`` and ``mode``, problems appended to ``errs``."""
    method = data["method"]
    if not isinstance(method, str) or method not in METHOD_CONFIGS:
        errs.append(
            f"method: unknown method {method!r}{_hint(method, METHOD_CONFIGS)}; "
            f"allowed: {', '.join(METHOD_CONFIGS)}"
        )
        method = None
    metric = data["metric"]
    if not isinstance(metric, str) or metric not in REPORTED_METRICS:
        errs.append(
            f"metric: {metric!r} is not a metric the trainer reports"
            f"{_hint(metric, REPORTED_METRICS)}; allowed: {', '.join(REPORTED_METRICS)}"
        )
    mode = data["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        errs.append(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    return method, metric, mode


def _check_values(space: SearchSpace, required: dict[str, dict[str, Any]], base_flat: dict) -> None:
    """Build configs at every range end / choice and every categorical combination."""
    where = str(space.path)
    searched = space.param_paths
    # fixed values the conditions rely on must not move with the searched values
    fixed_when = sorted({k for p in space.params for k in p.when if k not in searched})

    def build(values: Mapping[str, Any]) -> str | None:
        try:
            cfg = _build_config(space.base, space.method, space.epochs, values)
        except ConfigError as e:
            return _short(e)
        flat = cfg.flat() if fixed_when else {}
        for key in fixed_when:
            if flat[key] != base_flat[key]:
                raise SpaceError(
                    f"{where}: {key} is used in a `when` condition but its resolved value "
                    f"changes with the searched values ({base_flat[key]!r} in base, "
                    f"{flat[key]!r} with {_show(dict(values))}); condition on a searched "
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
                shown = _as_list(value)  # a tuple field's choice as written in YAML
                raise SpaceError(f"{where}: params.{p.path}: value {shown!r} is invalid: {err}")
    # 2. each value beside the others' reference values (catches combinations with
    #    non-categorical params too)
    for p in space.params:
        for value in p.ends:
            ref = reference({**required[p.path], p.path: value})
            err = build(ref)
            if err is not None:
                raise SpaceError(f"{where}: params: the combination {_show(ref)} is invalid: {err}")

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
                f"{where}: params: the combination {_show(shown)} is invalid "
                f"(other params at their low end): {err}"
            )


def _parse_budget(budget: Any, errs: list[str]) -> int | None:
    if not isinstance(budget, Mapping):
        errs.append(f"budget: must be a mapping like {{epochs: 100}}, got {budget!r}")
        return None
    for key in budget:
        if key != "epochs":
            errs.append(_unknown(f"budget.{key}", str(key), ("epochs",)))
    if "epochs" not in budget:
        errs.append("budget.epochs: required key is missing (epochs per trial, the most ASHA runs)")
        return None
    return _int_at_least(budget["epochs"], 1, "budget.epochs", errs)


def _parse_scheduler(sched: Any, epochs: int | None, errs: list[str]) -> Scheduler:
    if not isinstance(sched, Mapping):
        errs.append(
            f"scheduler: must be a mapping like {{name: asha, grace_period: 5, "
            f"reduction_factor: 3}} or {{name: fifo}}, got {sched!r}"
        )
        return Scheduler()
    name = sched.get("name", "asha")
    if name not in SCHEDULERS:
        errs.append(
            f"scheduler.name: unknown scheduler {name!r}{_hint(name, SCHEDULERS)}; "
            f"allowed: {', '.join(SCHEDULERS)}"
        )
        return Scheduler()
    for key in sched:
        if key not in _SCHEDULER_KEYS[name]:
            errs.append(
                _unknown(f"scheduler.{key}", str(key), _SCHEDULER_KEYS[name]) + f" (for {name})"
            )
    if name == "fifo":
        return Scheduler(name="fifo")
    grace = _int_at_least(sched.get("grace_period", 1), 1, "scheduler.grace_period", errs)
    factor = _int_at_least(sched.get("reduction_factor", 3), 2, "scheduler.reduction_factor", errs)
    if grace is not None and epochs is not None and grace > epochs:
        errs.append(
            f"scheduler.grace_period: {grace} is more than budget.epochs ({epochs}); "
            f"allowed: 1 to {epochs}"
        )
    return Scheduler(name="asha", grace_period=grace or 1, reduction_factor=factor or 3)


def _parse_resources(res: Any, errs: list[str]) -> Resources:
    if not isinstance(res, Mapping):
        errs.append(
            "resources: must be a mapping like {workers: 1, cpus_per_worker: 2, "
            f"gpus_per_worker: 0.5}}, got {res!r}"
        )
        return Resources()
    for key in res:
        if key not in _RESOURCE_KEYS:
            errs.append(_unknown(f"resources.{key}", str(key), _RESOURCE_KEYS))
    workers = _int_at_least(res.get("workers", 1), 1, "resources.workers", errs)
    cpus = res.get("cpus_per_worker", 1)
    if not _is_finite_number(cpus) or cpus <= 0:
        errs.append(f"resources.cpus_per_worker: must be a number > 0, got {cpus!r}")
        cpus = 1
    gpus = res.get("gpus_per_worker", 0)
    if not _is_finite_number(gpus) or gpus < 0:
        errs.append(f"resources.gpus_per_worker: must be a number >= 0, got {gpus!r}")
        gpus = 0
    elif gpus > 1 and gpus != int(gpus):
        errs.append(
            f"resources.gpus_per_worker: {gpus} is neither a fraction of one GPU nor a whole "
            "number of GPUs; allowed: 0 to 1, or a whole number"
        )
    elif workers is not None and workers > 1 and 0 < gpus < 1:
        errs.append(
            f"resources.gpus_per_worker: {gpus} with workers: {workers} could put two DDP ranks "
            "of one trial on the same GPU, which NCCL refuses; allowed with workers > 1: "
            "a whole number of GPUs (or 0)"
        )
    return Resources(workers=workers or 1, cpus_per_worker=cpus, gpus_per_worker=gpus)


def _parse_base(
    base: Any, method: str | None, epochs: int | None, errs: list[str]
) -> dict[str, Any] | None:
    if base is None:
        return {}
    if not isinstance(base, Mapping):
        errs.append(f"base: must be a mapping of config sections, got {base!r}")
        return None
    base = copy.deepcopy(dict(base))
    for key, value in base.items():
        if not isinstance(key, str):
            errs.append(f"base: key {key!r} must be a config section name")
            return None
        if value is not None and not isinstance(value, Mapping):
            errs.append(f"base.{key}: must be a mapping of fields, got {_describe(value)}")
            return None
    m = base.get("method")
    if isinstance(m, Mapping) and "name" in m and method is not None and m["name"] != method:
        errs.append(
            f"base.method.name: {m['name']!r} contradicts method: {method}; the method is set "
            "by the top-level `method` key: remove base.method.name"
        )
    t = base.get("train")
    if isinstance(t, Mapping) and "epochs" in t and epochs is not None and t["epochs"] != epochs:
        errs.append(
            f"base.train.epochs: {t['epochs']!r} contradicts budget.epochs ({epochs}); the "
            "budget sets the epochs of every trial: remove base.train.epochs"
        )
    return base


def _parse_param(path: str, spec: Any, method: str | None, errs: list[str]) -> Param | None:
    """Check one ``params`` entry's shape and numbers; append problems to ``errs``."""
    key = f"params.{path}"
    n_errs = len(errs)
    path_err = _path_error(path, method, what="searched")
    if path_err is not None:
        errs.append(f"{key}: {path_err}")
    if not isinstance(spec, Mapping):
        errs.append(f"{key}: must be a mapping like {_EXAMPLE}, got {spec!r}")
        return None
    if "dist" not in spec:
        errs.append(f"{key}: 'dist' is missing; allowed: {', '.join(DISTRIBUTIONS)}")
        return None
    dist = spec["dist"]
    if not isinstance(dist, str) or dist not in DISTRIBUTIONS:
        errs.append(
            f"{key}.dist: unknown distribution {dist!r}{_hint(dist, DISTRIBUTIONS)}; "
            f"allowed: {', '.join(DISTRIBUTIONS)}"
        )
        return None
    field_args = None  # the element types when the field is a tuple
    if path_err is None and (method is not None or not path.startswith("method.")):
        kind_err = _dist_kind_error(path, method, dist)
        if kind_err is not None:
            errs.append(f"{key}: {kind_err}")
            return None
        field_args = _tuple_args(path, method)
    allowed = _DIST_KEYS[dist]
    for k in spec:
        if k not in allowed:
            errs.append(_unknown(f"{key}.{k}", str(k), allowed) + f" (for dist: {dist})")
    when = _parse_when(key, spec.get("when"), path, method, errs)
    if dist == "categorical":
        if field_args is not None:
            choices = _parse_tuple_choices(key, spec.get("choices"), field_args, errs)
        else:
            choices = _parse_choices(key, spec.get("choices"), errs)
        if len(errs) > n_errs:
            return None
        return Param(path=path, dist=dist, choices=choices, when=when)

    is_int = dist == "int"
    kind = "an integer" if is_int else "a number"
    ends: dict[str, Any] = {}
    for end in ("low", "high"):
        if end not in spec:
            errs.append(f"{key}.{end}: required for dist: {dist}; allowed: {kind}")
            continue
        v = spec[end]
        ok = _is_int(v) if is_int else _is_finite_number(v)
        if not ok:
            errs.append(f"{key}.{end}: must be {kind}, got {_describe(v)}{_yaml_hint(v)}")
        elif is_int and abs(v) > _MAX_INT:
            errs.append(f"{key}.{end}: {v} is too large; allowed: integers within +-2**53")
        else:
            ends[end] = v if is_int else float(v)
    step = spec.get("step")
    if step is not None and (not _is_int(step) or step < 1):
        errs.append(f"{key}.step: must be an integer >= 1, got {_describe(step)}")
        step = None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        errs.append(f"{key}.log: must be true or false, got {_describe(log)}")
        log = False
    if len(ends) == 2:
        low, high = ends["low"], ends["high"]
        if not low < high:
            errs.append(
                f"{key}: low ({low}) must be less than high ({high}); "
                "a value that is not searched belongs in base"
            )
        elif dist == "loguniform" and low <= 0:
            errs.append(f"{key}.low: loguniform needs low > 0, got {low}; allowed: low > 0")
        elif log and low < 1:
            errs.append(f"{key}.low: int with log: true needs low >= 1, got {low}")
        elif log and step not in (None, 1):
            errs.append(f"{key}.step: int with log: true takes no step (got {step}); allowed: 1")
        elif step is not None and (high - low) % step:
            errs.append(
                f"{key}.step: high - low ({high - low}) must be a multiple of step ({step}) so "
                f"that high is reachable; e.g. high: {low + (high - low) // step * step}"
            )
    if len(errs) > n_errs:
        return None
    return Param(
        path=path,
        dist=dist,
        low=ends["low"],
        high=ends["high"],
        step=step,
        log=log,
        when=when,
    )


def _parse_choices(key: str, choices: Any, errs: list[str]) -> tuple[Any, ...] | None:
    if choices is None or not isinstance(choices, list) or not choices:
        errs.append(
            f"{key}.choices: must be a non-empty list of values, got {_describe(choices)}; "
            "e.g. choices: [256, 512]"
        )
        return None
    seen: list[tuple[type, Any]] = []
    for c in choices:
        if not _is_scalar(c):
            errs.append(
                f"{key}.choices: {_describe(c)} is not allowed; allowed: scalars "
                "(numbers, strings, true/false, null)"
            )
            return None
        if (type(c), c) in seen:
            errs.append(f"{key}.choices: {c!r} is listed twice")
            return None
        seen.append((type(c), c))
    return tuple(choices)


def _parse_tuple_choices(
    key: str, choices: Any, args: tuple[Any, ...], errs: list[str]
) -> tuple[Any, ...] | None:
    """Choices of a tuple field: each one a list matching the field (kept as tuples)."""
    example = _tuple_example(args)
    if choices is None or not isinstance(choices, list) or not choices:
        errs.append(
            f"{key}.choices: must be a non-empty list of {_tuple_kind(args)}, got "
            f"{_describe(choices)}; e.g. choices: [{example}, ...]"
        )
        return None
    out: list[tuple[Any, ...]] = []
    for c in choices:
        value, why = _normalize_tuple(c, args)
        if value is None:
            errs.append(
                f"{key}.choices: {_describe(c)} is not allowed: {why}; this field is a tuple, "
                f"each choice must be {_tuple_kind(args, one=True)}, e.g. {example}"
            )
            return None
        if value in out:
            errs.append(f"{key}.choices: {_as_list(value)!r} is listed twice")
            return None
        out.append(value)
    return tuple(out)


def _tuple_args(path: str, method: str | None) -> tuple[Any, ...] | None:
    """The element types of a tuple-typed config field (``(float, float)``), else None."""
    ann = _field_annotation(path, method)
    return typing.get_args(ann) if typing.get_origin(ann) is tuple else None


def _normalize_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, None] | tuple[None, str]:
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
            inner, why = _normalize_tuple(v, typing.get_args(kind))
            if inner is None:
                return None, f"{v!r} {why}"
            out.append(inner)
        elif kind is float:
            if not _is_finite_number(v):
                return None, f"{v!r} is not a finite number"
            out.append(float(v))
        elif kind is int:
            if not _is_int(v):
                return None, f"{v!r} is not an integer"
            out.append(v)
        elif not _is_scalar(v):
            return None, f"{v!r} is not a scalar"
        else:
            out.append(v)
    return tuple(out), None


def _tuple_kind(args: tuple[Any, ...], one: bool = False) -> str:
    """What a value of a ``tuple[*args]`` field looks like in YAML (``one``: singular)."""
    what = "list" if one else "lists"
    if len(args) == 2 and args[1] is Ellipsis:
        return f"a {what}" if one else what
    if all(a is float for a in args):
        what += f" of {len(args)} numbers"
    else:
        what += f" of {len(args)} values"
    return f"a {what}" if one else what


def _tuple_example(args: tuple[Any, ...]) -> str:
    if all(a is float for a in args) and len(args) == 2:
        return "[0.08, 1.0]"
    return "[...]"


def _label(choice: tuple[Any, ...]) -> str:
    """The label Optuna sees for a tuple choice: its JSON list text, as MLflow logs it."""
    return json.dumps(_as_list(choice))


def _as_list(x: Any) -> Any:
    """Tuples (nested too) -> lists: the YAML and config form of a tuple value."""
    return [_as_list(v) for v in x] if isinstance(x, list | tuple) else x


def _dist_kind_error(path: str, method: str | None, dist: str) -> str | None:
    """A distribution that cannot produce values of the field's kind (tuple, choice list)."""
    ann = _field_annotation(path, method)
    if typing.get_origin(ann) is tuple and dist != "categorical":
        default = _field_info(path, method).default
        shown = f"[{_as_list(default)!r}, ...]" if default is not None else "[[...], [...]]"
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


def _parse_when(
    key: str, when: Any, path: str, method: str | None, errs: list[str]
) -> dict[str, Any]:
    if when is None:
        return {}
    if not isinstance(when, Mapping) or not when:
        errs.append(
            f"{key}.when: must be a non-empty mapping of config paths to values, e.g. "
            f"{{method.variant: v2}}, got {_describe(when)}"
        )
        return {}
    out = {}
    for cond, value in when.items():
        if not isinstance(cond, str):
            errs.append(f"{key}.when: key {cond!r} must be a dotted config path")
            continue
        if cond == path:
            errs.append(f"{key}.when.{cond}: a param cannot depend on itself")
            continue
        err = _path_error(cond, method, what="conditioned on")
        if err is not None:
            errs.append(f"{key}.when.{cond}: {err}")
            continue
        if not _is_scalar(value):
            errs.append(
                f"{key}.when.{cond}: value must be a scalar (compared with ==), "
                f"got {_describe(value)}"
            )
            continue
        out[cond] = value
    return out


def _path_error(path: str, method: str | None, what: str) -> str | None:
    """Why ``path`` is not a config field of ``method`` that can be ``what``, else None."""
    parts = path.split(".")
    sections = ("method", *_SECTIONS)
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
                f"method {method!r} has no field {name!r}{owned}{_hint(name, fields)}; "
                f"allowed: {', '.join(fields)}"
            )
        return None
    if section not in _SECTIONS:
        return (
            f"unknown section {section!r}{_hint(section, sections)}; allowed: {', '.join(sections)}"
        )
    fields = tuple(sorted(_SECTIONS[section].model_fields))
    if name not in fields:
        return f"{section} has no field {name!r}{_hint(name, fields)}; allowed: {', '.join(fields)}"
    if path == "train.epochs" and what == "searched":
        return "the epochs of a trial are the budget: set budget.epochs instead"
    return None


def _field_info(path: str, method: str | None) -> Any:
    """The pydantic FieldInfo of a valid ``section.field`` path (``method`` known for
    ``method.*`` paths)."""
    section, name = path.split(".")
    if section == "method":
        assert method is not None
        return METHOD_CONFIGS[method].model_fields[name]
    return _SECTIONS[section].model_fields[name]


def _field_annotation(path: str, method: str | None) -> Any:
    return _field_info(path, method).annotation


def _field_kind_errors(p: Param, method: str) -> list[str]:
    """A float distribution on an integer field would sample values the config rejects."""
    ann = _field_annotation(p.path, method)
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
            grid = _is_int(value) and parent.low <= value <= parent.high
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


def _metric_errors(
    metric: str, mode: str, method: str, base_cfg: Config, searched: tuple[str, ...]
) -> list[str]:
    errs = []
    only = _METRIC_METHODS.get(metric)
    if only is not None and method not in only:
        errs.append(
            f"metric: {metric} is only reported by {', '.join(only)}, not {method}; allowed for "
            f"{method}: "
            + ", ".join(m for m in REPORTED_METRICS if method in _METRIC_METHODS.get(m, (method,)))
        )
    better = _METRIC_MODES.get(metric)
    if better is not None and mode != better:
        errs.append(
            f"mode: {metric} is better when {'higher' if better == 'max' else 'lower'}; "
            f"allowed: mode: {better}"
        )
    if metric in _LABEL_FREE_METRICS:
        if "eval.label_free" in searched:
            errs.append(f"params.eval.label_free: cannot be searched with metric: {metric}")
        elif not base_cfg.eval.label_free:
            errs.append(
                f"base.eval.label_free: is false, but metric: {metric} is a label-free monitor "
                "that needs it; allowed: eval: {label_free: true}"
            )
    if metric in _KNN_METRICS + _LABEL_FREE_METRICS:
        if "eval.knn_every" in searched:
            errs.append(f"params.eval.knn_every: cannot be searched with metric: {metric}")
        elif base_cfg.eval.knn_every != 1:
            errs.append(
                f"base.eval.knn_every: is {base_cfg.eval.knn_every}, but metric: {metric} must be "
                "reported every epoch (the scheduler compares trials epoch by epoch); allowed: "
                "eval: {knn_every: 1}"
            )
    return errs


def _resource_errors(res: Resources, base_cfg: Config, by_path: dict[str, Param]) -> list[str]:
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
            bad = [c for c in batch.choices or () if not _is_int(c) or c % w]
        else:
            low = int(batch.low or 0)
            bad = [] if low % w == 0 and (batch.step or 1) % w == 0 else [low]
        if bad:
            errs.append(
                f"train.batch_size: {', '.join(map(repr, bad))} is not divisible by "
                f"resources.workers ({w}); the batch size is global and split over the workers"
            )
    return errs


# --------------------------------------------------------------------------- helpers


def _build_config(
    base: Mapping[str, Any], method: str, epochs: int, values: Mapping[str, Any]
) -> Config:
    raw = copy.deepcopy(dict(base))
    raw["method"] = {**(raw.get("method") or {}), "name": method}
    raw["train"] = {**(raw.get("train") or {}), "epochs": epochs}
    for path, value in values.items():
        section, name = path.split(".")
        raw[section] = {**(raw.get(section) or {}), name: value}
    return make_config(raw)


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


def _raise(where: str, errs: list[str]) -> None:
    if not errs:
        return
    if len(errs) == 1:
        raise SpaceError(f"{where}: {errs[0]}")
    raise SpaceError(f"{where}: {len(errs)} problems:\n  " + "\n  ".join(errs))


def _short(err: ConfigError) -> str:
    """A ConfigError's lines on one line, without the 'invalid config:' header."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and ln != "invalid config:"]
    return "; ".join(lines)


def _prefix_base(err: ConfigError) -> str:
    """A ConfigError about ``base``, each key prefixed with ``base.``."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and ln != "invalid config:"]
    out = [f"base.{ln}" if re.match(r"[\w.]+[: ]", ln) else f"base: {ln}" for ln in lines]
    return out[0] if len(out) == 1 else "invalid base config: " + "; ".join(out)


def _unknown(key: str, name: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    return f"{key}: unknown key{_hint(name, allowed)}; allowed: {', '.join(allowed)}"


def _hint(name: Any, allowed: Iterable[str]) -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _int_at_least(value: Any, least: int, key: str, errs: list[str]) -> int | None:
    if not _is_int(value) or value < least:
        errs.append(f"{key}: must be an integer >= {least}, got {_describe(value)}")
        return None
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite_number(x: Any) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _is_scalar(x: Any) -> bool:
    if x is None or isinstance(x, str | bool | int):
        return True
    return isinstance(x, float) and math.isfinite(x)


def _describe(x: Any) -> str:
    return f"{x!r} ({type(x).__name__})"


def _yaml_hint(x: Any) -> str:
    if isinstance(x, str):
        try:
            float(x)
        except ValueError:
            return ""
        return (
            "; YAML reads this as text: write floats with a dot and a signed exponent, "
            "e.g. 1.0e-6 or 1.0e+3"
        )
    return ""


def _show(values: Mapping[str, Any]) -> str:
    # tuple values (a tuple field's choices) as the lists the YAML has
    return "{" + ", ".join(f"{k}: {_as_list(v)!r}" for k, v in values.items()) + "}"


class _UniqueKeyLoader(yaml.SafeLoader):
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


__all__ = [
    "DISTRIBUTIONS",
    "MAX_COMBINATIONS",
    "METRIC_RANGES",
    "REPORTED_METRICS",
    "Param",
    "Resources",
    "Scheduler",
    "SearchSpace",
    "SpaceError",
    "find_spaces",
    "load_space",
    "space_from_dict",
]
