"""Backbones, projection heads and momentum-contrast building blocks."""

from contrastlab.models.backbones import ConvNet, build_backbone
from contrastlab.models.heads import build_head
from contrastlab.models.memory import MemoryBank
from contrastlab.models.momentum import MomentumEncoder, Queue
from contrastlab.models.shuffle_bn import BatchShuffler, SplitBatchNorm, convert_split_batchnorm

__all__ = [
    "BatchShuffler",
    "ConvNet",
    "MemoryBank",
    "MomentumEncoder",
    "Queue",
    "SplitBatchNorm",
    "build_backbone",
    "build_head",
    "convert_split_batchnorm",
]
