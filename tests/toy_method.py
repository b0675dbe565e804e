"""A method added in one file, as a user would add theirs: its config class and its training
step, registered with :func:`contrastlab.methods.register_method`. ``tests/test_registry.py``
checks that configs, sweeps and their smoke tests, the step benchmark and the method table pick
it up with no other edit, when ``CONTRASTLAB_METHODS=tests.toy_method`` names this module.

The method: alignment + uniformity (Wang & Isola 2020, arXiv:2005.10242) on two views.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from contrastlab.config import Config, MethodConfig, Metric
from contrastlab.methods import Method, register_method


class ToyConfig(MethodConfig):
    """Alignment + ``weight`` x uniformity of L2-normalised projections of two views."""

    name: Literal["toy"] = "toy"
    t: float = Field(2.0, gt=0, description="uniformity temperature t in exp(-t ||u - v||^2)")
    weight: float = Field(1.0, ge=0, description="weight of the uniformity term")

    reference = "Wang & Isola 2020 (arXiv:2005.10242)"
    reports = {"toy_align": Metric("min", 0.0, 4.0)}  # E||z1 - z2||^2 of unit vectors
    small_data = ("method.weight=1.0",)
    tiny = {"t": 2.0}

    @property
    def views_per_sample(self) -> int:
        return 2

    def check(self, cfg: Config) -> None:
        if cfg.train.batch_size < 3:
            raise ValueError("train.batch_size must be >= 3 for the toy's uniformity term")


class Toy(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        assert isinstance(cfg.method, ToyConfig)
        self.t, self.weight = cfg.method.t, cfg.method.weight

    def training_step(self, views, labels, index):  # type: ignore[override]
        z = F.normalize(self.project_views(views).float(), dim=-1)  # [2, B, D]
        align = (z[0] - z[1]).pow(2).sum(-1).mean()
        uniform = torch.pdist(z[0]).pow(2).mul(-self.t).exp().mean().log()
        loss = align + self.weight * uniform
        return loss, {"loss": loss.detach(), "toy_align": align.detach()}


register_method(Toy, ToyConfig)
