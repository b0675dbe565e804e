"""Training-step benchmark: how fast one step runs, where its time goes, and how it compares
with the reference implementations' loop, all in one process on the same machine.

On a GPU machine (cifar_resnet18, bf16, torch.compile, channels_last by default on CUDA; the
reference loop with 8 DataLoader workers, as the reference repos run it), from the repository
root (``python pipelines/bench.py`` takes the same flags)::

    python -m benchmarks.step --workers 8 --out bench.json

On a cluster (docs/cluster.md), on a GPU worker rather than the head::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --entrypoint-num-gpus 1 -- python -m benchmarks.step --workers 8

On a CPU (convnet, fp32, no compile by default there); the commands behind each table of
docs/benchmarks.md are written above it. In seconds, with a tiny model and data::

    python -m benchmarks.step --smoke-test

All flags: ``python -m benchmarks.step --help``.

For each method it builds a :class:`~contrastlab.train.Trainer` on synthetic CIFAR-sized data
(random ``uint8 [N, 3, 32, 32]`` images, 10 classes: the timings do not depend on pixel
values) and measures, as the median of ``repeats`` timed calls (each ``steps`` steps) after
``warmup`` untimed ones, with ``torch.cuda.synchronize`` before reading the clock on CUDA:

* the full step, :meth:`Trainer.train_step` (augmentation + forward + loss + backward +
  optimizer step + the method's end-of-step update): the code ``train_epoch`` runs per step;
* augmentation alone (:meth:`Trainer.views`) and the model step alone on pre-augmented views
  (:meth:`Trainer.model_step`), and the share of the step spent augmenting;
* peak memory: ``torch.cuda.max_memory_allocated`` over the warm-up steps on CUDA; on CPU
  the process's peak resident set size (``getrusage``), which only grows over a run;
* FLOPs of one step's forward + backward (``torch.utils.flop_counter.FlopCounterMode`` on an
  eager copy of the model), the FLOP/s achieved and, on a GPU in :data:`PEAK_TFLOPS`, the model
  FLOPs utilisation (MFU);
* one real epoch (``Trainer.train_epoch``) and the per-epoch kNN monitor
  (``Monitor.knn``, on its ``eval.monitor_*_size`` subsets of ``train_size`` /
  ``test_size`` images), and the monitor's time as a share of the epoch's; with
  ``epoch_images`` the epoch runs over that many images and its time is scaled to
  ``train_size`` (a CIFAR-sized epoch of a ResNet takes an hour on a CPU);
* for the ``baseline`` methods, the reference repos' loop on the same model, batch and number
  of views: per-image PIL/torchvision augmentation in a ``torch.utils.data.DataLoader``
  (``workers`` processes), fp32, no ``torch.compile``, NCHW memory layout. Its timed calls
  alternate with ours (:func:`time_interleaved`), so a load that drifts during the run (a
  shared machine) does not bias the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from contrastlab.config import TINY, AugmentConfig, Config, find_method_config, make_config
from contrastlab.data import DatasetSplits, ImageDataset
from contrastlab.data.core import channel_stats
from contrastlab.methods import METHODS, build_method
from contrastlab.rundir import RunPlace
from contrastlab.train import Trainer

__all__ = [
    "PEAK_TFLOPS",
    "BenchSettings",
    "Pipeline",
    "bench_config",
    "count_step_flops",
    "main",
    "measure",
    "peak_tflops",
    "reference_transform",
    "run",
    "synthetic_splits",
    "time_interleaved",
]

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets, by the dtype the tensor cores
# run: bf16 autocast, tf32 (cuDNN's default for fp32 convolutions on Ampere and later) and
# plain fp32. Matched against torch.cuda.get_device_name() in order, first match wins (so the
# PCIe/NVL variants come before the bare name). None: the GPU has no such tensor-core mode.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    (r"H100.*PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM, and GH200
    (r"A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    (r"L40\b", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"V100", {"bf16": None, "tf32": None, "fp32": 15.7}),
    (r"\bT4\b", {"bf16": None, "tf32": None, "fp32": 8.1}),
)

#: The issue's bound on the kNN monitor's cost: a share of one epoch's training time.
KNN_SHARE_LIMIT = 0.05

DEFAULT_METHODS = ("simclr", "emp_ssl", "moco", "supcon")
DEFAULT_BASELINE = ("simclr", "emp_ssl")


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` for ``dtype`` (``bf16``, ``tf32``, ``fp32``).

    Returns:
        The datasheet figure, or None for a GPU not in :data:`PEAK_TFLOPS` (or a dtype it has
        no tensor-core mode for).
    """
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(dtype)
    return None


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BenchSettings:
    """Everything a benchmark run depends on; ``None`` fields take the device's default
    (:meth:`resolved`)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    baseline: tuple[str, ...] = DEFAULT_BASELINE
    device: str = "auto"
    backbone: str | None = None  # cifar_resnet18 on CUDA, convnet on CPU
    batch: int = 256
    precision: str | None = None  # bf16 on CUDA, fp32 on CPU
    compile: bool | None = None  # on for CUDA, off on CPU
    channels_last: bool = True
    deterministic: bool = False  # False: cudnn.benchmark picks the fastest kernels
    image_size: int = 32
    train_size: int | None = None  # images of the epoch / kNN memory (CIFAR-10: 50000)
    test_size: int | None = None  # kNN queries (CIFAR-10: 10000)
    epoch: bool = True  # time one real epoch and the kNN monitor
    epoch_images: int | None = None  # time the epoch on this many images, scaled to train_size
    repeats: int = 5
    warmup: int = 2
    steps: int | None = None  # steps per timed call: 10 on CUDA, 2 on CPU
    workers: int = 0  # DataLoader processes of the baseline
    threads: int | None = None  # torch intra-op threads (default: torch's)
    smoke: bool = False  # a tiny model and data set: a seconds-long run (CI)

    def resolved(self) -> BenchSettings:
        """The settings with every device-dependent default filled in."""
        dev = self.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        cuda = dev == "cuda"
        s = replace(
            self,
            device=dev,
            backbone=self.backbone or ("cifar_resnet18" if cuda else "convnet"),
            precision=self.precision or ("bf16" if cuda else "fp32"),
            compile=cuda if self.compile is None else self.compile,
            steps=self.steps or (10 if cuda else 2),
        )
        if self.smoke:
            return replace(
                s,
                batch=min(s.batch, 16),
                train_size=self.train_size or 256,  # the tiny setting's size
                test_size=self.test_size or 32,
                repeats=1,
                warmup=1,
                steps=1,
            )
        return replace(s, train_size=s.train_size or 50_000, test_size=s.test_size or 10_000)


def synthetic_splits(
    n_train: int, n_test: int, size: int = 32, num_classes: int = 10, seed: int = 0
) -> DatasetSplits:
    """CIFAR-like splits of random ``uint8`` images and labels (on the CPU)."""
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, num_classes, (n,), generator=g)

    x_train, x_test = images(n_train), images(n_test)
    mean, std = channel_stats(x_train)

    def wrap(x: torch.Tensor, split: str) -> ImageDataset:
        return ImageDataset(x, labels(len(x)), num_classes, mean, std, f"synthetic/{split}")

    return DatasetSplits(train=wrap(x_train, "train"), test=wrap(x_test, "test"))


def bench_config(method: str, s: BenchSettings, reference: bool = False) -> Config:
    """The run config of ``method`` under resolved settings ``s``.

    The method's own defaults stand (EMP-SSL's 20 patches, LARS, patch-averaged kNN features,
    MoCo's 4096 queue rounded up to a multiple of the batch by its ``fit_batch``); a smoke run
    takes the method's ``tiny`` fields. ``reference``: the baseline's
    config, fp32, no compile, NCHW, the data set kept on the CPU for the DataLoader.
    """
    cls = find_method_config(method)
    if cls is None or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {sorted(METHODS)}")
    raw: dict[str, Any] = {
        "method": {"name": method},
        # CIFAR-sized colour images (so no method warns about gray digits); nothing is read
        # from data.root: the Trainer gets the synthetic splits directly
        "data": {
            "dataset": "cifar10",
            "root": "(synthetic, not read)",
            "image_size": s.image_size,
        },
        "model": {"backbone": s.backbone},
        "train": {
            "batch_size": s.batch,
            "device": s.device,
            "precision": "fp32" if reference else s.precision,
            "compile": False if reference else s.compile,
            "channels_last": False if reference else s.channels_last,
            "deterministic": s.deterministic,
            "epochs": 1,
        },
    }
    if reference:
        raw["data"]["on_device"] = False
    if s.smoke:  # the method's tiny setting (sizes that fit the smoke images)
        raw["method"].update(cls.tiny)
        raw["model"].update(TINY["model"])
        raw["eval"] = {"batch_size": 64, "num_patches": 2}
    # sizes the batch dictates (MoCo's queue: a multiple of it, rounded up)
    raw["method"].update(cls.fit_batch(s.batch, raw["method"]))
    return make_config(raw)


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Pipeline:
    """A training loop to time: ``timers`` each run ``steps`` steps of one part of it.

    Attributes:
        name: ``"ours"`` or ``"reference"``.
        views_per_step: batch x views.
        timers: ``"step"`` (the whole step), ``"augment"`` (the views alone) and ``"model"``
            (the step on fixed, pre-augmented views).
    """

    name: str
    views_per_step: int
    timers: dict[str, Callable[[], object]]


def warm_up(p: Pipeline, device: torch.device, calls: int) -> float:
    """Untimed calls of every timer; returns the peak memory (MiB) of the step's calls."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(calls, 1)):  # at least one: it sets the peak memory
        p.timers["step"]()
    _sync(device)
    peak = peak_memory_mib(device)
    for name, fn in p.timers.items():
        for _ in range(calls if name != "step" else 0):
            fn()
    _sync(device)
    return peak


