"""Batched colour-space conversions of RGB image tensors, on any device.

CMC splits an image into channel groups of a colour space (L | ab of CIE Lab by default);
these functions convert whole ``[N, 3, H, W]`` batches of sRGB values in ``[0, 1]`` with tensor
arithmetic only (no per-image PIL / scikit-image round trip), in float32 whatever the autocast
state, because gamma curves and cube roots are visibly lossy in bfloat16.

Conventions (scikit-image's ``rgb2lab`` ones; the tests check published reference values):

* sRGB -> linear RGB: IEC 61966-2-1 transfer curve (linear below 0.04045, power 2.4 above).
* linear RGB -> XYZ: the sRGB / D65 matrix that scikit-image uses. The reference white is that
  matrix applied to RGB white (1, 1, 1), i.e. D65 as the sRGB primaries define it, so that
  white maps to exactly ``L = 100, a = b = 0`` (scikit-image's rounded D65 white point gives
  ``a, b`` of order 1e-3 there).
* XYZ -> Lab: CIE 1976 with the linear segment below ``(6/29)^3``.
* YCbCr: full-range ITU-R BT.601 (JPEG), with Cb and Cr centred at 0, i.e. in [-0.5, 0.5].

:func:`to_colorspace` also maps every channel to about ``[-1, 1]`` with fixed constants from
the channel's range over the sRGB gamut (as upstream CMC normalises L, a, b), so the
encoders see inputs of similar scale whatever the colour space.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["COLORSPACES", "rgb_to_lab", "rgb_to_ycbcr", "to_colorspace"]

Colorspace = Literal["lab", "ycbcr", "rgb"]
COLORSPACES: tuple[str, ...] = ("lab", "ycbcr", "rgb")

# Linear sRGB -> CIE XYZ (D65), rows X, Y, Z.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# Reference white: the row sums (XYZ of RGB white).
_WHITE = tuple(sum(row) for row in _XYZ_FROM_RGB)
_DELTA = 6.0 / 29.0

# Per colour space: (centre, half range) of each channel over the sRGB gamut. Lab's a and b
# ranges are those upstream CMC normalises with (a in [-86.183, 98.233], b in [-107.857, 94.478]).
_RANGES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "lab": (
        (50.0, (98.233 - 86.183) / 2, (94.478 - 107.857) / 2),
        (50.0, (98.233 + 86.183) / 2, (94.478 + 107.857) / 2),
    ),
    "ycbcr": ((0.5, 0.0, 0.0), (0.5, 0.5, 0.5)),
    "rgb": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _check(rgb: Tensor) -> None:
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must be [N, 3, H, W], got shape {tuple(rgb.shape)}")


def _mix(x: Tensor, matrix: tuple[tuple[float, float, float], ...]) -> Tensor:
    """[N, 3, H, W] -> [N, 3, H, W], ``out[:, i] = sum_j matrix[i][j] * x[:, j]``.

    Written as scalar multiply-adds rather than a matmul so that autocast never touches it.
    """
    c0, c1, c2 = x.unbind(1)
    return torch.stack([m0 * c0 + m1 * c1 + m2 * c2 for m0, m1, m2 in matrix], dim=1)


def _srgb_to_linear(x: Tensor) -> Tensor:
    # clamp_min inside the power: its gradient/NaN-free for the branch that is not selected.
    high = ((x.clamp_min(0.04045) + 0.055) / 1.055).pow(2.4)
    return torch.where(x <= 0.04045, x / 12.92, high)


def _lab_f(t: Tensor) -> Tensor:
    cube = t.clamp_min(_DELTA**3).pow(1.0 / 3.0)
    return torch.where(t > _DELTA**3, cube, t / (3 * _DELTA**2) + 4.0 / 29.0)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in ``[0, 1]`` -> CIE Lab (D65): ``L`` in [0, 100], ``a`` and ``b`` roughly in
    [-86, 98] and [-108, 94].

    Args:
        rgb: ``[N, 3, H, W]`` sRGB values; clamped to ``[0, 1]`` first. Computed in float32
            (float64 stays float64).

    Returns:
        ``[N, 3, H, W]`` channels ``L, a, b``.
    """
    _check(rgb)
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        x = rgb.to(torch.promote_types(rgb.dtype, torch.float32)).clamp(0.0, 1.0)
        xyz = _mix(_srgb_to_linear(x), _XYZ_FROM_RGB)
        fx, fy, fz = (_lab_f(xyz[:, i] / _WHITE[i]) for i in range(3))
        return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """sRGB in ``[0, 1]`` -> full-range BT.601 YCbCr: ``Y`` in [0, 1], ``Cb, Cr`` in
    [-0.5, 0.5] (centred: JPEG's +0.5 offset is not added).

    Args:
        rgb: ``[N, 3, H, W]`` values in ``[0, 1]`` (clamped).

    Returns:
        ``[N, 3, H, W]`` channels ``Y, Cb, Cr``.
    """
    _check(rgb)
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        x = rgb.to(torch.promote_types(rgb.dtype, torch.float32)).clamp(0.0, 1.0)
        return _mix(
            x,
            (
                (0.299, 0.587, 0.114),
                (-0.168736, -0.331264, 0.5),
                (0.5, -0.418688, -0.081312),
            ),
        )


def to_colorspace(rgb: Tensor, space: str) -> Tensor:
    """Convert sRGB in ``[0, 1]`` to ``space`` and scale every channel to about ``[-1, 1]``.

    ``(value - centre) / half_range`` with each channel's centre and half range over the sRGB
    gamut (see ``_RANGES``): fixed constants, not data statistics.

    Args:
        rgb: ``[N, 3, H, W]`` sRGB values in ``[0, 1]``.
        space: ``"lab"``, ``"ycbcr"`` or ``"rgb"``.

    Returns:
        ``[N, 3, H, W]`` float32 (or float64) channels of ``space``, scaled.
    """
    if space == "lab":
        x = rgb_to_lab(rgb)
    elif space == "ycbcr":
        x = rgb_to_ycbcr(rgb)
    elif space == "rgb":
        _check(rgb)
        x = rgb.to(torch.promote_types(rgb.dtype, torch.float32)).clamp(0.0, 1.0)
    else:
        raise ValueError(f"unknown colour space {space!r}; allowed: {', '.join(COLORSPACES)}")
    centre, half = _RANGES[space]
    c = torch.tensor(centre, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    h = torch.tensor(half, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - c) / h
