"""Backbones, projection heads and momentum-contrast building blocks."""

from contrastlab.models.backbones import ConvNet, build_backbone
from contrastlab.models.heads import build_head
from contrastlab.models.memory import MemoryBank
from contrastlab.models.momentum import MomentumEncoder, Queue

__all__ = ["ConvNet", "MemoryBank", "MomentumEncoder", "Queue", "build_backbone", "build_head"]