def time_interleaved(
    pipelines: Sequence[Pipeline], device: torch.device, repeats: int
) -> dict[str, dict[str, float]]:
    """Median seconds per call of every timer of every pipeline.

    The timers take turns, one call each per round, for ``repeats`` rounds: a machine whose
    load drifts (a shared CPU, a GPU that clocks down) slows every timer alike, so ratios
    between them stay fair where back-to-back blocks would not.

    Returns:
        ``{pipeline name: {timer name: median seconds}}``.
    """
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for p in pipelines:
            for name, fn in p.timers.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                samples.setdefault((p.name, name), []).append(time.perf_counter() - start)
    out: dict[str, dict[str, float]] = {}
    for (pipe, name), times in samples.items():
        out.setdefault(pipe, {})[name] = statistics.median(times)
    return out


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: allocated tensors on CUDA (since the last reset), else the
    process's peak resident set size (the whole run so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB


def _memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the warm-up steps"
    return "process peak RSS (getrusage; whole run so far, so it only grows)"


def count_step_flops(
    cfg: Config, num_train: int, views: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor
) -> int:
    """FLOPs of one training step's forward + backward, counted by ``FlopCounterMode``.

    Counted on a fresh eager copy of the method (a compiled module runs fused kernels the
    counter does not see, and the trainer's model keeps its state), under the run's autocast.
    Matmuls and convolutions only: normalisation, activations and the optimizer are not in it,
    as in the usual MFU convention.
    """
    device = views.device
    method = build_method(cfg, num_train).to(device)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = method.training_step(views, labels, idx)
        loss.backward()
    del method
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- ours


