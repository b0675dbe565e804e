"""A memory bank: one L2-normalised feature per training image (InstDisc's non-parametric
classifier weights), updated by a momentum average after each step."""

from __future__ import annotations

import torch
from torch import nn


class MemoryBank(nn.Module):
    """``size`` L2-normalised ``dim``-d rows, row ``i`` standing for training image ``i``.

    The rows are a registered buffer: they move with ``.to(device)`` (the bank lives on the
    training device) and are saved in ``state_dict()``, hence in every checkpoint. They are
    never trained by gradients; :meth:`update` writes them after a step::

        v_i <- normalize(momentum * v_i + (1 - momentum) * f_i)

    Args:
        size: number of rows N (training images).
        dim: row width D.
        momentum: weight of the old row in :meth:`update`, in ``[0, 1)``; 0 overwrites.
        generator: CPU RNG for the initial rows (uniform on the unit sphere: normalised
            Gaussian draws, as the paper's "random unit vectors").
    """

    rows: torch.Tensor

    def __init__(
        self, size: int, dim: int, momentum: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"memory bank size and dim must be >= 1, got {size}, {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory bank momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        init = torch.randn(size, dim, generator=generator)
        self.register_buffer("rows", nn.functional.normalize(init, dim=1))  # [N, D]

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at ``index`` (any integer shape ``S``) -> ``[*S, D]``, a detached copy."""
        return self.rows[index]

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """Blend ``features`` [M, D] into rows ``index`` [M] and renormalise those rows.

        ``index`` must not repeat (each image appears once per step). ``features`` are used
        as given (callers pass L2-normalised, detached features).
        """
        if index.ndim != 1 or features.shape != (index.shape[0], self.rows.shape[1]):
            raise ValueError(
                f"update needs index [M] and features [M, {self.rows.shape[1]}], got "
                f"{tuple(index.shape)} and {tuple(features.shape)}"
            )
        old = self.rows.index_select(0, index)
        new = torch.lerp(features.detach().to(old.dtype), old, self.momentum)
        self.rows.index_copy_(0, index, nn.functional.normalize(new, dim=1))
