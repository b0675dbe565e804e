"""Typed, frozen configuration: the one place where every default lives.

A run is fully described by a :class:`Config`. It is built from a YAML file plus
``key=value`` overrides (dotted paths), validated once, and never mutated afterwards.
Unknown keys and wrong types raise :class:`ConfigError`, which names the offending key and
lists the allowed ones.

Some defaults depend on other choices (the augmentation recipe depends on the method, MoCo v1
uses a linear head). Those are resolved *before* validation, so the resolved config that is
saved next to every run holds concrete values only: what you read is what ran.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the key and what is allowed."""


class _Strict(BaseModel):
    # frozen: nothing mutates after parsing; extra=forbid: unknown keys raise.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- methods


class Metric(NamedTuple):
    """A metric the trainer reports every epoch.

    Attributes:
        mode: ``"max"`` or ``"min"``, the direction in which it is better (a sweep optimising it
            the other way is refused), or ``None`` where no direction is obvious.
        low: The least value it can take, ``None`` if unbounded below; interval estimates
            (ablation summaries) never leave ``[low, high]``.
        high: The largest value, ``None`` if unbounded above.
    """

    mode: Literal["max", "min"] | None
    low: float | None
    high: float | None


TRAINER_METRICS: dict[str, Metric] = {
    "loss": Metric("min", None, None),  # EMP-SSL's loss subtracts TCR: no bound holds for all
    "knn_top1": Metric("max", 0.0, 100.0),  # percent
    "knn_top5": Metric("max", 0.0, 100.0),
    "views_per_s": Metric("max", 0.0, None),
    "epoch_time_s": Metric("min", 0.0, None),
    # compute spent so far (cumulative; the monitor's time not included): the cost axis of an
    # accuracy-vs-compute sweep (metric: [knn_top1, train_seconds])
    "train_seconds": Metric("min", 0.0, None),
    "views_seen": Metric("min", 0.0, None),  # augmented views trained on, all workers
    "lr": Metric(None, 0.0, None),
}
"""What every run reports, whatever the method (the kNN monitor's accuracies among them)."""

LABEL_FREE_METRICS: dict[str, Metric] = {
    # a higher effective rank (no collapse), closer positives, a more even spread, and features
    # that predict less of the per-image colour are better; ASHA then stops collapsed trials
    "rankme": Metric("max", 1.0, None),  # exp(entropy) of the normalised singular values
    "alignment": Metric("min", 0.0, 4.0),  # E||z1 - z2||^2 of unit vectors (ALIGN_ALPHA = 2)
    "uniformity": Metric("min", -8.0, 0.0),  # [-4t, 0] with evaluate.UNIFORM_T = 2
    "nuisance_r2": Metric("min", None, 1.0),  # held-out R^2: 1 at best, unbounded below
}
"""The label-free monitors (``eval.label_free``), measured with the kNN monitor."""


