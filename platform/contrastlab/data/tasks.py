"""Learnability tasks: small real-data image sets, each with one nuisance an encoder must ignore.

Every task is built from scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
classes; no download) and, for ``texture``, its two bundled sample photos. The digit is
upscaled smoothly (bicubic) and composited onto a 32 px RGB canvas; what varies per image
besides the digit is the task's *nuisance*:

* ``colour`` (tune): the digit centred; foreground and background colour random per image;
* ``position`` (tune): a white digit on black, side 10-28 px, anywhere on the canvas;
* ``texture`` (report): the digit centred on a random crop of a photo, drawn in a random
  gray that contrasts with the crop;
* ``colour_position`` (report): random colours and random side and position (both
  nuisances at once).

"tune" tasks are the ones recipes and defaults may be chosen on; "report" tasks are held
out, only measured. Every task uses the same fixed split of the digits (1400 train / 397
test, stratified, seed 0), so a digit is in the test set of every task or of none.

An encoder that learns the nuisance instead of the digit (its kNN sinks below the
random-init encoder's) has learned a shortcut; :func:`raw_pixel_knn` gives the other floor,
kNN on the pixels themselves.

Usage::

    from contrastlab.data.tasks import write_task
    write_task("colour", "data/colour")   # data/colour/{train,test}/part-*.parquet
    # contrastlab train --set data.dataset=parquet --set data.root=data/colour/train \\
    #     --set data.test_root=data/colour/test --set data.image_size=32
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import DataConfig, EvalConfig
from ..evaluate import knn_accuracy
from .core import DatasetSplits, build_splits, stratified_split
from .digits import read_digits

IMAGE_SIZE = 32
"""Side of every task image, in pixels."""
KNN = EvalConfig(knn_k=20, knn_t=0.1)
"""The kNN protocol of every learnability number (runs, naive loop, raw pixels, benchmarks):
weighted cosine kNN, k=20 (about a seventh of the 140 training images of a class), T=0.1."""
TEST_SIZE = 397
"""Held-out digits (of 1797); the other 1400 are the training set."""
SPLIT_SEED = 0
"""Seed of the stratified train/test split, the same for every task and task seed."""
CENTRED_SIZE = 28
"""Side of the digit, in pixels, in the tasks where it does not move (2 px margin)."""
SIDE_RANGE = (10, 28)
"""Smallest and largest digit side, in pixels, in the tasks where it moves (inclusive)."""
MIN_COLOUR_DISTANCE = 100.0
"""Least Euclidean distance between foreground and background RGB (0..255): closer pairs are
redrawn, so every digit stays visible (the largest possible distance is 441)."""
TEXTURE_CROP = (48, 192)
"""Side range, in photo pixels, of the square photo crop a ``texture`` background comes from
(then resized to 32 px): from a few leaves or roof tiles to a wide view."""
MIN_INK_CONTRAST = 0.35
"""Least difference, in [0, 1], between a ``texture`` digit's gray and its crop's mean luma."""

Role = Literal["tune", "report"]
# (ink [N, 8, 8] float in [0, 1], rng) -> (uint8 [N, 3, S, S] images, per-image factors)
Generator = Callable[[torch.Tensor, np.random.Generator], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class Task:
    """One learnability task.

    Attributes:
        name: registry key, also the default directory name.
        nuisance: what varies per image besides the digit.
        role: ``"tune"`` (recipes may be chosen on it) or ``"report"`` (held out).
        generate: draws the images from the digits' ink and a random generator.
    """

    name: str
    nuisance: str
    role: Role
    generate: Generator


@dataclass(frozen=True, eq=False)
class TaskImages:
    """All 1797 images of a task, in the order of scikit-learn's digits, and the split.

    Attributes:
        task: the task that drew them.
        seed: the task seed.
        images: ``uint8 [1797, 3, 32, 32]``.
        labels: ``int64 [1797]`` digit classes 0..9.
        factors: the nuisance of each image, ``name -> array [1797, ...]`` (e.g. ``fg``
            ``[1797, 3]`` RGB 0..255, ``side``, ``row``, ``col``), for tests and plots.
        train_idx: sorted ``int64 [1400]`` rows of the training split.
        test_idx: sorted ``int64 [397]`` rows of the test split.
    """

    task: Task
    seed: int
    images: torch.Tensor
    labels: torch.Tensor
    factors: dict[str, np.ndarray]
    train_idx: np.ndarray
    test_idx: np.ndarray

    def splits(self) -> DatasetSplits:
        """The train/test splits as the trainer holds them (what the Parquet shards load as)."""
        tr, te = torch.from_numpy(self.train_idx), torch.from_numpy(self.test_idx)
        return build_splits(
            DataConfig(),  # no truncation: every training image is kept
            name=f"task:{self.task.name}",
            train=(self.images[tr], self.labels[tr]),
            test=(self.images[te], self.labels[te]),
            num_classes=10,
        )


# --------------------------------------------------------------------------- drawing


def _upscale(ink: torch.Tensor, side: int) -> torch.Tensor:
    """``[N, 8, 8]`` ink in [0, 1] -> ``[N, 1, side, side]``, bicubic, clamped to [0, 1]
    (bicubic overshoots a little at stroke edges)."""
    x = F.interpolate(ink[:, None], size=(side, side), mode="bicubic", align_corners=False)
    return x.clamp_(0, 1)


def _centred(ink: torch.Tensor) -> torch.Tensor:
    """Alpha masks ``[N, 1, 32, 32]`` with the digit, ``CENTRED_SIZE`` px, in the middle."""
    mask = torch.zeros(ink.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
    lo = (IMAGE_SIZE - CENTRED_SIZE) // 2
    mask[:, :, lo : lo + CENTRED_SIZE, lo : lo + CENTRED_SIZE] = _upscale(ink, CENTRED_SIZE)
    return mask


def _placed(ink: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """Alpha masks ``[N, 1, 32, 32]`` with the digit at a random side and position (wholly
    inside the canvas), and those factors."""
    n = ink.shape[0]
    side = rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=n)
    row = rng.integers(0, IMAGE_SIZE - side + 1)  # per image: 0..32-side
    col = rng.integers(0, IMAGE_SIZE - side + 1)
    mask = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    for s in np.unique(side):
        rows = np.flatnonzero(side == s)
        digits = _upscale(ink[torch.from_numpy(rows)], int(s))  # [n_s, 1, s, s]
        for i, d in zip(rows.tolist(), digits, strict=True):
            mask[i, :, row[i] : row[i] + s, col[i] : col[i] + s] = d
    return mask, {"side": side, "row": row, "col": col}


def _colour_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB ``float [n, 3]`` in 0..255, uniform over the cube, pairs
    closer than ``MIN_COLOUR_DISTANCE`` redrawn."""
    fg, bg = rng.uniform(0, 255, (n, 3)), rng.uniform(0, 255, (n, 3))
    while True:
        close = np.flatnonzero(np.linalg.norm(fg - bg, axis=1) < MIN_COLOUR_DISTANCE)
        if close.size == 0:
            return fg, bg
        fg[close] = rng.uniform(0, 255, (close.size, 3))
        bg[close] = rng.uniform(0, 255, (close.size, 3))