def ours_pipeline(trainer: Trainer, steps: int) -> tuple[Pipeline, list[torch.Tensor]]:
    """contrastlab's step on one fixed batch of the trainer's data; also returns the list
    the step timer appends its losses to."""
    device, B = trainer.device, trainer.local_batch
    images = trainer.train_set.images[:B].to(device)
    labels = trainer.train_set.labels[:B].to(device)
    idx = torch.arange(B, device=device)
    views = trainer.views(images)  # fixed views for the model-only timer
    losses: list[torch.Tensor] = []

    def step() -> None:
        for _ in range(steps):
            losses.append(trainer.train_step(images, labels, idx)["loss"])

    @torch.no_grad()
    def augment() -> None:
        for _ in range(steps):
            trainer.views(images)

    def model() -> None:
        for _ in range(steps):
            trainer.model_step(views, labels, idx)

    timers: dict[str, Callable[[], object]] = {"step": step, "augment": augment, "model": model}
    return Pipeline("ours", B * trainer.method.n_views, timers), losses


def _utilisation(
    device: torch.device, cfg: Config, flops: int, step_s: float, model_s: float
) -> dict[str, Any]:
    """MFU of the full step and of the model step alone, against the GPU's dense peak."""
    if device.type != "cuda":
        return {"peak_tflops": None, "peak_dtype": None, "mfu": None, "model_mfu": None}
    if cfg.train.precision == "bf16":
        dtype = "bf16"
    else:  # fp32 convolutions run on TF32 tensor cores unless cuDNN is told not to
        dtype = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    peak = peak_tflops(torch.cuda.get_device_name(device), dtype)
    if peak is None:
        return {"peak_tflops": None, "peak_dtype": dtype, "mfu": None, "model_mfu": None}
    return {
        "peak_tflops": peak,
        "peak_dtype": dtype,
        "mfu": flops / step_s / (peak * 1e12),
        "model_mfu": flops / model_s / (peak * 1e12),
    }