class MethodConfig(_Strict):
    """Base of every method's config class: its fields, and what the platform derives from it.

    A method's knowledge lives on its config class, once; sweeps, smoke tests, benchmarks and
    tables read it from the registry (:data:`METHOD_CONFIGS`, :func:`register_method_config`):

    * ``reference``: the paper and the upstream code it follows.
    * ``reports``: metrics its training step reports besides ``loss`` (name -> :class:`Metric`).
    * ``defaults``: ``{section: {field: value}}`` that follow from the method (its upstream
      recipe), filled in before validation wherever the user set nothing, and saved concretely.
    * ``small_data``: ``--set`` overrides for training sets of a few thousand images or fewer.
    * ``tiny``: its fields in the tiny setting (:data:`TINY`: tests, smoke sweeps and ablations,
      smoke benchmarks), and ``smoke_fixed``: the fields a smoke sweep fixes at those values
      instead of searching them (sizes that would not fit 256 tiny images).
    * :meth:`check`: its rules across sections; :meth:`fit_batch`: the sizes a batch size needs.
    """

    name: str
    reference: ClassVar[str] = ""
    reports: ClassVar[dict[str, Metric]] = {}
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    small_data: ClassVar[tuple[str, ...]] = ()
    tiny: ClassVar[dict[str, Any]] = {}
    smoke_fixed: ClassVar[tuple[str, ...]] = ()

    @property
    def views_per_sample(self) -> int:
        """Augmented views the method draws per image each step."""
        raise NotImplementedError(f"{type(self).__name__} must define views_per_sample")

    @classmethod
    def resolve_defaults(cls, raw: dict[str, Any]) -> None:
        """Fill :attr:`defaults` into the raw config, in place, where nothing is set."""
        for section, values in cls.defaults.items():
            target = raw.setdefault(section, {})
            for key, value in values.items():
                target.setdefault(key, value)

    def check(self, cfg: Config) -> None:  # noqa: B027 (most methods have no such rule)
        """Rules between this method's fields and the rest of ``cfg``: raise ``ValueError``
        naming the keys and what is allowed."""

    @classmethod
    def fit_batch(cls, batch_size: int, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Method fields to change so that a run with ``batch_size`` validates, given the
        fields set so far (``{}``: none; MoCo's queue must be a multiple of the batch)."""
        return {}


def _in_batch_negatives(cfg: Config) -> None:
    if cfg.train.batch_size < 2:
        raise ValueError("train.batch_size must be >= 2 for in-batch negatives")


class SimCLRConfig(MethodConfig):
    """SimCLR: NT-Xent over ``n_views`` augmented views of each image."""

    name: Literal["simclr"] = "simclr"
    reference = "Chen et al. 2020 (arXiv:2002.05709); google-research/simclr"
    temperature: float = Field(0.5, gt=0, description="softmax temperature tau")
    n_views: int = Field(2, ge=2, description="augmented views per image")

    smoke_fixed = ("n_views",)

    def check(self, cfg: Config) -> None:
        _in_batch_negatives(cfg)

    @property
    def views_per_sample(self) -> int:
        return self.n_views


class SupConConfig(MethodConfig):
    """Supervised contrastive loss (Khosla et al. 2020), ``contrast_count`` views per image.

    ``base_temperature``: SupContrast multiplies the loss by ``temperature / base_temperature``
    behind the user's back (0.07). Here it is off unless set explicitly.
    """

    name: Literal["supcon"] = "supcon"
    reference = "Khosla et al. 2020 (arXiv:2004.11362); HobbitLong/SupContrast"
    temperature: float = Field(0.1, gt=0)
    contrast_count: int = Field(2, ge=2, description="augmented views per image")
    base_temperature: float | None = Field(
        None, gt=0, description="if set, loss is scaled by temperature / base_temperature"
    )

    tiny = {"contrast_count": 2}
    smoke_fixed = ("contrast_count",)

    def check(self, cfg: Config) -> None:
        _in_batch_negatives(cfg)
        if not cfg.data.labels:
            raise ValueError(
                "method supcon trains on labels, but data.labels is false; allowed: a "
                "self-supervised method (e.g. simclr) or data.labels: true"
            )

    @property
    def views_per_sample(self) -> int:
        return self.contrast_count


class MoCoConfig(MethodConfig):
    """MoCo v1/v2: InfoNCE against a queue of K negatives from a momentum key encoder."""

    name: Literal["moco"] = "moco"
    reference = (
        "He et al. 2019, Chen et al. 2020 (arXiv:1911.05722, 2003.04297); facebookresearch/moco"
    )
    variant: Literal["v1", "v2"] = "v2"
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(4096, ge=1, description="K, number of queued negative keys")
    momentum: float = Field(0.99, ge=0.0, le=1.0, description="key encoder EMA momentum m")
    symmetric: bool = Field(False, description="symmetrised loss over both view orders")
    bn_mode: Literal["shuffle", "sync", "none"] = Field(
        "shuffle",
        description=(
            "how the key encoder's BatchNorm is kept from leaking which images share a batch: "
            "'shuffle' (the paper's shuffle-BN: keys are shuffled across BatchNorm groups, "
            "i.e. across workers, or across method.bn_splits groups on one worker), 'sync' "
            "(SyncBatchNorm over all workers: the weaker alternative in the paper's view; "
            "needs GPUs; plain BatchNorm on one worker), 'none' (plain BatchNorm)"
        ),
    )
    bn_splits: int = Field(
        8,
        ge=1,
        description=(
            "bn_mode='shuffle' on one worker: BatchNorm groups per batch, simulating that many "
            "GPUs (the MoCo CIFAR demo's --bn-splits 8); ignored with several workers, where "
            "each worker's batch is one group"
        ),
    )

    reports = {"moco_acc": Metric("max", 0.0, 1.0)}  # the queue task's top-1, a fraction
    # K must stay well below the training images, or the queue holds the positives
    small_data = ("method.queue_size=1024",)
    tiny = {"queue_size": 256}
    smoke_fixed = ("queue_size",)

    @classmethod
    def resolve_defaults(cls, raw: dict[str, Any]) -> None:
        super().resolve_defaults(raw)
        if raw["method"].get("variant", "v2") == "v1":
            raw.setdefault("model", {}).setdefault("head", "linear")  # v1: linear 128-d

    @classmethod
    def fit_batch(cls, batch_size: int, fields: Mapping[str, Any]) -> dict[str, Any]:
        queue = fields.get("queue_size", cls.model_fields["queue_size"].default)
        return {"queue_size": batch_size * max(1, math.ceil(queue / batch_size))}

    def check(self, cfg: Config) -> None:
        batch = cfg.train.batch_size
        if self.queue_size % batch != 0:
            raise ValueError(
                f"method.queue_size ({self.queue_size}) must be a multiple of train.batch_size "
                f"({batch}) so that each step replaces whole queue slots"
            )
        if self.bn_mode == "shuffle" and (batch % self.bn_splits or batch < 2 * self.bn_splits):
            raise ValueError(
                f"method.bn_splits ({self.bn_splits}) must divide train.batch_size "
                f"({batch}) into BatchNorm groups of at least 2 images "
                "(method.bn_mode='shuffle'); lower method.bn_splits or set method.bn_mode='none'"
            )

    @property
    def views_per_sample(self) -> int:
        return 2


class EMPSSLConfig(MethodConfig):
    """EMP-SSL (Tong et al. 2023): many fixed-scale patches, Total Coding Rate + invariance."""

    name: Literal["emp_ssl"] = "emp_ssl"
    reference = "Tong et al. 2023 (arXiv:2304.03977); tsb0601/EMP-SSL"
    num_patches: int = Field(20, ge=2, description="fixed-scale crops per image")
    eps: float = Field(0.2, gt=0, description="TCR distortion eps in logdet(I + d/(b*eps) ZZ^T)")
    invariance_weight: float = Field(200.0, ge=0, description="weight of the cosine term")
    tcr_weight: float = Field(1.0, ge=0, description="weight of the (negated) TCR term")

    reports = {"tcr": Metric(None, None, None), "invariance": Metric(None, None, None)}
    # EMP-SSL balances invariance_weight=200 against the coding rate of a 1024-d projection
    # and trains with LARS. With a 128-d head and plain SGD the invariance term dominates and
    # the embedding collapses (on digits: TCR 56 -> 13, kNN below the random encoder); with
    # these it learns (docs/methods.md). It is a few-epoch method (10 epochs by default) with
    # its own augmentation recipe (fixed-scale patches).
    defaults = {
        "model": {"proj_dim": 1024},
        "optim": {"name": "lars", "weight_decay": 1e-4},
        "train": {"epochs": 10},
        "eval": {"feature": "patch_avg"},
        "augment": {"recipe": "emp_ssl"},
    }
    # 8 patches per image instead of 20: EMP-SSL's step costs num_patches forward passes, and
    # small sets are for many short CPU runs
    small_data = ("method.num_patches=8",)
    tiny = {"num_patches": 4}
    smoke_fixed = ("num_patches",)

    @property
    def views_per_sample(self) -> int:
        return self.num_patches


class InstDiscConfig(MethodConfig):
    """InstDisc (Wu et al. 2018): one view per image against a memory bank of every image.

    ``nce_k > 0``: NCE with ``nce_k`` noise rows per image drawn uniformly from the bank and a
    constant normaliser Z (``z_estimate``); ``nce_k = 0``: the exact non-parametric softmax
    over the whole bank. ``nce_k`` must be smaller than the number of training images (checked
    when the method is built, where that number is known).
    """

    name: Literal["instdisc"] = "instdisc"
    reference = "Wu et al. 2018 (arXiv:1805.01978); zhirongw/lemniscate.pytorch"
    temperature: float = Field(0.07, gt=0, description="softmax temperature tau (paper: 0.07)")
    nce_k: int = Field(
        4096, ge=0, description="NCE noise samples per image (paper: 4096); 0 = full softmax"
    )
    bank_momentum: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="bank update v <- normalize(m * v + (1 - m) * f), m in [0, 1) (paper: 0.5)",
    )
    z_estimate: Literal["first_batch", "every_batch"] = Field(
        "first_batch",
        description="NCE normaliser Z = N * mean exp(v.f / tau) over the noise samples: "
        "estimated on the first batch and then fixed (paper, upstream), or on every batch",
    )
    proximal_weight: float = Field(
        0.0,
        ge=0.0,
        description="lambda of the proximal term lambda * ||f_i - v_i||^2 (paper Sec. 3.3; we "
        "found no value named for its reported runs, and upstream omits the term): 0 = off",
    )

    reports = {
        "proximal": Metric(None, 0.0, None),  # ||f_i - v_i||^2 of the L2-normalised features
        "log_z": Metric(None, None, None),  # log of the NCE normaliser Z
    }
    # the backbone's fc is one linear layer to 128-d (then L2 norm), as upstream's ResNet
    defaults = {"model": {"head": "linear"}}
    # nce_k below the training images; Z re-estimated every batch, because with the paper's
    # first-batch Z the small bank fills with look-alike rows of the young encoder and NCE
    # collapses (digits: kNN 85.5% -> 22-46%); SGD lr 0.03 as upstream's ImageNet script
    small_data = ("method.nce_k=1024", "method.z_estimate=every_batch", "optim.lr=0.03")
    tiny = {"nce_k": 64}  # below the 256 tiny training images
    smoke_fixed = ("nce_k",)

    @property
    def views_per_sample(self) -> int:
        return 1


class CMCConfig(MethodConfig):
    """CMC (Tian et al. 2019): one encoder per channel group (view) of a colour space, in-batch
    InfoNCE between the views' embeddings. Input normalisation happens after the colour
    conversion, inside the method, so ``augment.normalize`` must be false (the default for cmc).
    """

    name: Literal["cmc"] = "cmc"
    reference = "Tian et al. 2019 (arXiv:1906.05849); HobbitLong/CMC"
    colorspace: Literal["lab", "ycbcr", "rgb"] = Field(
        "lab", description="colour space the RGB image is converted to before the channel split"
    )
    views: tuple[tuple[int, ...], ...] = Field(
        ((0,), (1, 2)),
        description="channel indices (0-2 of the colour space) of each view; default L | ab",
    )
    graph: Literal["full", "core"] = Field(
        "full", description="view pairs contrasted: 'full' all pairs, 'core' view 0 vs the rest"
    )
    temperature: float = Field(
        0.07, gt=0, description="softmax temperature (upstream nce_t: 0.07 ImageNet, 0.1 STL-10)"
    )
    width_mult: float = Field(
        0.5,
        gt=0,
        le=4,
        description="channel multiplier of each view's encoder over model.backbone (paper: 0.5)",
    )
    shared_crop: bool = Field(
        True,
        description="all views are channels of one augmented crop (upstream); false: each view "
        "is cut from its own augmented crop",
    )

    reports = {"cmc_acc": Metric("max", 0.0, 1.0)}  # view-to-view top-1, a fraction
    # It converts raw [0, 1] RGB to its colour space and normalises there, so the augmentation
    # must not normalise. Upstream's L/ab recipe is crop + flip only: no colour jitter, and no
    # grayscale or blur (a grayscale image has a constant ab view).
    # Its kNN monitor is smaller: one crop through two half-width encoders makes a CMC epoch
    # 3-4x cheaper than SimCLR's, and the default 10000 + 2000 monitor images cost 9.8% of a
    # CIFAR-10 epoch (bench, CPU); 4000 + 1000 cost 3.9-4.3%, under the 5% budget. Its
    # knn_full_* at the end still uses every image, so final numbers compare across methods.
    defaults = {
        "augment": {"normalize": False, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0},
        "eval": {"monitor_train_size": 4000, "monitor_test_size": 1000},
    }
    # split R | GB, each view from its own crop: Lab's ab view is constant on gray images
    # (digits, position), and one shared crop would give two identical gray views
    small_data = ("method.colorspace=rgb", "method.shared_crop=false")
    tiny = {"colorspace": "rgb"}  # digits are gray: Lab's ab view would be constant

    def check(self, cfg: Config) -> None:
        if cfg.augment.normalize:
            raise ValueError(
                "augment.normalize must be false for method.name='cmc': the method converts raw "
                "[0, 1] RGB to method.colorspace and normalises its channels itself"
            )

    @model_validator(mode="after")
    def _check_views(self) -> CMCConfig:
        if len(self.views) < 2:
            raise ValueError(f"method.views needs at least 2 channel groups, got {self.views}")
        if any(len(g) == 0 for g in self.views):
            raise ValueError(f"method.views: every channel group needs a channel, got {self.views}")
        flat = [c for g in self.views for c in g]
        if any(c not in (0, 1, 2) for c in flat):
            raise ValueError(f"method.views: channel indices must be 0, 1 or 2, got {self.views}")
        if len(set(flat)) != len(flat):
            raise ValueError(
                f"method.views: channel groups must be disjoint (a shared channel lets the views "
                f"match trivially), got {self.views}"
            )
        return self

    @property
    def views_per_sample(self) -> int:
        return 1 if self.shared_crop else len(self.views)


class CPCConfig(MethodConfig):
    """CPC v2-style for images (Henaff et al. 2019): a grid of overlapping patches, a causal
    context network down the rows, InfoNCE on the encodings of the rows below.

    The paper cuts 64 px patches at stride 32 from 256 px images (a 7x7 grid); 8 px at stride 4
    is the same 7x7 grid on 32 px CIFAR images and a 3x3 grid on 16 px digits.
    """

    name: Literal["cpc"] = "cpc"
    reference = (
        "Henaff et al. 2019, van den Oord et al. 2018 (arXiv:1905.09272, 1807.03748); "
        "CPC v2 appendix pseudo-code, Lightning-Universe/lightning-bolts"
    )
    patch_size: int = Field(8, ge=1, description="side of the square patches, in pixels")
    patch_stride: int = Field(4, ge=1, description="pixels between neighbouring patches")
    prediction_steps: int = Field(
        2,
        ge=1,
        description="predict the rows k = 1..prediction_steps below each context row (v1: 5 on "
        "a 7x7 grid; 2 fits the 3x3 grid of 16 px digits)",
    )
    skip_steps: int = Field(
        0,
        ge=0,
        description="rows k <= skip_steps are not predicted (v2: 2 with prediction_steps 3, "
        "so the target shares no pixels with the context patch)",
    )
    context_layers: int = Field(
        5, ge=1, description="residual blocks of the causal PixelCNN-style context network"
    )
    context_hidden_dim: int = Field(256, ge=1, description="bottleneck width of those blocks")
    temperature: float = Field(
        10.0,
        gt=0,
        description="logits = prediction . target / temperature; v2's emb_scale 0.1 = 10 on "
        "raw dot products",
    )
    normalize: bool = Field(
        False, description="L2-normalise predictions and targets first (cosine logits; not v2)"
    )

    reports = {"cpc_acc": Metric("max", 0.0, 1.0)}  # patch-to-patch top-1, a fraction
    # v2 scores predictions against a linear 64-d projection of each patch encoding
    defaults = {"model": {"head": "linear", "proj_dim": 64}}
    # a small patch grid needs no 5-block context stack; at SGD lr 0.3 the digits kNN stalls
    # near the random encoder's 71.7% (74.6% best) while the task is solved
    small_data = ("method.context_layers=2", "method.context_hidden_dim=128", "optim.lr=0.03")
    # the 16 px tiny images make a 3-row patch grid; a narrow context network, as the default
    # one dwarfs the width-8 encoder
    tiny = {"prediction_steps": 2, "skip_steps": 0, "context_layers": 2, "context_hidden_dim": 32}
    smoke_fixed = ("prediction_steps", "skip_steps")

    def check(self, cfg: Config) -> None:
        _check_cpc_grid(self, cfg.data.image_size)

    @model_validator(mode="after")
    def _check_steps(self) -> CPCConfig:
        if self.skip_steps >= self.prediction_steps:
            raise ValueError(
                f"method.skip_steps ({self.skip_steps}) must be < method.prediction_steps "
                f"({self.prediction_steps}), else no row is predicted"
            )
        return self

    @property
    def views_per_sample(self) -> int:
        return 1


class InvaSpreadConfig(MethodConfig):
    """Invariance propagation / spreading instance feature (Ye et al. 2019), two views."""

    name: Literal["invaspread"] = "invaspread"
    reference = "Ye et al. 2019 (arXiv:1904.03436); mangye16/Unsupervised_Embedding_Learning"
    temperature: float = Field(0.1, gt=0, description="softmax temperature tau (paper: 0.1)")
    detach_other: bool = Field(
        True,
        description="each similarity f_i . f_j passes gradient to the anchor f_i only; the "
        "other side is detached (upstream's feat.data); false: to both sides",
    )

    # the backbone's fc is one linear layer to 128-d (then L2 norm), as upstream's ResNet
    defaults = {"model": {"head": "linear"}}

    @property
    def views_per_sample(self) -> int:
        return 2


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}
"""The method registry's config half (:func:`register_method_config`); the key is the method's
name: its file in ``methods/``, ``method.name``, its search space and its MLflow tag."""