def _compose(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """``bg * (1 - mask) + fg * mask`` rounded to uint8 ``[N, 3, S, S]``; ``mask`` ``[N, 1, S,
    S]``, ``fg``/``bg`` ``[N, 3, 1, 1]`` or ``[N, 3, S, S]`` in 0..255."""
    return (bg * (1 - mask) + fg * mask).round_().clamp_(0, 255).to(torch.uint8)


def _rgb(c: np.ndarray) -> torch.Tensor:
    """``float [N, 3]`` colours -> ``[N, 3, 1, 1]`` tensor to broadcast over the canvas."""
    return torch.from_numpy(c).float()[:, :, None, None]


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    """scikit-learn's two bundled sample photos (china, flower) as ``float [3, 427, 640]`` in
    [0, 1]. Read with PIL from the package directory (``import sklearn`` alone takes over a
    second); ``load_sample_images`` is the fallback if the files moved."""
    spec = importlib.util.find_spec("sklearn")
    folder = Path(spec.origin).parent / "datasets" / "images" if spec and spec.origin else None
    paths = [folder / f for f in ("china.jpg", "flower.jpg")] if folder else []
    if paths and all(p.is_file() for p in paths):
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    else:
        from sklearn.datasets import load_sample_images

        arrays = list(load_sample_images().images)
    return tuple(torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in arrays)


def _texture_crops(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict]:
    """``n`` random square photo crops resized to ``[n, 3, 32, 32]`` in 0..255 (antialiased
    bilinear), and where they came from."""
    photos = _photos()
    photo = rng.integers(0, len(photos), size=n)
    side = rng.integers(TEXTURE_CROP[0], TEXTURE_CROP[1] + 1, size=n)
    top = rng.integers(0, np.array([photos[p].shape[1] for p in photo]) - side + 1)
    left = rng.integers(0, np.array([photos[p].shape[2] for p in photo]) - side + 1)
    out = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i in range(n):
        crop = photos[photo[i]][:, top[i] : top[i] + side[i], left[i] : left[i] + side[i]]
        out[i] = F.interpolate(
            crop[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True
        )[0]
    return out * 255, {"photo": photo, "crop_side": side, "crop_top": top, "crop_left": left}


# --------------------------------------------------------------------------- the tasks


def _colour(ink: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    fg, bg = _colour_pairs(rng, ink.shape[0])
    return _compose(_centred(ink), _rgb(fg), _rgb(bg)), {"fg": fg, "bg": bg}


def _position(ink: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    mask, where = _placed(ink, rng)
    white, black = torch.full((1, 3, 1, 1), 255.0), torch.zeros(1, 3, 1, 1)
    return _compose(mask, white, black), where


def _texture(ink: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    bg, where = _texture_crops(rng, ink.shape[0])
    # mean luma of each crop in [0, 1] (ITU-R 601 weights): [N]
    luma = (bg * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).mean((1, 2)) / 255
    mu = luma.double().numpy()
    # ink gray: brighter than the crop on dark crops, darker on bright ones, by at least
    # MIN_INK_CONTRAST; both ranges are non-empty because mu < 0.5 or mu >= 0.5
    u = rng.uniform(0, 1, size=mu.shape)
    bright = mu + MIN_INK_CONTRAST + u * (1 - mu - MIN_INK_CONTRAST)
    dark = u * (mu - MIN_INK_CONTRAST)
    ink_gray = np.where(mu < 0.5, bright, dark)
    fg = _rgb(np.repeat(ink_gray[:, None] * 255, 3, axis=1))
    return _compose(_centred(ink), fg, bg), {**where, "ink": ink_gray, "crop_luma": mu}


def _colour_position(ink: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    fg, bg = _colour_pairs(rng, ink.shape[0])
    mask, where = _placed(ink, rng)
    return _compose(mask, _rgb(fg), _rgb(bg)), {"fg": fg, "bg": bg, **where}


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("colour", "foreground and background colour", "tune", _colour),
        Task("position", "digit side (10-28 px) and position", "tune", _position),
        Task("texture", "photo-crop background, digit gray level", "report", _texture),
        Task("colour_position", "colours, digit side and position", "report", _colour_position),
    )
}
"""The task registry; the key is the task's name everywhere (directories, results, tables)."""


def get_task(name: str) -> Task:
    """The task ``name``; a ValueError names the allowed ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def make_task(name: str, seed: int = 0) -> TaskImages:
    """Draw every image of task ``name``; the same ``(name, seed)`` gives the same pixels.

    Args:
        name: a key of :data:`TASKS`.
        seed: the nuisance draw's seed (each task mixes in its own name, so two tasks with
            one seed do not share draws). The train/test split does not depend on it.

    Returns:
        :class:`TaskImages`.
    """
    task = get_task(name)
    pixels, target = read_digits()  # int64 [1797, 8, 8] in 0..16, [1797] in 0..9
    ink = torch.from_numpy(pixels.astype(np.float32) / 16.0)  # [1797, 8, 8] in [0, 1]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    images, factors = task.generate(ink, rng)
    labels = torch.tensor(target, dtype=torch.int64)  # a copy: the digits cache is read-only
    train_idx, test_idx = stratified_split(target, TEST_SIZE / len(target), SPLIT_SEED)
    return TaskImages(task, seed, images, labels, factors, train_idx, test_idx)


def _png(image: torch.Tensor) -> bytes:
    """``uint8 [3, S, S]`` -> PNG bytes (lossless, so the loader gets the exact pixels)."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def write_task(name: str, dst: str | Path, seed: int = 0, rows_per_shard: int = 512) -> TaskImages:
    """Write task ``name`` as Parquet shards the ``parquet`` dataset reads.

    Layout: ``dst/train/part-NNNNN.parquet`` (1400 rows), ``dst/test/part-NNNNN.parquet``
    (397 rows), columns ``image`` (PNG bytes) and ``label`` (int64), and ``dst/task.json``
    (name, nuisance, role, seed, counts). Shards already in those two folders are removed
    first, so a rewrite never mixes with an older one. Train on it with
    ``--set data.dataset=parquet --set data.root=dst/train --set data.test_root=dst/test
    --set data.image_size=32``.

    Args:
        name: a key of :data:`TASKS`.
        dst: output directory (created).
        seed: the task seed (see :func:`make_task`).
        rows_per_shard: rows per Parquet file.

    Returns:
        The :class:`TaskImages` written.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    data = make_task(name, seed)
    dst = Path(dst)
    for split, idx in (("train", data.train_idx), ("test", data.test_idx)):
        folder = dst / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.parquet"):
            old.unlink()
        for k, lo in enumerate(range(0, len(idx), rows_per_shard)):
            rows = idx[lo : lo + rows_per_shard]
            table = pa.table(
                {
                    "image": pa.array([_png(data.images[i]) for i in rows], pa.binary()),
                    "label": pa.array(data.labels[rows].numpy(), pa.int64()),
                }
            )
            pq.write_table(table, folder / f"part-{k:05d}.parquet")
    meta = {
        "task": name,
        "nuisance": data.task.nuisance,
        "role": data.task.role,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "train": len(data.train_idx),
        "test": len(data.test_idx),
    }
    (dst / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    return data


def raw_pixel_knn(splits: DatasetSplits, cfg: EvalConfig) -> float:
    """kNN top-1 (%) on the pixels themselves: the floor an encoder should rise above.

    Features are the flattened images normalised per channel with the train mean/std (the
    trainer's evaluation input), scored by the platform's kNN
    (:func:`contrastlab.evaluate.knn_accuracy`: cosine, weighted, ``cfg.knn_k``,
    ``cfg.knn_t``), memory = labeled train images, queries = test images.
    """

    def flat(images: torch.Tensor) -> torch.Tensor:  # uint8 [N, 3, S, S] -> [N, 3*S*S]
        mean = torch.tensor(splits.train.mean)[:, None, None]
        std = torch.tensor(splits.train.std).clamp_min(1e-8)[:, None, None]
        return ((images.float() / 255 - mean) / std).flatten(1)

    memory = splits.labeled_train()
    test = splits.test
    out = knn_accuracy(
        flat(memory.images.cpu()),
        memory.labels.cpu(),
        flat(test.images.cpu()),
        test.labels.cpu(),
        memory.num_classes,
        cfg,
    )
    return out["knn_top1"]
