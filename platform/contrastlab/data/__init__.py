"""Datasets decoded once into memory as ``uint8 [N, 3, S, S]`` tensors.

The trainer calls :func:`load_dataset` with the ``data`` config section and gets
:class:`DatasetSplits` (train + labeled test), each an :class:`ImageDataset`. Supported:
scikit-learn's bundled ``digits`` (offline default), CIFAR-10/100 (official python
pickles; only point at trusted files), STL-10 (official binaries, optional unlabeled split),
``root/<class>/<image>`` folders, and parquet shards of encoded images.
"""

from .cifar import load_cifar
from .core import (
    DataError,
    DatasetSplits,
    ImageDataset,
    channel_stats,
    resize_uint8,
    stratified_split,
)
from .digits import load_digits_splits
from .folder import IMAGE_EXTENSIONS, load_image_folder
from .load import LOADERS, load_dataset
from .parquet import load_parquet
from .stl10 import load_stl10

__all__ = [
    "IMAGE_EXTENSIONS",
    "LOADERS",
    "DataError",
    "DatasetSplits",
    "ImageDataset",
    "channel_stats",
    "load_cifar",
    "load_dataset",
    "load_digits_splits",
    "load_image_folder",
    "load_parquet",
    "load_stl10",
    "resize_uint8",
    "stratified_split",
]