def register_method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Make ``cls`` a method ``Config`` accepts (``method.name`` = its ``name`` default).

    Registering a name again with the same class is a no-op; with another class it is an error.
    The :class:`Config` model is rebuilt so that its ``method`` union includes the new class.
    """
    name = cls.model_fields["name"].default if "name" in cls.model_fields else None
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(
            f"{cls.__name__}: a method config needs `name: Literal['<name>'] = '<name>'`, "
            f"a Python identifier; got {name!r}"
        )
    known = METHOD_CONFIGS.get(name)
    if known is not None and known is not cls:
        raise ConfigError(f"method {name!r} is already registered by {known.__qualname__}")
    METHOD_CONFIGS[name] = cls
    if "Config" in globals():  # built-ins register before Config exists; later ones rebuild it
        field = Config.model_fields["method"]
        Config.model_fields["method"] = FieldInfo.merge_field_infos(
            field, annotation=_method_union()
        )
        Config.model_rebuild(force=True)
    return cls


def _method_union() -> Any:
    # pydantic picks the class by the `name` tag (errors then name the field, not the union)
    return Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]  # noqa: UP007


for _cls in (
    SimCLRConfig,
    SupConConfig,
    MoCoConfig,
    EMPSSLConfig,
    InstDiscConfig,
    InvaSpreadConfig,
    CMCConfig,
    CPCConfig,
):
    register_method_config(_cls)
MethodUnion = _method_union()


METHODS_ENV = "CONTRASTLAB_METHODS"
"""Environment variable: comma-separated modules that register methods of their own (imported
when a method name is not known yet; Ray workers inherit it from the driver)."""


def import_method_modules() -> None:
    """Import the modules listed in :data:`METHODS_ENV` (each registers its methods)."""
    for module in filter(None, (m.strip() for m in os.environ.get(METHODS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{METHODS_ENV}: cannot import {module!r}: {e}") from None


def find_method_config(name: Any) -> type[MethodConfig] | None:
    """The config class registered for ``name``, importing the :data:`METHODS_ENV` modules
    first if it is not known yet; ``None`` if it is still unknown."""
    if not isinstance(name, str):
        return None
    if name not in METHOD_CONFIGS:
        import_method_modules()
    return METHOD_CONFIGS.get(name)


def reported_metrics() -> dict[str, Metric]:
    """Every metric a run may report (what a sweep may optimise): the trainer's, each registered
    method's ``reports``, then the label-free monitors'."""
    out = dict(TRAINER_METRICS)
    for cls in METHOD_CONFIGS.values():
        out.update(cls.reports)
    out.update(LABEL_FREE_METRICS)
    return out


def metric_owners(metric: str) -> tuple[str, ...] | None:
    """The methods that report ``metric``, or ``None`` when every method does."""
    if metric in TRAINER_METRICS or metric in LABEL_FREE_METRICS:
        return None
    return tuple(name for name, cls in METHOD_CONFIGS.items() if metric in cls.reports)


# --------------------------------------------------------------------------- model

Backbone = Literal[
    "convnet",
    "cifar_resnet18",
    "cifar_resnet34",
    "cifar_resnet50",
    "resnet18",
    "resnet34",
    "resnet50",
]


class ModelConfig(_Strict):
    """Backbone and projection head."""

    backbone: Backbone = "convnet"
    width: int = Field(32, ge=4, description="base channel count of the 'convnet' backbone")
    head: Literal["mlp", "linear", "none"] = "mlp"
    head_hidden_dim: int = Field(512, ge=1)
    head_layers: int = Field(2, ge=1, description="linear layers in the MLP head")
    head_batchnorm: bool = Field(True, description="BatchNorm between MLP head layers")
    proj_dim: int = Field(128, ge=1, description="output dim of the projection head")


# --------------------------------------------------------------------------- data

Dataset = Literal["digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet"]
#: Datasets ``data.source: stream`` can read batch by batch (files of encoded images).
STREAMED = ("parquet", "imagefolder")


class DataConfig(_Strict):
    """Where images come from. ``root`` is required for every dataset but ``digits``."""

    dataset: Dataset = "digits"
    root: str | None = Field(None, description="dataset directory")
    test_root: str | None = Field(
        None, description="held-out directory for imagefolder/parquet (else a split of root)"
    )
    image_size: int = Field(16, ge=4, description="images are resized to this square size")
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="held-out share when a dataset has no official test split"
    )
    split_seed: int = Field(0, description="seed of that held-out split")
    max_train_samples: int | None = Field(None, ge=1, description="truncate the train set")
    unlabeled: bool = Field(
        False, description="STL-10: also train on the 100k unlabeled images (label -1)"
    )
    on_device: bool = Field(True, description="hold the whole dataset as one tensor on device")
    labels: bool = Field(
        True,
        description="the training images carry labels; false: train on the images alone (no "
        "label is read or needed, parquet shards may lack the 'label' column); kNN and the "
        "linear probe then use eval_dataset/eval_root, and without one only the label-free "
        "monitors run (a sweep must optimise one of them)",
    )
    eval_dataset: Dataset | None = Field(
        None,
        description="format of a separate labeled evaluation set (default: data.dataset when "
        "eval_root is set; 'digits' needs no eval_root)",
    )
    eval_root: str | None = Field(
        None,
        description="a separate labeled set for kNN and the linear probe, split by "
        "test_fraction / split_seed into kNN memory and queries; default null: the held-out "
        "split of root (test_root or a split), or with labels: false no labeled evaluation",
    )
    source: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="'memory': decode every training image once into one uint8 tensor; "
        "'stream': read and decode parquet shards or an image folder's files with Ray Data on "
        "CPU workers, batch by batch, every epoch; 'auto': memory when the decoded training "
        "set (N * 3 * S * S bytes) is under stream_above_gb, else stream (parquet and "
        "imagefolder; the other datasets are always in memory)",
    )
    stream_above_gb: float = Field(
        8.0, gt=0, description="source='auto' streams training sets whose decoded size exceeds it"
    )
    stream_chunk_rows: int = Field(
        64,
        ge=1,
        description="stream: the epoch order permutes chunks of this many consecutive rows",
    )
    stream_task_chunks: int = Field(
        8,
        ge=1,
        description="stream: chunks one decode task mixes (their rows shuffled together); "
        "with stream_chunk_rows it sets how far from the source order a batch can draw",
    )
    stream_object_store_mb: int = Field(
        512,
        ge=64,
        description="stream: object store size of the local Ray a run starts when none is "
        "running (a cluster's own setting applies otherwise)",
    )
    stream_task_cpus: float = Field(
        1.0,
        gt=0,
        description="stream: CPUs each decode task reserves on the Ray cluster (placement "
        "only, results do not depend on it); leave this many CPUs free beside a trial's "
        "workers, or add CPU-only nodes (docs/cluster.md)",
    )
    decode_errors: Literal["stop", "skip"] = Field(
        "stop",
        description="stream: an image that fails to decode stops the run naming its file and "
        "row ('stop'), or is left out and counted ('skip': decode_skipped in the metrics, "
        "a line on stderr naming the rows each epoch; one worker only)",
    )

    @model_validator(mode="after")
    def _eval_set(self) -> DataConfig:
        if self.eval_dataset not in (None, "digits") and self.eval_root is None:
            raise ValueError(
                f"data.eval_dataset={self.eval_dataset!r} needs data.eval_root (the directory "
                "of the labeled evaluation set); only 'digits' needs none"
            )
        if self.source == "stream" and self.dataset not in STREAMED:
            raise ValueError(
                f"data.source='stream' reads parquet shards or image folders; "
                f"data.dataset={self.dataset!r} is decoded into memory; allowed: data.source "
                f"auto/memory, or data.dataset {' / '.join(STREAMED)}"
            )
        return self

    @property
    def has_eval_set(self) -> bool:
        """Whether a separate labeled evaluation set is named (``eval_dataset``/``eval_root``)."""
        return self.eval_dataset is not None or self.eval_root is not None

    @property
    def has_labels(self) -> bool:
        """Whether kNN and the linear probe have labels: the training data's or an evaluation
        set's. Known from the config alone, so a sweep is checked before any data is read."""
        return self.labels or self.has_eval_set

    def eval_config(self) -> DataConfig:
        """The data config that loads the evaluation set: ``eval_dataset`` at ``eval_root``,
        the same image size, split by ``test_fraction`` / ``split_seed``."""
        return DataConfig(
            dataset=self.eval_dataset or self.dataset,
            root=self.eval_root,
            image_size=self.image_size,
            test_fraction=self.test_fraction,
            split_seed=self.split_seed,
            on_device=self.on_device,
        )


