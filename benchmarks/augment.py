"""Benchmark multi-view augmentation: batched on-device vs per-image PIL vs kornia.

    python -m benchmarks.augment [--batch 64] [--views 20] [--recipe emp_ssl|simclr]
                                 [--size 32] [--device cpu|cuda] [--repeats 5]
                                 [--threads N] [--no-kornia]

(from the repository root; its results: docs/benchmarks.md).

All pipelines run in this one process on the same random uint8 images of ``--size`` pixels
(CIFAR-sized by default) and produce ``--views`` normalised float views of every image:

* ``BatchAugment``: contrastlab's batched augmentation (all views of the batch at once), with
  torch's default thread count, and on CPU also with 1 thread (the per-core cost);
* ``PIL per image``: the reference repos' DataLoader path, torchvision.transforms on PIL
  images, image by image and view by view, then stacked (the collate). Timed with 1 torch
  thread, as inside a DataLoader worker, so its views/s is per CPU core;
* ``kornia``: kornia.augmentation on the batch repeated ``--views`` times (if kornia imports).

Each pipeline is warmed up, then timed ``--repeats`` times with ``time.perf_counter`` (after
``torch.cuda.synchronize`` on CUDA); the table shows the median, in views per second, and the
ratio to the PIL baseline. The default run takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

from benchmarks.step import reference_transform
from contrastlab.augment import BatchAugment
from contrastlab.config import AUGMENT_RECIPES, AugmentConfig, make_config

# CIFAR-10 channel statistics; any values do for timing.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def recipe_config(recipe: str) -> AugmentConfig:
    method = "emp_ssl" if recipe == "emp_ssl" else "simclr"
    return make_config({"method": {"name": method}, "augment": {"recipe": recipe}}).augment


def kornia_pipeline(cfg: AugmentConfig, size: int, kernel_size: int) -> torch.nn.Module:
    import kornia.augmentation as K

    ops: list[torch.nn.Module] = [
        K.RandomResizedCrop((size, size), scale=cfg.crop_scale, ratio=cfg.crop_ratio),
    ]
    if cfg.flip_p > 0:
        ops.append(K.RandomHorizontalFlip(p=cfg.flip_p))
    if cfg.jitter_p > 0:
        ops.append(
            K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p)
        )
    if cfg.grayscale_p > 0:
        ops.append(K.RandomGrayscale(p=cfg.grayscale_p))
    if cfg.blur_p > 0:
        ops.append(K.RandomGaussianBlur((kernel_size, kernel_size), cfg.blur_sigma, p=cfg.blur_p))
    if cfg.solarize_p > 0:
        thr = cfg.solarize_threshold
        ops.append(K.RandomSolarize(thresholds=(thr, thr), additions=0.0, p=cfg.solarize_p))
    ops.append(K.Normalize(torch.tensor(MEAN), torch.tensor(STD)))
    return torch.nn.Sequential(*ops)


def time_it(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds per call of ``fn``."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Threads:
    """Run a block with ``n`` torch intra-op threads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.before = torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--views", type=int, default=20, help="views per image")
    parser.add_argument("--recipe", choices=sorted(AUGMENT_RECIPES), default="emp_ssl")
    parser.add_argument("--size", type=int, default=32, help="image and view side")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per pipeline")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--no-kornia", action="store_true", help="skip the kornia pipeline")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    threads = torch.get_num_threads()
    cfg = recipe_config(args.recipe)
    B, V, S = args.batch, args.views, args.size
    n_views = B * V

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=gen)
    images_dev = images.to(device)
    arrays = list(images.permute(0, 2, 3, 1).numpy())  # [B] x [S, S, 3] uint8, like CIFAR

    ours = BatchAugment(cfg, S, MEAN, STD)
    pil = reference_transform(cfg, S, ours.kernel_size, MEAN, STD)

    def run_ours() -> torch.Tensor:
        return ours(images_dev, V, gen)

    def run_pil() -> torch.Tensor:
        views = []
        for array in arrays:
            img = Image.fromarray(array)  # what CIFAR10.__getitem__ does
            views.append(torch.stack([pil(img) for _ in range(V)]))
        return torch.stack(views, dim=1)  # [V, B, 3, S, S], the collated batch

    results: list[tuple[str, float]] = []
    label = f"BatchAugment ({threads} thr)" if device.type == "cpu" else "BatchAugment"
    results.append((label, time_it(run_ours, device, args.repeats, warmup=2)))
    if device.type == "cpu" and threads != 1:
        with Threads(1):
            results.append(("BatchAugment (1 thr)", time_it(run_ours, device, args.repeats, 2)))
    with Threads(1):  # a DataLoader worker runs torch with one thread
        pil_s = time_it(run_pil, torch.device("cpu"), args.repeats, warmup=1)
    results.append(("PIL per image (1 thr)", pil_s))

    kornia_version = "not used"
    if not args.no_kornia:
        try:
            import kornia

            kornia_version = kornia.__version__
            korn = kornia_pipeline(cfg, S, ours.kernel_size).to(device)

            def run_kornia() -> torch.Tensor:
                x = images_dev.float().div_(255).repeat(V, 1, 1, 1)  # [V*B, 3, S, S]
                with torch.no_grad():
                    return korn(x).view(V, B, 3, S, S)

            label = f"kornia ({threads} thr)" if device.type == "cpu" else "kornia"
            results.append((label, time_it(run_kornia, device, args.repeats, warmup=1)))
        except ImportError as e:
            kornia_version = f"unavailable ({e})"

    cpu = platform.processor() or platform.machine()
    print(
        f"recipe={args.recipe}  batch={B}  views={V}  size={S}  -> {n_views} views per call, "
        f"median of {args.repeats}"
    )
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={dev}  cpu={cpu} ({os.cpu_count()} cores)  torch={torch.__version__} "
        f"({threads} threads)  torchvision={torchvision.__version__}  PIL={PIL.__version__}  "
        f"kornia={kornia_version}  numpy={np.__version__}"
    )
    print()
    print(f"| {'pipeline':<24} | {'views/s':>10} | {'vs PIL':>7} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 9}|")
    for name, seconds in results:
        print(f"| {name:<24} | {n_views / seconds:>10.0f} | {pil_s / seconds:>6.1f}x |")


if __name__ == "__main__":
    main()