def _epoch_and_knn(
    trainer: Trainer, epoch_images: int | None = None, repeats: int = 1
) -> dict[str, Any]:
    """One real epoch through ``train_epoch``, then the kNN monitor, both timed; the monitor
    ``repeats`` times, its median reported (single calls varied by up to 1.6x between runs on
    a quiet CPU).

    With ``epoch_images`` below the training set, the epoch runs over its first
    ``epoch_images`` images and its time is scaled up to the whole set (steps cost the same).
    """
    device = trainer.device
    trainer.epoch = 0
    trainer.step = 0
    full_set, full_steps = trainer.train_set, trainer.steps_per_epoch
    scale = 1.0
    if epoch_images is not None and epoch_images < len(full_set):
        trainer.train_set = full_set.subset(torch.arange(epoch_images))
        trainer.steps_per_epoch = epoch_images // trainer.cfg.train.batch_size
        scale = full_steps / trainer.steps_per_epoch
    try:
        epoch = trainer.train_epoch()
    finally:
        trainer.train_set, trainer.steps_per_epoch = full_set, full_steps
    epoch_s = epoch["epoch_time_s"] * scale
    if device.type == "cuda" or getattr(trainer, "compiled", False):
        # untimed first call: torch.compile and cuDNN autotuning see the eval-mode shapes
        # once per run, not once per epoch (on CPU, eager, a first call costs nothing extra)
        trainer.monitor.knn()
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        knn = trainer.monitor.knn()  # returns floats: already synchronised
        times.append(time.perf_counter() - start)
    knn_s = statistics.median(times)
    return {
        "train_size": len(trainer.train_set),
        "test_size": len(trainer.monitor.test_set),
        "epoch_images_timed": len(full_set) if scale == 1.0 else epoch_images,
        "epoch_s": epoch_s,
        "epoch_views_per_s": epoch["views_per_s"],
        "knn_s": knn_s,
        "knn_share": knn_s / epoch_s,
        "knn_memory_images": len(trainer.monitor.sets[0]),
        "knn_query_images": len(trainer.monitor.sets[1]),
        "knn_feature": trainer.cfg.eval.feature,
        "knn_every": trainer.cfg.eval.knn_every,
        "knn_top1": knn["knn_top1"],
    }


# --------------------------------------------------------------------------- the baseline