# --------------------------------------------------------------------------- augmentation


class AugmentConfig(_Strict):
    """Batched augmentation recipe, applied on the training device.

    ``recipe`` picks the defaults of every other field (SimCLR/MoCo v2, EMP-SSL, or the digits
    variant of SimCLR's); any field set explicitly wins. The saved config holds the resolved
    values. When ``recipe`` is not given it follows the method and dataset: ``emp_ssl`` for
    EMP-SSL, ``digits`` on the built-in digits, else ``simclr``.

    The colour-identity, inversion, rotation and erasing ops (``channel_shuffle_p`` to
    ``erase_value``) are off by default and in every recipe; where each sits in the pipeline
    is listed in :mod:`contrastlab.augment`.
    """

    recipe: Literal["simclr", "emp_ssl", "digits"] = "simclr"
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    rotate_degrees: float = Field(
        0.0, ge=0, le=180, description="rotate each view by U(-d, d) degrees (counter-clockwise +)"
    )
    rotate_fill: Literal["image", "zeros"] = Field(
        "image",
        description=(
            "what a rotated view shows where it leaves its crop box: 'image' (the source image "
            "around the box; its edge replicated beyond the image) or 'zeros' (black, as "
            "torchvision's RandomRotation after the crop)"
        ),
    )
    channel_shuffle_p: float = Field(
        0.0, ge=0, le=1, description="permute RGB by a uniform random permutation (of all 6)"
    )
    channel_gain: tuple[float, float] = Field(
        (1.0, 1.0), description="multiply each channel by U(low, high), then clamp; (1, 1) = off"
    )
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = Field(
        0.1, gt=0, le=1, description="Gaussian kernel size as a fraction of the output size"
    )
    solarize_p: float = Field(0.0, ge=0, le=1)
    solarize_threshold: float = Field(0.5, ge=0, le=1)
    invert_p: float = Field(0.0, ge=0, le=1, description="intensity inversion x -> 1 - x")
    normalize: bool = Field(True, description="subtract dataset mean, divide by std")
    erase_p: float = Field(0.0, ge=0, le=1, description="erase one random rectangle per view")
    erase_scale: tuple[float, float] = Field(
        (0.02, 0.33), description="erased area as a fraction of the view, U(low, high)"
    )
    erase_ratio: tuple[float, float] = Field(
        (0.3, 3.3), description="erased rectangle's height / width, log-uniform in the range"
    )
    erase_value: float | Literal["random"] = Field(
        0.0,
        description=(
            "what the erased rectangle holds, written into the final (normalised, if normalize) "
            "output: a number (0 = the dataset mean colour when normalize, black when not) or "
            "'random' (i.i.d. N(0, 1) per pixel and channel, as torchvision's value='random')"
        ),
    )

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for key in ("crop_scale", "crop_ratio", "blur_sigma", "erase_scale", "erase_ratio"):
            lo, hi = getattr(self, key)
            if not (0 < lo <= hi < math.inf):
                raise ValueError(f"augment.{key} must satisfy 0 < low <= high, got {(lo, hi)}")
        for key in ("crop_scale", "erase_scale"):
            if getattr(self, key)[1] > 1:
                raise ValueError(f"augment.{key} high must be <= 1, got {getattr(self, key)[1]}")
        lo, hi = self.channel_gain
        if not (0 <= lo <= hi < math.inf):
            raise ValueError(
                f"augment.channel_gain must satisfy 0 <= low <= high, got {(lo, hi)}; "
                "(1.0, 1.0) turns it off"
            )
        if isinstance(self.erase_value, float) and not math.isfinite(self.erase_value):
            raise ValueError(
                f"augment.erase_value must be a finite number or 'random', got {self.erase_value}"
            )
        return self


