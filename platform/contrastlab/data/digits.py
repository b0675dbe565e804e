"""scikit-learn's bundled 8x8 handwritten digits: the offline dataset of the default run."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from .core import DatasetSplits, build_splits, stratified_split

DIGITS_CLASSES = tuple(str(i) for i in range(10))


@functools.lru_cache(maxsize=1)
def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(int64 [1797, 8, 8] in 0..16, int64 [1797] in 0..9)``, the data of ``load_digits()``.

    ``import sklearn`` alone takes over a second, so the CSV that ``load_digits`` reads (64
    pixel columns then the label, gzipped, bundled with scikit-learn) is located without
    importing the package and parsed here; ``load_digits`` is the fallback if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rb") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.int64)
            if table.shape == (1797, 65):
                table.setflags(write=False)  # cached: protect against in-place edits
                return table[:, :64].reshape(-1, 8, 8), table[:, 64]
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.int64), bunch.target.astype(np.int64)


def load_digits_splits(cfg: DataConfig) -> DatasetSplits:
    """1797 8x8 digit images (values 0..16), upscaled to ``image_size``, stratified split.

    Args:
        cfg: data config; uses ``image_size``, ``test_fraction``, ``split_seed``,
            ``max_train_samples``.

    Returns:
        The train/test splits, 10 classes.
    """
    pixels, target = read_digits()
    # [1797, 8, 8] in 0..16 -> float32 [1797, 1, 8, 8] in 0..255.
    x = torch.from_numpy(pixels.astype(np.float32) * (255.0 / 16.0))[:, None]
    s = cfg.image_size
    if s != 8:
        # Resize before rounding (one rounding step). Bilinear interpolation is a convex
        # combination, so 0 and 255 stay reachable and nothing overshoots.
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=s < 8)
    images = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(target, dtype=torch.int64)  # copy: the cache is read-only
    train_idx, test_idx = stratified_split(labels.numpy(), cfg.test_fraction, cfg.split_seed)
    return build_splits(
        cfg,
        name="digits",
        train=(images[train_idx], labels[train_idx]),
        test=(images[test_idx], labels[test_idx]),
        num_classes=10,
        classes=DIGITS_CLASSES,
    )