def reference_transform(
    cfg: AugmentConfig,
    size: int,
    kernel_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> T.Compose:
    """The augmentation recipe as the reference repos write it: torchvision on a PIL image.

    The opt-in ops follow ``BatchAugment``'s order; rotation fills with black whatever
    ``rotate_fill`` says (torchvision has no 'image' fill), which costs the same.
    """
    ops: list[Callable] = [T.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)]
    if cfg.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(cfg.flip_p))
    if cfg.rotate_degrees > 0:
        bilinear = T.InterpolationMode.BILINEAR
        ops.append(T.RandomRotation(cfg.rotate_degrees, interpolation=bilinear))
    if cfg.channel_shuffle_p > 0:
        ops.append(T.RandomApply([_PILChannelShuffle()], p=cfg.channel_shuffle_p))
    if tuple(cfg.channel_gain) != (1.0, 1.0):
        ops.append(_PILChannelGain(*cfg.channel_gain))
    if cfg.jitter_p > 0:
        jitter = T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        ops.append(T.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        ops.append(T.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        blur = T.GaussianBlur(kernel_size, sigma=cfg.blur_sigma)
        ops.append(T.RandomApply([blur], p=cfg.blur_p))
    if cfg.solarize_p > 0:  # PIL solarizes pixels >= threshold, in 0..255 units
        ops.append(T.RandomSolarize(round(cfg.solarize_threshold * 255), p=cfg.solarize_p))
    if cfg.invert_p > 0:
        ops.append(T.RandomInvert(cfg.invert_p))
    ops.append(T.ToTensor())
    if cfg.normalize:
        ops.append(T.Normalize(mean, std))
    if cfg.erase_p > 0:
        ops.append(
            T.RandomErasing(cfg.erase_p, cfg.erase_scale, cfg.erase_ratio, value=cfg.erase_value)
        )
    return T.Compose(ops)


class _PILChannelShuffle:
    """A uniform random permutation of a PIL RGB image's bands (a class: DataLoader workers
    pickle the transform)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        bands = img.split()
        return Image.merge("RGB", [bands[i] for i in torch.randperm(3).tolist()])


class _PILChannelGain:
    """Each band of a PIL RGB image times its own ``U(lo, hi)``, clipped to 255."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, img: Image.Image) -> Image.Image:
        gains = (self.lo + (self.hi - self.lo) * torch.rand(3)).tolist()
        bands = [
            b.point([min(255, round(v * g)) for v in range(256)])
            for b, g in zip(img.split(), gains, strict=True)
        ]
        return Image.merge("RGB", bands)


class ReferenceViews(torch.utils.data.Dataset):
    """``n_views`` independently augmented views of one image per item, as in the reference
    repos' ``TwoCropTransform`` / EMP-SSL's patch transform: ``([V, 3, S, S], label, index)``.
    """

    def __init__(self, data: ImageDataset, transform: Callable, n_views: int) -> None:
        self.arrays = data.images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, S, S, 3]
        self.labels = data.labels.tolist()
        self.transform = transform
        self.n_views = n_views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = Image.fromarray(self.arrays[i])  # what CIFAR10.__getitem__ does
        views = torch.stack([self.transform(img) for _ in range(self.n_views)])
        return views, self.labels[i], i


def reference_pipeline(trainer: Trainer, s: BenchSettings) -> Pipeline:
    """The reference repos' loop around ``trainer``'s model: a DataLoader with per-image PIL
    augmentation (``s.workers`` processes, pinned memory on CUDA) feeding the model step."""
    device, B, V = trainer.device, trainer.local_batch, trainer.method.n_views
    steps = s.steps or 1
    transform = reference_transform(
        trainer.cfg.augment,
        s.image_size,
        trainer.augment.kernel_size,
        trainer.train_set.mean,
        trainer.train_set.std,
    )
    loader = torch.utils.data.DataLoader(
        ReferenceViews(trainer.train_set.to("cpu"), transform, V),
        batch_size=B,
        shuffle=True,
        drop_last=True,
        num_workers=s.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=s.workers > 0,
    )

    def forever() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    batches = forever()

    def fetch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views, labels, idx = next(batches)  # views: [B, V, 3, S, S]
        views = views.to(device, non_blocking=True).transpose(0, 1)  # [V, B, 3, S, S]
        return views, labels.to(device, non_blocking=True), idx.to(device, non_blocking=True)

    fixed = fetch()

    def step() -> None:
        for _ in range(steps):
            trainer.model_step(*fetch())

    def augment() -> None:
        for _ in range(steps):
            fetch()

    def model() -> None:
        for _ in range(steps):
            trainer.model_step(*fixed)

    timers: dict[str, Callable[[], object]] = {"step": step, "augment": augment, "model": model}
    return Pipeline("reference", B * V, timers)


# --------------------------------------------------------------------------- one method


def _rates(p: Pipeline, t: dict[str, float], steps: int) -> dict[str, float]:
    step_s, aug_s, model_s = (t[k] / steps for k in ("step", "augment", "model"))
    n = p.views_per_step
    return {
        "step_s": step_s,
        "views_per_s": n / step_s,
        "augment_views_per_s": n / aug_s,
        "model_views_per_s": n / model_s,
        # with DataLoader workers the batches are prepared while the model steps, so this
        # share can overlap the step instead of adding to it
        "augment_share": aug_s / step_s,
    }


def measure(
    method: str,
    s: BenchSettings,
    data: DatasetSplits,
    workdir: str | Path,
    ours: bool = True,
    reference: bool = False,
) -> dict[str, dict[str, Any]]:
    """Time ``method``'s training step (``ours``) and/or the reference loop on the same model
    architecture, batch and views (``reference``), interleaved (:func:`time_interleaved`).

    Args:
        s: resolved settings (:func:`check_settings`).

    Returns:
        ``{"ours": {...}, "reference": {...}}`` (the keys asked for), JSON-able dicts; rates
        in views per second, times in seconds (medians).
    """
    if not (ours or reference):
        raise ValueError("measure: nothing to measure (ours and reference both False)")
    device = torch.device(s.device)
    steps = s.steps or 1
    pipes: list[Pipeline] = []
    peaks: dict[str, float] = {}
    trainer = None
    losses: list[torch.Tensor] = []
    if ours:
        cfg = bench_config(method, s)
        trainer = Trainer(cfg, RunPlace(Path(workdir) / method), data=data)
        p, losses = ours_pipeline(trainer, steps)
        B = trainer.local_batch
        flops = count_step_flops(
            cfg,
            len(trainer.train_set),
            trainer.views(trainer.train_set.images[:B].to(device)),
            trainer.train_set.labels[:B].to(device),
            torch.arange(B, device=device),
        )
        peaks[p.name] = warm_up(p, device, s.warmup)
        pipes.append(p)
    if reference:
        ref_cfg = bench_config(method, s, reference=True)
        ref_trainer = Trainer(ref_cfg, RunPlace(Path(workdir) / f"{method}-ref"), data=data)
        p = reference_pipeline(ref_trainer, s)
        peaks[p.name] = warm_up(p, device, s.warmup)
        pipes.append(p)
    times = time_interleaved(pipes, device, s.repeats)
    out: dict[str, dict[str, Any]] = {}
    for p in pipes:
        row: dict[str, Any] = {"method": method, "views_per_step": p.views_per_step}
        row.update(_rates(p, times[p.name], steps))
        row["peak_memory_mib"] = peaks[p.name]
        out[p.name] = row
    del pipes, p
    if reference:
        out["reference"]["workers"] = s.workers
        del ref_trainer  # and its DataLoader and workers: the epoch below runs alone
        _free(device)
    if trainer is not None:
        row = out["ours"]
        row["views_per_image"] = trainer.method.n_views
        row["compiled"] = bool(getattr(trainer, "compiled", False))
        row["flops_per_step"] = flops
        row["achieved_tflops"] = flops / row["step_s"] / 1e12
        row["final_loss"] = float(losses[-1])
        model_s = row["views_per_step"] / row["model_views_per_s"]
        row.update(_utilisation(device, trainer.cfg, flops, row["step_s"], model_s))
        if s.epoch:
            row.update(_epoch_and_knn(trainer, s.epoch_images, s.repeats))
    return out


# --------------------------------------------------------------------------- the run


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": device.type,
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def check_settings(settings: BenchSettings) -> BenchSettings:
    """``settings`` resolved (:meth:`BenchSettings.resolved`), or a ValueError saying what is
    wrong before anything is measured."""
    s = settings.resolved()
    if not s.methods and not s.baseline:
        raise ValueError("nothing to measure: --methods and --baseline are both empty")
    for m in (*s.methods, *s.baseline):
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; allowed: {sorted(METHODS)}")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    for name in ("batch", "repeats", "steps"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(s, name)}")
    if s.warmup < 0 or s.workers < 0:
        raise ValueError("warmup and workers must be >= 0")
    assert s.train_size is not None
    if s.train_size < s.batch:
        raise ValueError(f"train_size ({s.train_size}) must be at least the batch ({s.batch})")
    if s.epoch_images is not None and s.epoch_images < s.batch:
        raise ValueError(f"epoch_images ({s.epoch_images}) must be at least the batch ({s.batch})")
    for m in (*s.methods, *s.baseline):  # every config error now, not after an hour
        bench_config(m, s)
    return s


def run(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark every method of ``settings`` (and the baseline for those it names).

    Returns:
        ``{"machine": ..., "settings": ..., "methods": [...], "baseline": [...]}``, JSON-able.
    """
    s = check_settings(settings)
    threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, log)
    finally:
        torch.set_num_threads(threads)


def _run(s: BenchSettings, log: Callable[[str], None] | None) -> dict[str, Any]:
    device = torch.device(s.device)
    assert s.train_size is not None and s.test_size is not None
    say = log or (lambda _msg: None)
    data = synthetic_splits(s.train_size, s.test_size, s.image_size)
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": asdict(s),
        "methods": [],
        "baseline": [],
    }
    order = list(dict.fromkeys((*s.methods, *s.baseline)))
    with tempfile.TemporaryDirectory(prefix="contrastlab-bench-") as workdir:
        for m in order:
            ours, ref = m in s.methods, m in s.baseline
            say(f"measuring {m}" + (" and its reference loop" if ours and ref else "") + " ...")
            out = measure(m, s, data, workdir, ours=ours, reference=ref)
            if ours:
                results["methods"].append(out["ours"])
            if ref:
                if ours:
                    r = out["reference"]
                    r["ours_over_baseline"] = out["ours"]["views_per_s"] / r["views_per_s"]
                results["baseline"].append(out["reference"])
            _free(device)
    results["machine"]["peak_memory_kind"] = _memory_kind(device)
    return results


def _free(device: torch.device) -> None:
    gc.collect()  # the last trainer's model, optimizer and on-device data set
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:{spec}}"


def machine_line(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    where = f"GPU {m['gpu']} (CUDA {m['cuda']}), " if m["device"] == "cuda" else ""
    load = f", load avg {m['load_average_1m']:.1f}" if m.get("load_average_1m") is not None else ""
    return (
        f"{where}CPU {m['cpu']} ({m['usable_cores']} usable of {m['cpu_count']} cores{load}), "
        f"torch {m['torch']} ({m['torch_threads']} threads), torchvision {m['torchvision']}, "
        f"Python {m['python']} | backbone {s['backbone']}, batch {s['batch']}, "
        f"{s['image_size']} px, {s['precision']}, compile {s['compile']}, "
        f"channels_last {s['channels_last']}, median of {s['repeats']} x {s['steps']} steps "
        f"after {s['warmup']} warm-up"
        + (
            f"; epoch and kNN monitor on {s['train_size']} train / {s['test_size']} test images"
            + (
                f" (epoch timed on {s['epoch_images']} images, scaled)"
                if s.get("epoch_images")
                else ""
            )
            if s["epoch"]
            else ""
        )
    )


def format_tables(r: dict[str, Any]) -> str:
    """The results as markdown tables, with the machine line on top."""
    cuda = r["machine"]["device"] == "cuda"
    lines = [machine_line(r), ""]
    head = [
        "method",
        "views/step",
        "step views/s",
        "augment only",
        "model only",
        "aug share",
        "peak MiB",
        "TFLOP/s",
    ]
    if cuda:
        head.append("MFU")
    head += ["epoch views/s", "kNN s / epoch s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in r["methods"]:
        row = [
            m["method"],
            f"{m['views_per_image']} x {m['views_per_step'] // m['views_per_image']}",
            _fmt(m["views_per_s"]),
            _fmt(m["augment_views_per_s"]),
            _fmt(m["model_views_per_s"]),
            f"{m['augment_share']:.0%}",
            _fmt(m["peak_memory_mib"]),
            _fmt(m["achieved_tflops"], ".3g"),
        ]
        if cuda:
            mfu = m["mfu"]
            row.append("unknown GPU" if mfu is None else f"{mfu:.1%} of {m['peak_tflops']:g}")
        if "knn_s" in m:
            flag = "" if m["knn_share"] < KNN_SHARE_LIMIT else " (over 5%)"
            row += [
                _fmt(m["epoch_views_per_s"]),
                f"{m['knn_s']:.2f} / {m['epoch_s']:.2f} = {m['knn_share']:.1%}{flag} "
                f"({m['knn_memory_images']} + {m['knn_query_images']} images)",
            ]
        else:
            row += ["not run", "not run"]
        lines.append("| " + " | ".join(row) + " |")
    if r["baseline"]:
        lines += [
            "",
            f"Reference loop (per-image PIL in a DataLoader, {r['settings']['workers']} workers, "
            "fp32, eager, NCHW), same model, batch and views:",
            "",
            "| method | ref step views/s | ref augment only | ref model only | ref aug share "
            "| ours step views/s | ours / ref |",
            "|---|---|---|---|---|---|---|",
        ]
        ours = {m["method"]: m for m in r["methods"]}
        for b in r["baseline"]:
            mine = ours.get(b["method"])
            ratio = b.get("ours_over_baseline")
            lines.append(
                f"| {b['method']} | {_fmt(b['views_per_s'])} | {_fmt(b['augment_views_per_s'])} "
                f"| {_fmt(b['model_views_per_s'])} | {b['augment_share']:.0%} "
                f"| {_fmt(mine['views_per_s']) if mine else 'not run'} "
                f"| {'n/a' if ratio is None else f'**{ratio:.1f}x**'} |"
            )
    lines += ["", f"peak memory: {r['machine']['peak_memory_kind']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _names(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(n.strip() for n in text.split(",") if n.strip())


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Training-step benchmark: views/s of the full step, of augmentation and "
        "of the model alone, augmentation share, peak memory, MFU (CUDA), kNN monitor share "
        "of an epoch, and the reference per-image PIL + DataLoader loop for comparison.",
    )
    add = p.add_argument
    add("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {sorted(METHODS)}")
    add(
        "--baseline",
        default=",".join(DEFAULT_BASELINE),
        help="methods to also time with the reference loop (comma list, or 'none')",
    )
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--backbone", help="model.backbone (default: cifar_resnet18 on CUDA, convnet on CPU)")
    add("--batch", type=int, default=256, help="images per step (default 256)")
    add("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the backbone (default: on CUDA yes, on CPU no)",
    )
    add(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last model and inputs (default yes)",
    )
    add(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="deterministic algorithms (default no: cudnn.benchmark on)",
    )
    add("--train-size", type=int, help="images of the timed epoch (default 50000, CIFAR-10)")
    add("--test-size", type=int, help="kNN test images (default 10000, CIFAR-10)")
    add("--no-epoch", action="store_true", help="skip the epoch and kNN monitor timing")
    add(
        "--epoch-images",
        type=int,
        help="time the epoch on this many images and scale it to --train-size (CPU runs)",
    )
    add("--repeats", type=int, default=5, help="timed calls; the median is reported")
    add("--warmup", type=int, default=2, help="untimed calls first")
    add("--steps", type=int, help="training steps per timed call (default 10 CUDA, 2 CPU)")
    add(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers of the reference loop (default 0: in the main process)",
    )
    add("--threads", type=int, help="torch intra-op threads (default: torch's)")
    add("--out", help="also write the results as JSON to this file")
    add("--smoke-test", action="store_true", help="tiny model and data: a seconds-long run")
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        methods=_names(args.methods),
        baseline=_names(args.baseline),
        device=args.device,
        backbone=args.backbone,
        batch=args.batch,
        precision=args.precision,
        compile=args.compile,
        channels_last=args.channels_last,
        deterministic=args.deterministic,
        train_size=args.train_size,
        test_size=args.test_size,
        epoch=not args.no_epoch,
        epoch_images=args.epoch_images,
        repeats=args.repeats,
        warmup=args.warmup,
        steps=args.steps,
        workers=args.workers,
        threads=args.threads,
        smoke=args.smoke_test,
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark from command-line arguments; print the tables (and write JSON)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    try:
        check_settings(settings)
    except ValueError as e:  # ConfigError included
        parser.error(str(e))
    results = run(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_tables(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m benchmarks.step"))