AUGMENT_RECIPES: dict[str, dict[str, Any]] = {
    # SimCLR / MoCo v2 (Chen et al. 2020): random resized crop, flip, jitter 0.8, gray 0.2, blur.
    "simclr": {},
    # EMP-SSL: fixed-scale 0.25 crops of ratio 1, jitter, grayscale, blur 0.1, solarize 0.1.
    "emp_ssl": {
        "crop_scale": (0.25, 0.25),
        "crop_ratio": (1.0, 1.0),
        "blur_p": 0.1,
        "solarize_p": 0.1,
    },
    # 8x8 digits: a 20% crop or a mirror image no longer shows the same digit (a mirrored 2 is
    # not a 2), so milder crops and no flip; blur of an upscaled 8x8 image removes the digit.
    # Same 100-epoch run: SimCLR's recipe 85.5% -> 88.4% kNN, this one 85.5% -> 93.8% (README).
    "digits": {"crop_scale": (0.3, 1.0), "flip_p": 0.0, "blur_p": 0.0},
}


# --------------------------------------------------------------------------- optimisation


class OptimConfig(_Strict):
    """Optimizer and learning-rate schedule (linear warmup, then cosine to ``final_lr``)."""

    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = Field(0.3, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/LARS momentum")
    betas: tuple[float, float] = (0.9, 0.999)
    lars_eta: float = Field(0.001, gt=0, description="LARS trust coefficient")
    exclude_bias_and_norm: bool = Field(
        True, description="no weight decay / LARS adaptation on biases and norm weights"
    )
    warmup_epochs: float = Field(0.0, ge=0)
    final_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine")
    fused: bool = Field(True, description="fused optimizer kernels on CUDA (ignored on CPU)")


# --------------------------------------------------------------------------- evaluation


class EvalConfig(_Strict):
    """Evaluation protocol; every reported number is logged with the protocol that made it."""

    knn_k: int | None = Field(
        None,
        ge=1,
        description="neighbours of the weighted kNN monitor; null (default) picks k from the "
        "memory it searches: round(N_memory / (5 * classes)) clipped to [5, 200] (200 for a "
        "10,000-image CIFAR-10 memory, 27 for the 1,347 digits), so the neighbours stay within "
        "a fifth of one class's share of the memory; protocol.json records the k used",
    )
    knn_t: float = Field(0.1, gt=0, description="temperature of the kNN vote weights")
    knn_every: int = Field(1, ge=0, description="run the kNN monitor every N epochs (0 = never)")
    knn_at_init: bool = Field(
        True, description="also run it before training: the random-init encoder baseline"
    )
    monitor_train_size: int = Field(
        10000,
        ge=0,
        description="kNN memory images of the per-epoch monitor, a fixed subset (0 = all); "
        "the last epoch also reports knn_full_* on every image",
    )
    monitor_test_size: int = Field(
        2000,
        ge=0,
        description="kNN query images of the per-epoch monitor, a fixed subset (0 = all)",
    )
    knn_full_at_end: bool = Field(
        True,
        description="after the last epoch, also kNN on every image (knn_full_*) when the "
        "monitor uses subsets; false saves its cost (~20% of a CIFAR epoch) in short trials",
    )
    feature: Literal["backbone", "patch_avg"] = Field(
        "backbone", description="'patch_avg': EMP-SSL mean of backbone features over patches"
    )
    num_patches: int = Field(16, ge=1, description="patches averaged when feature='patch_avg'")
    linear_probe: bool = Field(False, description="train a linear probe at the end of training")
    probe_epochs: int = Field(100, ge=1)
    probe_lr: float = Field(0.1, gt=0)
    probe_weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(
        512,
        ge=1,
        description="feature extraction batch size; with feature='patch_avg' it also groups "
        "the random patch draws (batch_size // num_patches images per draw), so it changes "
        "EMP-SSL's numbers",
    )
    label_free: bool = Field(
        True,
        description="with every kNN monitor run (epoch 0 included), also the label-free "
        "monitors: rankme (effective rank of the memory features), alignment and uniformity "
        "(two augmented views of label_free_size images) and nuisance_r2 (the shortcut probe); "
        "the run prints and records a diagnosis when they show a shortcut or a collapse",
    )
    label_free_size: int = Field(
        256,
        ge=2,
        description="images, the first of the monitor memory subset, whose two augmented views "
        "(the training augmentation, seed 0 in every epoch and run) give alignment and "
        "uniformity; each costs two extra forward passes (256: +512 forwards, about 4% more than "
        "a 12,000-image CIFAR monitor forwards; +30% monitor time on the 1,797 digits)",
    )
    nuisance_ridge: float = Field(
        0.1,
        gt=0,
        description="ridge strength of the nuisance_r2 probe: on standardised evaluation "
        "features it minimises mean squared error + nuisance_ridge * ||w||^2, fit on the "
        "monitor memory subset, R^2 scored on the monitor test subset (held out, so a weak "
        "ridge does not inflate it)",
    )


# --------------------------------------------------------------------------- training


class TrainConfig(_Strict):
    """Loop, precision and checkpoint settings. Where a run is written and whether it shows
    progress are not config (they do not change results): see
    :class:`contrastlab.rundir.RunPlace`."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16 autocast for the forward pass (CUDA or CPU)"
    )
    channels_last: bool = Field(
        True, description="channels_last memory format for model and inputs"
    )
    compile: bool = Field(False, description="torch.compile the backbone, fall back on failure")
    compile_backend: str = Field("inductor", description="torch.compile backend")
    grad_clip: float | None = Field(None, gt=0)
    max_loss: float | None = Field(
        None,
        gt=0,
        description="abort (DivergenceError) when the epoch's running mean loss exceeds it; "
        "checked with the NaN/inf guard every log_every steps",
    )
    deterministic: bool = Field(True, description="deterministic algorithms (CPU exact repeat)")
    checkpoint_every: int = Field(1, ge=1, description="save a checkpoint every N epochs")
    keep_checkpoints: int = Field(2, ge=1, description="how many epoch checkpoints to keep")
    log_every: int = Field(
        20, ge=1, description="steps between progress-bar updates (each one syncs the device)"
    )


# --------------------------------------------------------------------------- top level


class Config(_Strict):
    """A full run description. Build it with :func:`load_config` or :func:`make_config`."""

    method: MethodUnion = Field(default_factory=SimCLRConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        m = self.method
        if self.data.dataset != "digits" and self.data.root is None:
            raise ValueError(f"data.root is required for data.dataset={self.data.dataset!r}")
        if self.eval.linear_probe and not self.data.has_labels:
            raise ValueError(
                "eval.linear_probe needs labels, but data.labels is false and no evaluation set "
                "is named; allowed: eval.linear_probe: false, or set data.eval_root (and "
                "data.eval_dataset)"
            )
        m.check(self)
        return self

    @property
    def views_per_sample(self) -> int:
        """How many augmented views the method draws per image each step (each method config
        class says, in its own ``views_per_sample``)."""
        return self.method.views_per_sample

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of every resolved value."""
        return _plain(self.model_dump(mode="python"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"method.temperature": 0.5, ...}``: one entry per leaf, for trackers."""
        return dict(_flatten(self.to_dict()))


RUN_PLACE_KEYS = {
    "train.output_dir": "--output-dir",
    "train.run_name": "--run-name",
    "train.progress": "--progress / --no-progress",
}
"""Keys that earlier versions had in the config, with the ``contrastlab train`` flag that took
each one's place: where a run is written and whether it shows progress do not change its
results (see :class:`contrastlab.rundir.RunPlace`)."""


def _check_cpc_grid(m: CPCConfig, image_size: int) -> None:
    """The patch grid must cover the image and have rows left to predict."""
    p, s = m.patch_size, m.patch_stride
    if p > image_size:
        raise ValueError(f"method.patch_size ({p}) must be <= data.image_size ({image_size})")
    if (image_size - p) % s:
        raise ValueError(
            f"data.image_size - method.patch_size ({image_size} - {p}) must be a multiple of "
            f"method.patch_stride ({s}) so that the patch grid covers the image"
        )
    rows = (image_size - p) // s + 1
    if rows < m.prediction_steps + 1:
        raise ValueError(
            f"method.prediction_steps ({m.prediction_steps}) needs a patch grid of at least "
            f"{m.prediction_steps + 1} rows; data.image_size={image_size}, "
            f"method.patch_size={p}, method.patch_stride={s} give {rows}"
        )


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


# --------------------------------------------------------------------------- building

TINY: dict[str, dict[str, Any]] = {
    "data": {"dataset": "digits", "root": None, "image_size": 16, "max_train_samples": 256},
    "model": {"backbone": "convnet", "width": 8, "head_hidden_dim": 32, "proj_dim": 16},
    "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
    "eval": {"knn_k": 20, "num_patches": 4},
}
"""The tiny setting: a width-8 convnet on 256 digits at 16 px, an epoch well under a second on
2 CPU cores (tests, smoke sweeps and ablations, smoke benchmarks); each method adds its
``tiny`` fields (:func:`tiny_raw`)."""


def tiny_raw(method: str = "simclr") -> dict[str, Any]:
    """The raw (unvalidated) tiny config of ``method``: :data:`TINY` + the method's ``tiny``."""
    raw = copy.deepcopy(TINY)
    raw["method"] = {"name": method, **copy.deepcopy(METHOD_CONFIGS[method].tiny)}
    return raw


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "train": TrainConfig,
}


def _resolve_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill the defaults that depend on other choices, so the saved config is concrete."""
    raw = copy.deepcopy(raw)
    method = raw.setdefault("method", {})
    if not isinstance(method, dict):
        raise ConfigError(f"'method' must be a mapping with a 'name' key, got {method!r}")
    name = method.setdefault("name", "simclr")
    if find_method_config(name) is None:
        raise ConfigError(
            f"method.name: unknown method {name!r}; allowed: {sorted(METHOD_CONFIGS)}"
        )
    for section in SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"'{section}' must be a mapping, got {raw[section]!r}")
    METHOD_CONFIGS[name].resolve_defaults(raw)
    augment = raw.setdefault("augment", {})
    data = raw.get("data") or {}
    dataset = data.get("dataset", DataConfig.model_fields["dataset"].default)
    default_recipe = "digits" if dataset == "digits" else "simclr"
    recipe = augment.setdefault("recipe", default_recipe)
    if not isinstance(recipe, str) or recipe not in AUGMENT_RECIPES:
        raise ConfigError(
            f"augment.recipe: unknown recipe {recipe!r}; allowed: {sorted(AUGMENT_RECIPES)}"
        )
    for key, value in AUGMENT_RECIPES[recipe].items():
        augment.setdefault(key, value)
    return raw


def did_you_mean(name: Any, allowed: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when ``name`` is close to one of ``allowed``, else ``""``."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def rule(message: str, at: str = "") -> PydanticCustomError:
    """A broken rule, to raise from a validator: :func:`error_lines` reports it as
    ``key: message``, the key being the validated field's (plus ``.at`` when given: a model
    validator names the field it blames)."""
    return PydanticCustomError("rule", message, {"at": at})


def _strip(tp: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (Union, types.UnionType) and type(None) in (
            args := typing.get_args(tp)
        ):
            rest = tuple(a for a in args if a is not type(None))
            tp = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _members(tp: Any) -> dict[str, Any]:
    """A tagged union's members by tag (``{}`` when ``tp`` is not one)."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return {}
    out = {}
    for m in typing.get_args(tp):
        # a member tagged for a callable discriminator: Annotated[X, ..., Tag("name")]
        meta = typing.get_args(m)[1:] if typing.get_origin(m) is Annotated else ()
        out.update({t.tag: m for t in meta if type(t).__name__ == "Tag"})
        for f in m.model_fields.values() if _is_model(m) else ():
            tags = typing.get_args(f.annotation)
            if typing.get_origin(f.annotation) is Literal and len(tags) == 1:
                out[tags[0]] = m
    return out


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """``loc`` as the user wrote it (pydantic adds the tag of a union member, which is no key
    of the input) and the type found there (``None`` once ``loc`` leaves the typed part)."""
    shown: list[Any] = []
    tp: Any = root
    for part in loc:
        tp = _strip(tp)
        if part in _members(tp):
            tp = _members(tp)[part]
            continue
        shown.append(part)
        if _is_model(tp):
            f = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = f.annotation if f is not None else None
        elif typing.get_origin(tp) in (dict, Mapping):
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        else:
            tp = None
    return shown, _strip(tp)


def error_lines(
    err: ValidationError,
    root: type[BaseModel],
    keys: Callable[[Iterable[str]], list[str]] = list,
    moved: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per problem in ``err`` (from validating ``root``), each naming its key:
    ``key: unknown key (did you mean 'x'?); allowed: a, b``, ``key: <rule> (got <value>)``,
    ``key: required key is missing; required: a, b``; a rule of the whole model (a
    ``ValueError`` of a model validator) is its own message. ``keys`` orders the allowed keys;
    ``moved`` maps keys that no longer exist to what replaced them (said instead of "unknown").
    """
    lines = []
    for e in err.errors():
        shown, _ = _walk(root, e["loc"])
        key = ".".join(str(p) for p in shown) or "<config>"
        ctx = e.get("ctx", {})
        got = e.get("input")
        _, parent = _walk(root, e["loc"][:-1])
        if e["type"] == "extra_forbidden" and moved and key in moved:
            lines.append(f"{key}: {moved[key]}")
        elif e["type"] in ("extra_forbidden", "invalid_key"):
            allowed = keys(parent.model_fields) if _is_model(parent) else []
            hint = did_you_mean(shown[-1], allowed)
            lines.append(f"{key}: unknown key{hint}; allowed: {', '.join(allowed)}")
        elif e["type"] == "missing" and _is_model(parent):
            need = [n for n, f in parent.model_fields.items() if f.is_required()]
            lines.append(f"{key}: required key is missing; required: {', '.join(need)}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = ctx["discriminator"].strip("'")
            allowed = [str(t) for t in _members(_walk(root, e["loc"])[1])]
            if e["type"] == "union_tag_not_found":
                why = "required key is missing"
            else:
                why = f"unknown {tag} {ctx['tag']!r}{did_you_mean(ctx['tag'], allowed)}"
            lines.append(f"{key}.{tag}: {why}; allowed: {', '.join(allowed)}")
        elif e["type"] == "rule":
            at = ".".join(p for p in (*map(str, shown), ctx["at"]) if p)
            lines.append(f"{at}: {e['msg']}" if at else e["msg"])
        elif e["type"] == "value_error" and not shown:
            # cross-field rules: the message itself names the keys
            lines.append(str(ctx["error"]) if "error" in ctx else e["msg"])
        elif shown and shown[-1] == "[key]":
            parent = ".".join(str(p) for p in shown[:-2]) or "<top level>"
            lines.append(f"{parent}: key {got!r}: {e['msg']}")
        else:
            shown_got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key}: {e['msg']}{shown_got}")
    return lines


# what a config that still sets a run-place key is told
_MOVED = {
    key: "not a config key: where a run is written and whether it shows progress do not change "
    f"its results (did you mean the `contrastlab train` flag {flag}?)"
    for key, flag in RUN_PLACE_KEYS.items()
}


def _format_error(err: ValidationError) -> str:
    lines = error_lines(err, Config, keys=sorted, moved=_MOVED)
    return "invalid config:\n  " + "\n  ".join(lines)


def make_config(raw: Mapping[str, Any] | None = None) -> Config:
    """Validate a nested mapping into a :class:`Config`; raise :class:`ConfigError` if bad."""
    raw = dict(raw or {})
    top_allowed = sorted(Config.model_fields)
    for key in raw:
        if key not in top_allowed:
            hint = did_you_mean(str(key), top_allowed)
            raise ConfigError(f"{key}: unknown section{hint}; allowed: {', '.join(top_allowed)}")
    resolved = _resolve_defaults(raw)
    try:
        return Config.model_validate(resolved)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def saved_config(text: str) -> Config:
    """The config a run saved (YAML ``text``: a run directory's ``config.yaml``, a checkpoint's
    or an MLflow run's copy), validated as :func:`make_config` does, except that the keys
    earlier versions saved there and that are no longer config (:data:`RUN_PLACE_KEYS`) are
    dropped: runs of those versions still resume and reproduce."""
    raw = yaml.safe_load(text) or {}
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict):
        raw["train"] = {k: v for k, v in train.items() if f"train.{k}" not in RUN_PLACE_KEYS}
    return make_config(raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"method.temperature=0.2"`` -> ``(["method", "temperature"], 0.2)`` (YAML-typed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, _, value = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return path, parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=value`` override set."""
    out = copy.deepcopy(dict(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (optional), apply ``overrides``, validate. Errors name file and key."""
    raw = read_yaml(path) if path is not None else {}
    try:
        return make_config(apply_overrides(raw, overrides))
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise
