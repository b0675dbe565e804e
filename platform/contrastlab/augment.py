"""Batched multi-view augmentation that runs on the training device.

The reference implementations (SimCLR, SupContrast, MoCo, EMP-SSL) augment one PIL image at a
time inside DataLoader workers. With 20 views per image (EMP-SSL) that per-image cost dominates
a CIFAR-sized run. :class:`BatchAugment` instead draws every random parameter for all
``n_views * B`` outputs at once and applies each op to the whole batch as a few tensor kernels,
on CPU or CUDA, with no Python loop over samples.

Pipeline, per output (torchvision semantics unless listed below). Ops 2, 7 and 9 and the
rotation in 1 are off by default and in every recipe (see :class:`AugmentConfig`):

1. geometry: random resized crop, horizontal flip, rotation by ``U(-rotate_degrees,
   rotate_degrees)`` and bilinear resize, composed into one affine map per output and applied
   to all outputs of all images in ONE ``F.grid_sample`` call (the grid is
   ``F.affine_grid``'s, computed in closed form). The composition is crop -> flip -> rotate:
   the view is rotated about its centre after the flip, as torchvision's RandomResizedCrop,
   RandomHorizontalFlip, RandomRotation in that order (a positive angle turns the content
   counter-clockwise). Where a rotated view leaves its crop box, ``rotate_fill='image'`` shows
   the source image around the box (its edge replicated beyond the image, like the crop) and
   ``'zeros'`` shows black, as RandomRotation's default fill (hard edge: a pixel is black when
   its centre maps outside the box);
2. channel shuffle with probability ``channel_shuffle_p`` (a uniform random permutation of
   R, G, B, one of all 6, the identity included, so the order changes with probability
   ``5/6 * p``), then a per-channel gain ``U(channel_gain)`` drawn independently for each
   channel, clamped to [0, 1]. Both change the colouring of the image itself, so they come
   first among the colour ops: the jitter, grayscale and solarize that follow see the
   recoloured image, as they would see an image whose colours were different to begin with;
3. colour jitter with probability ``jitter_p``: brightness, contrast, saturation, hue;
4. grayscale with probability ``grayscale_p``;
5. Gaussian blur with probability ``blur_p``, per-sample sigma;
6. solarize with probability ``solarize_p``;
7. intensity inversion ``x -> 1 - x`` with probability ``invert_p``; after solarize, so that
   ``solarize_threshold`` refers to the image's own intensities;
8. normalisation with the dataset mean/std (if ``cfg.normalize``);
9. random erasing with probability ``erase_p``: one rectangle per output, area
   ``U(erase_scale)`` of the view, height/width ratio log-uniform in ``erase_ratio``, set to
   ``erase_value``. Last, as torchvision's RandomErasing after Normalize: the value is in the
   output's units (0 = the dataset mean colour when normalising) and no later op touches it.

Every op draws per-output parameters for all ``n_views * B`` outputs at once; an op that is
off draws nothing and launches no kernel.

Deviations from torchvision / PIL, all deliberate:

* Crop boxes are continuous (sub-pixel position and size) instead of rounded to whole pixels.
* Crop area: torchvision draws (area, log-ratio) jointly uniform and rejects boxes that do not
  fit (10 tries, then a centre crop), which under-samples large areas whenever the ratio range
  is wider than the image allows. Here the area fraction is drawn from ``U(crop_scale)`` and
  the log-ratio uniformly from the part of ``log(crop_ratio)`` for which that area fits. Given
  the area, the ratio has the same distribution as under rejection, but the area's marginal is
  exactly ``U(crop_scale)``. If no ratio in range fits (extreme image aspect), the nearest
  allowed ratio is used and the box is shrunk until it fits.
* Resizing is bilinear without antialiasing (``grid_sample`` has none). For CIFAR-sized crops
  (upsampled) this changes nothing; a crop much larger than ``out_size`` aliases where PIL
  would low-pass it. Pixels whose bilinear footprint crosses the crop edge read the real
  neighbouring pixels instead of replicating the crop's edge (only the outer ring of an
  upsampled crop; image borders are replicated as torchvision does).
* Colour jitter applies its four ops in the fixed order brightness, contrast, saturation, hue;
  torchvision draws a random order per call.
* Grayscale (and the grayscale used by contrast and saturation) uses the ITU-R 601-2 luma
  weights 0.299, 0.587, 0.114 as PIL does; torchvision's tensor path uses 0.2989.
* Rotation reads the source once (no second interpolation of the resized crop), and with
  ``rotate_fill='image'`` shows real image content in the corners instead of a fill colour.
* Erasing: torchvision draws (area, log-ratio) and rejects rectangles that do not fit (10
  tries, then no erasing at all). Here, as for the crop, the log-ratio is drawn from the part
  of the range for which the area fits, so a view is erased with probability exactly
  ``erase_p``; a rectangle may span the whole height or width (torchvision: strictly less).
  Height and width are rounded to whole pixels (at least 1), the position uniform over the
  whole-pixel positions, as torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from contrastlab.config import AugmentConfig

__all__ = ["BatchAugment", "blur_kernel_size"]

# ITU-R 601-2 luma transform, as in PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)

# Columns of the single uniform draw made by ``sample_params``: one ``torch.rand`` call keeps
# the random stream a pure function of (seed, n), whatever ops the config enables.
(
    _U_AREA,
    _U_RATIO,
    _U_TOP,
    _U_LEFT,
    _U_FLIP,
    _U_JITTER,
    _U_BRIGHT,
    _U_CONTRAST,
    _U_SAT,
    _U_HUE,
    _U_GRAY,
    _U_BLUR,
    _U_SIGMA,
    _U_SOLAR,
) = range(14)
_N_UNIFORMS = 14

# Columns of the second uniform draw, made only when one of the ops added later (channel
# shuffle/gain, invert, rotation, erasing) is on, AFTER the first: the first draw, and so
# every parameter of the original ops, is the same whether they are on or not. One draw for
# all of them keeps each one's parameters independent of which others are on.
(
    _V_SHUFFLE,
    _V_PERM,
    _V_GAIN_R,
    _V_GAIN_G,
    _V_GAIN_B,
    _V_INVERT,
    _V_ANGLE,
    _V_ERASE,
    _V_ERASE_AREA,
    _V_ERASE_RATIO,
    _V_ERASE_TOP,
    _V_ERASE_LEFT,
) = range(12)
_N_UNIFORMS_2 = 12

# The 6 permutations of (R, G, B), the identity first: channel c of the output is channel
# perm[c] of the input.
_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

# Keys of the parameter dict that hold one value per output sample.
_PARAM_KEYS = (
    "box",
    "flip",
    "jitter",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "gray",
    "blur",
    "sigma",
    "solarize",
    "angle",
    "channel_perm",
    "channel_gain",
    "invert",
    "erase",
    "erase_box",
    "erase_noise",
)


def blur_kernel_size(frac: float, out_size: int) -> int:
    """Gaussian kernel size: the odd integer nearest to ``frac * out_size``, at least 3.

    Ties (an even ``frac * out_size``) round up. The size is capped at ``2 * out_size - 1``
    because reflect padding needs the pad to be smaller than the image; a 1-pixel output gets
    size 1 (no blur).

    Args:
        frac: kernel size as a fraction of the output side.
        out_size: output side in pixels.

    Returns:
        The odd kernel size.
    """
    k = 2 * math.floor(frac * out_size / 2) + 1
    return min(max(k, 3), 2 * out_size - 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[m, 3, H, W] -> [m, 1, H, W] grayscale."""
    r, g, b = x.unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    """[m] -> [m, 1, 1, 1] so a per-sample factor broadcasts over an image batch."""
    return f.view(-1, 1, 1, 1)


# The ops below (trailing underscore) may overwrite their input ``x`` [m, 3, H, W] and return
# the result: ``_masked`` hands them a private buffer. On CPU these ops are memory-bound, and
# each fresh full-size temporary costs about as much as the arithmetic on it (page faults on
# new allocations included), so they avoid temporaries of the full image size.


def _brightness_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_sample(f)).clamp_(0.0, 1.0)


def _contrast_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # Blend towards the mean *luma* of each image (a scalar per image), as torchvision does:
    # f * x + (1 - f) * mean == x + (1 - f) * (mean - x).
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)  # [m, 1, 1, 1]
    return x.lerp_(mean, _per_sample(1.0 - f)).clamp_(0.0, 1.0)


def _saturation_(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.lerp_(_luma(x), _per_sample(1.0 - f)).clamp_(0.0, 1.0)


def _hue_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [m, 3, H, W] images by ``shift`` [m] turns.

    A hue rotation keeps HSV value V (max channel) and chroma C (max - min), so only the hue
    is computed. The new RGB uses the closed form of the hexagonal HSV->RGB: with the hue
    ``h`` in sextants, in [0, 6), channel n is ``V - C * clamp(2 - d_n, 0, 1)`` where ``d_n``
    is the distance around the hue circle from ``h`` to ``a_n = 3, 5, 1`` for R, G, B (the
    hues where that channel is the minimum). Writing the circular distance as
    ``3 - |3 - |h - a_n||`` needs only abs and subtractions: no six-way sextant selection,
    and no ``torch.where``, which is several times slower than arithmetic on CPU.
    """
    r, g, b = x.unbind(1)  # each [m, H, W]
    v = x.amax(dim=1)
    chroma = v - x.amin(dim=1)
    # Gray pixels (C = 0) have all three numerators 0; any positive divisor gives hue 0.
    inv = chroma.clamp(min=1e-12).reciprocal_()
    # Which channel is the max, precedence R > G > B; exactly one mask is set per pixel.
    is_r = r == v
    is_g = (g == v) & ~is_r
    is_b = ~(is_r | is_g)
    # Hue in sextants, times C: (g-b), 2C + (b-r) or 4C + (r-g) for max R, G or B.
    h6 = (g - b).mul_(is_r)
    h6 += (b - r).add_(chroma, alpha=2.0).mul_(is_g)
    h6 += (r - g).add_(chroma, alpha=4.0).mul_(is_b)
    # h6 / C is in [-1, 5) and 6 * shift in [-3, 3]: + 12 keeps fmod's operand positive,
    # where fmod is a true modulo and cheaper than remainder.
    h6 = h6.mul_(inv).add_((shift * 6.0 + 12.0).view(-1, 1, 1)).fmod_(6.0)  # [m, H, W]
    # r, g, b are no longer needed: build the new channels in x's memory.
    for c, a in enumerate((3.0, 5.0, 1.0)):
        torch.sub(h6, a, out=x[:, c])
    # clamp(2 - (3 - |3 - |h - a||), 0, 1) = clamp(|3 - |h - a|| - 1, 0, 1), in place.
    w = x.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return w.mul_(chroma.neg_().unsqueeze(1)).add_(v.unsqueeze(1)).clamp_(0.0, 1.0)


def _grayscale_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(_luma(x).expand_as(x))


def _solarize_(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x, out=x)


def _invert_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - x`` where ``mask`` [m] is true, ``x`` elsewhere, with no temporaries.

    With m in {0, 1}: ``x * (1 - 2m) + m`` is ``x`` (exactly) or ``-x + 1``, the same single
    rounding as ``1 - x``. Cheaper than selecting samples on any device.
    """
    m = _per_sample(mask.to(x.dtype))
    return x.mul_(1.0 - 2.0 * m).add_(m)


def _channel_shuffle(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """[m, 3, H, W] -> new [m, 3, H, W] with channel c of sample i = ``x[i, perm[i, c]]``."""
    m, c, h, w = x.shape
    return torch.gather(x, 1, perm.view(m, c, 1, 1).expand(m, c, h, w))


def _erase_(
    x: torch.Tensor,
    box: torch.Tensor,
    erase: torch.Tensor | None,
    value: float | torch.Tensor,
) -> torch.Tensor:
    """Set one rectangle per sample of ``x`` [m, 3, S, S] to ``value``.

    Args:
        x: the batch, updated in place.
        box: [m, 4] whole-pixel ``(top, left, height, width)``.
        erase: bool [m], which samples to erase (None: all).
        value: a number, or a [m, 3, S, S] tensor to copy from inside the rectangles.
    """
    h, w = x.shape[-2:]
    top, left, bh, bw = box.to(torch.float32).unbind(1)  # [m] each
    rows = torch.arange(h, device=x.device, dtype=torch.float32)
    cols = torch.arange(w, device=x.device, dtype=torch.float32)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])  # [m, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])  # [m, W]
    if erase is not None:
        in_rows &= erase[:, None]
    mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # [m, 1, H, W]
    if isinstance(value, torch.Tensor):
        return torch.where(mask, value, x, out=x)
    return x.masked_fill_(mask, value)


def _gaussian_blur_(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of [m, 3, H, W] with a per-sample ``sigma`` [m].

    Each pass is a sum over the few kernel taps of shifted views of the reflect-padded batch,
    weighted per sample: no per-sample kernels to materialise as conv weights, and the same
    code on CPU and CUDA. Weights follow torchvision: taps at integer offsets, normalised.
    """
    if kernel_size <= 1:
        return x
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half  # [K]
    weights = torch.exp(-0.5 * (offsets / sigma.to(x.dtype).unsqueeze(1)) ** 2)  # [m, K]
    weights = weights / weights.sum(dim=1, keepdim=True)
    weights = weights.view(-1, 1, 1, 1, kernel_size)  # [m, 1, 1, 1, K]
    h, w = x.shape[-2:]
    padded = F.pad(x, (half, half, half, half), mode="reflect")  # [m, 3, H+2p, W+2p]
    rows = padded[..., 0:w] * weights[..., 0]  # [m, 3, H+2p, W]
    for k in range(1, kernel_size):
        rows.addcmul_(padded[..., k : k + w], weights[..., k])
    torch.mul(rows[..., 0:h, :], weights[..., 0], out=x)
    for k in range(1, kernel_size):
        x.addcmul_(rows[..., k : k + h, :], weights[..., k])
    return x


def _axis_aligned_affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, C, size, size], align_corners=False)`` for shear-free theta.

    Crop, flip and resize only scale and translate each axis, so the grid is an outer
    combination of two [n, size] coordinate vectors. ``F.affine_grid`` computes the same grid
    as a batched [size*size, 3] x [3, 2] matmul, which on CPU takes ~15x longer than this
    (about a fifth of the whole augmentation for CIFAR-sized views).

    Args:
        theta: [n, 2, 3] affine matrices with ``theta[:, 0, 1] == theta[:, 1, 0] == 0``.
        size: output side.

    Returns:
        [n, size, size, 2] sampling grid, (x, y) in the last dim.
    """
    n = theta.shape[0]
    # Output pixel centres in normalised coordinates (align_corners=False).
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2.0 + 1.0) / size - 1.0
    gx = theta[:, 0, 0, None] * base + theta[:, 0, 2, None]  # [n, S], varies along width
    gy = theta[:, 1, 1, None] * base + theta[:, 1, 2, None]  # [n, S], varies along height
    return torch.stack(
        (gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)), dim=-1
    )


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, C, size, size], align_corners=False)`` for any theta.

    Each grid coordinate is ``t0 * x + t1 * y + t2``: the sum of a term that varies along the
    width and one that varies along the height, written straight into the grid (no
    [size*size, 3] x [3, 2] matmul). Used when the views are rotated; otherwise
    :func:`_axis_aligned_affine_grid`.

    Args:
        theta: [n, 2, 3] affine matrices.
        size: output side.

    Returns:
        [n, size, size, 2] sampling grid, (x, y) in the last dim.
    """
    n = theta.shape[0]
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2.0 + 1.0) / size - 1.0
    grid = theta.new_empty(n, size, size, 2)
    for k in range(2):
        along_w = theta[:, k, 0, None] * base  # [n, S]
        along_h = theta[:, k, 1, None] * base + theta[:, k, 2, None]  # [n, S]
        torch.add(along_w[:, None, :], along_h[:, :, None], out=grid[..., k])
    return grid


def _outside_view(rad: torch.Tensor, size: int) -> torch.Tensor:
    """bool [n, size, size]: output pixels whose centre, rotated by ``rad`` [n] (see
    ``_crop_flip_resize``), falls outside the unrotated view, i.e. outside the crop box."""
    base = (torch.arange(size, device=rad.device, dtype=rad.dtype) * 2.0 + 1.0) / size - 1.0
    cos, sin = torch.cos(rad)[:, None, None], torch.sin(rad)[:, None, None]
    x, y = base[None, None, :], base[None, :, None]
    return ((cos * x - sin * y).abs() > 1.0) | ((sin * x + cos * y).abs() > 1.0)


def _compacts(device: torch.device) -> bool:
    """Whether ``_masked`` computes only the selected samples on ``device`` (see there)."""
    return device.type == "cpu"


def _masked(
    x: torch.Tensor,
    mask: torch.Tensor,
    op: Callable[..., torch.Tensor],
    *args: torch.Tensor,
) -> torch.Tensor:
    """Apply ``op(x[i], *args[i])`` to the samples where ``mask`` [n] is true.

    ``x`` [n, 3, H, W] is the caller's private buffer and may be updated in place; ``op`` may
    overwrite what it is given. On CPU only the selected samples are computed (blur at p=0.1
    then costs a tenth). On other devices the op runs on the whole batch and ``torch.where``
    picks: compacting would need ``nonzero``, a host-device sync that stalls the launch queue.
    """
    if _compacts(x.device):
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        if idx.numel() == x.shape[0]:
            return op(x, *args)
        sub = op(x.index_select(0, idx), *(a.index_select(0, idx) for a in args))
        return x.index_copy_(0, idx, sub)
    return torch.where(_per_sample(mask), op(x.clone(), *args), x)


def _box_sizes(
    u_area: torch.Tensor,
    u_ratio: torch.Tensor,
    height: float,
    width: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heights and widths [n] of boxes inside ``height x width`` from two uniforms [n] each.

    The area fraction is ``U(scale)`` and the log of the ratio ``w / h`` uniform over the part
    of ``log(ratio)`` for which that area fits (see the module docstring).
    """
    H, W = height, width
    area = (scale[0] + (scale[1] - scale[0]) * u_area) * (H * W)  # [n] target area, pixels^2
    log_r_lo, log_r_hi = (math.log(r) for r in ratio)
    # The box fits iff h = sqrt(area / r) <= H and w = sqrt(area * r) <= W, i.e.
    # r in [area / H^2, W^2 / area]; intersect that with the allowed log-ratio range.
    lo = torch.log(area / (H * H)).clamp(min=log_r_lo)
    hi = torch.log((W * W) / area).clamp(max=log_r_hi)
    # Where the intersection is empty, lo > hi and the draw lands between them; the clamp
    # then picks the allowed ratio nearest to the fitting ones.
    log_r = (lo + (hi - lo) * u_ratio).clamp(log_r_lo, log_r_hi)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r)
    h = torch.sqrt(area / r)
    # 1 whenever the box fits (up to rounding); shrinks infeasible boxes, keeping the ratio.
    shrink = torch.minimum(W / w, H / h).clamp(max=1.0)
    return h * shrink, w * shrink


class BatchAugment:
    """Multi-view augmentation of a batch, as tensor ops on the batch's device.

    Args:
        cfg: the augmentation recipe.
        out_size: side of the square output views, in pixels.
        mean: per-channel dataset mean (3 values, images in [0, 1]).
        std: per-channel dataset std (3 positive values).

    Example:
        >>> aug = BatchAugment(cfg, out_size=32, mean=(0.49, 0.48, 0.45), std=(0.25,) * 3)
        >>> views = aug(images_uint8, n_views=2, generator=g)  # [2, B, 3, 32, 32] float32
    """

    def __init__(
        self, cfg: AugmentConfig, out_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        if out_size < 1:
            raise ValueError(f"out_size must be >= 1, got {out_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {list(mean)}, {list(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        self.cfg = cfg
        self.out_size = int(out_size)
        self.kernel_size = blur_kernel_size(cfg.blur_kernel_frac, self.out_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # Whether any op of the second draw is on (else that draw is not made at all).
        self._second_draw = (
            cfg.rotate_degrees > 0
            or cfg.channel_shuffle_p > 0
            or tuple(cfg.channel_gain) != (1.0, 1.0)
            or cfg.invert_p > 0
            or cfg.erase_p > 0
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(recipe={self.cfg.recipe!r}, out_size={self.out_size}, "
            f"kernel_size={self.kernel_size})"
        )

    # ------------------------------------------------------------------ parameters

    def sample_params(
        self,
        n: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Draw independent random parameters for ``n`` outputs from ``height x width`` images.

        Randomness comes only from ``generator`` when given (drawn on the generator's device,
        then moved to ``device``), otherwise from the global RNG of ``device``. The original
        ops' parameters all come from one ``torch.rand(n, 14)`` call. Only when one of the
        later ops (rotation, channel shuffle/gain, invert, erasing) is on, a second
        ``torch.rand(n, 12)`` follows for all of those, and ``erase_value='random'`` adds a
        ``torch.randn(n, 3, S, S)`` after it. So a seed fixes every parameter, and turning a
        later op on or off never changes the parameters of the original ones.

        Returned keys (each tensor has leading dim ``n`` and lives on ``device``):

        * ``box``: float32 [n, 4], crop box ``(top, left, height, width)`` in source pixels,
          continuous; always inside the image.
        * ``flip``: bool [n], mirror the view horizontally.
        * ``jitter``: bool [n], apply colour jitter to this sample.
        * ``brightness``, ``contrast``, ``saturation``: float32 [n], multiplicative factors
          (1 = identity).
        * ``hue``: float32 [n], hue shift in turns (fraction of the colour wheel).
        * ``gray``: bool [n], convert to grayscale.
        * ``blur``: bool [n], Gaussian-blur; ``sigma``: float32 [n], its std in pixels.
        * ``solarize``: bool [n], invert pixels >= ``cfg.solarize_threshold``.
        * ``angle``: float32 [n], rotation in degrees, counter-clockwise.
        * ``channel_perm``: int64 [n, 3], output channel c is input channel ``perm[c]`` (the
          identity ``(0, 1, 2)`` for samples not shuffled).
        * ``channel_gain``: float32 [n, 3], per-channel factors.
        * ``invert``: bool [n], ``x -> 1 - x``.
        * ``erase``: bool [n], erase a rectangle; ``erase_box``: float32 [n, 4], its
          ``(top, left, height, width)`` in whole output pixels; ``erase_noise``: float32
          [n, 3, S, S], the N(0, 1) fill when ``cfg.erase_value == 'random'``.

        A key is left out when the config disables its op (probability 0, or a jitter
        strength of 0), so that :meth:`apply` skips the op without looking at the data.

        Args:
            n: number of outputs.
            height: source image height in pixels.
            width: source image width in pixels.
            device: where the returned tensors go (default: the generator's device, or CPU).
            generator: source of randomness.

        Returns:
            The parameter dict described above.
        """
        cfg = self.cfg
        if generator is not None:
            sample_device = generator.device
        else:
            sample_device = torch.device(device if device is not None else "cpu")
        out_device = torch.device(device) if device is not None else sample_device
        u = torch.rand(n, _N_UNIFORMS, generator=generator, device=sample_device)  # [n, 14]

        params: dict[str, torch.Tensor] = {"box": self._sample_boxes(u, height, width)}
        if cfg.flip_p > 0:
            params["flip"] = u[:, _U_FLIP] < cfg.flip_p
        if cfg.jitter_p > 0:
            jitter = {
                "brightness": (cfg.brightness, _U_BRIGHT),
                "contrast": (cfg.contrast, _U_CONTRAST),
                "saturation": (cfg.saturation, _U_SAT),
            }
            for key, (strength, col) in jitter.items():
                if strength > 0:
                    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
                    params[key] = lo + (hi - lo) * u[:, col]
            if cfg.hue > 0:
                params["hue"] = (2.0 * u[:, _U_HUE] - 1.0) * cfg.hue
            if any(k in params for k in ("brightness", "contrast", "saturation", "hue")):
                params["jitter"] = u[:, _U_JITTER] < cfg.jitter_p
        if cfg.grayscale_p > 0:
            params["gray"] = u[:, _U_GRAY] < cfg.grayscale_p
        if cfg.blur_p > 0 and self.kernel_size > 1:
            lo, hi = cfg.blur_sigma
            params["blur"] = u[:, _U_BLUR] < cfg.blur_p
            params["sigma"] = lo + (hi - lo) * u[:, _U_SIGMA]
        if cfg.solarize_p > 0:
            params["solarize"] = u[:, _U_SOLAR] < cfg.solarize_p
        if self._second_draw:
            v = torch.rand(n, _N_UNIFORMS_2, generator=generator, device=sample_device)
            params.update(self._sample_later_ops(v, generator))
        # contiguous(): column slices of u would otherwise keep strided views of it.
        return {k: v.contiguous().to(out_device) for k, v in params.items()}

    def _sample_boxes(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Crop boxes [n, 4] = (top, left, h, w) from the uniforms ``u`` [n, 14]."""
        H, W = float(height), float(width)
        h, w = _box_sizes(
            u[:, _U_AREA], u[:, _U_RATIO], H, W, self.cfg.crop_scale, self.cfg.crop_ratio
        )
        top = u[:, _U_TOP] * (H - h).clamp(min=0.0)
        left = u[:, _U_LEFT] * (W - w).clamp(min=0.0)
        return torch.stack((top, left, h, w), dim=1)

    def _sample_later_ops(
        self, v: torch.Tensor, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """Parameters of the ops added later, from the second draw ``v`` [n, 12]."""
        cfg = self.cfg
        n = v.shape[0]
        params: dict[str, torch.Tensor] = {}
        if cfg.rotate_degrees > 0:
            params["angle"] = (2.0 * v[:, _V_ANGLE] - 1.0) * cfg.rotate_degrees
        if cfg.channel_shuffle_p > 0:
            # floor(6u) picks one of the 6 permutations; samples not shuffled get index 0.
            k = (v[:, _V_PERM] * 6.0).long().clamp_(max=5)
            k = torch.where(v[:, _V_SHUFFLE] < cfg.channel_shuffle_p, k, 0)
            params["channel_perm"] = torch.tensor(_PERMUTATIONS, device=v.device)[k]
        if tuple(cfg.channel_gain) != (1.0, 1.0):
            lo, hi = cfg.channel_gain
            params["channel_gain"] = lo + (hi - lo) * v[:, _V_GAIN_R : _V_GAIN_B + 1]
        if cfg.invert_p > 0:
            params["invert"] = v[:, _V_INVERT] < cfg.invert_p
        if cfg.erase_p > 0:
            S = float(self.out_size)
            size = self.out_size
            # torchvision's ratio is height / width, _box_sizes' is width / height.
            r_lo, r_hi = cfg.erase_ratio
            u_area, u_ratio = v[:, _V_ERASE_AREA], v[:, _V_ERASE_RATIO]
            h, w = _box_sizes(u_area, u_ratio, S, S, cfg.erase_scale, (1 / r_hi, 1 / r_lo))
            h = h.round().clamp(1.0, S)
            w = w.round().clamp(1.0, S)
            # Uniform over the S - h + 1 whole-pixel positions (the min guards u * k -> k).
            top = torch.minimum((v[:, _V_ERASE_TOP] * (S - h + 1.0)).floor(), S - h)
            left = torch.minimum((v[:, _V_ERASE_LEFT] * (S - w + 1.0)).floor(), S - w)
            params["erase"] = v[:, _V_ERASE] < cfg.erase_p
            params["erase_box"] = torch.stack((top, left, h, w), dim=1)
            if cfg.erase_value == "random":
                params["erase_noise"] = torch.randn(
                    n, 3, size, size, generator=generator, device=v.device
                )
        return params

    # ------------------------------------------------------------------ application

    @torch.no_grad()
    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment ``images`` with given parameters.

        ``params`` may describe ``n = V * B`` outputs for ``B`` images: output ``v * B + b``
        is view ``v`` of image ``b``. Ops whose keys are missing are skipped (a missing
        ``box`` means the whole image), which lets tests pass hand-made parameters.

        Args:
            images: uint8 [B, 3, H, W] (or float in [0, 1]; 1 channel is replicated).
            params: parameter dict as returned by :meth:`sample_params` (moved to the
                images' device if needed).

        Returns:
            float32 [n, 3, out_size, out_size], normalised if ``cfg.normalize``.
        """
        x = self._to_float(images)  # [B, 3, H, W]
        B = x.shape[0]
        n = self._num_outputs(params, B)
        if n == 0 or B == 0:
            return x.new_empty(0, 3, self.out_size, self.out_size)
        if n % B:
            raise ValueError(f"params describe {n} outputs, not a multiple of {B} images")
        params = {k: v.to(x.device) for k, v in params.items()}  # no copy when already there
        out = self._crop_flip_resize(x, params, n)  # [n, 3, S, S]

        if "channel_perm" in params:
            out = _channel_shuffle(out, params["channel_perm"].long())
        if "channel_gain" in params:
            out = out.mul_(params["channel_gain"].to(out.dtype).view(n, 3, 1, 1)).clamp_(0.0, 1.0)
        if "jitter" in params:
            # Fixed order brightness -> contrast -> saturation -> hue (torchvision: random),
            # under one mask so that the CPU path compacts the jittered samples only once.
            jitter_ops: list[tuple[Callable[..., torch.Tensor], str]] = [
                (_brightness_, "brightness"),
                (_contrast_, "contrast"),
                (_saturation_, "saturation"),
                (_hue_, "hue"),
            ]
            ops = [(op, key) for op, key in jitter_ops if key in params]

            def jitter(t: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
                for (op, _), f in zip(ops, factors, strict=True):
                    t = op(t, f)
                return t

            out = _masked(out, params["jitter"], jitter, *(params[key] for _, key in ops))
        if "gray" in params:
            out = _masked(out, params["gray"], _grayscale_)
        if "blur" in params:
            ks = self.kernel_size
            out = _masked(
                out, params["blur"], lambda t, s: _gaussian_blur_(t, s, ks), params["sigma"]
            )
        if "solarize" in params:
            thr = self.cfg.solarize_threshold
            out = _masked(out, params["solarize"], lambda t: _solarize_(t, thr))
        if "invert" in params:
            out = _invert_(out, params["invert"])
        if self.cfg.normalize:
            mean, std = self._mean_std(out.device)
            out = out.sub_(mean).div_(std)
        if "erase_box" in params:
            fill: float | torch.Tensor
            if self.cfg.erase_value == "random":
                if "erase_noise" not in params:
                    raise ValueError("erase_value='random' needs the 'erase_noise' parameter")
                fill = params["erase_noise"].to(out.dtype)
            else:
                fill = float(self.cfg.erase_value)
            out = _erase_(out, params["erase_box"], params.get("erase"), fill)
        return out

    def _crop_flip_resize(
        self, x: torch.Tensor, params: dict[str, torch.Tensor], n: int
    ) -> torch.Tensor:
        """One ``grid_sample`` for every output: [B, 3, H, W] -> [n, 3, S, S]."""
        B, C, H, W = x.shape
        S = self.out_size
        V = n // B
        if "box" in params:
            top, left, h, w = params["box"].to(device=x.device, dtype=x.dtype).unbind(1)
        else:
            top = x.new_zeros(n)
            left = x.new_zeros(n)
            h = x.new_full((n,), float(H))
            w = x.new_full((n,), float(W))
        # With align_corners=False, output pixel j of the resized crop reads source pixel
        # left + (j + 0.5) * w / S - 0.5, as F.interpolate does. In normalised coordinates
        # that is the affine map x -> (w / W) * x + (2 * left + w) / W - 1: scale by the box
        # size, translate to the box centre. A horizontal flip negates the x scale.
        sx = w / W
        if "flip" in params:
            sx = torch.where(params["flip"], -sx, sx)
        tx = (2.0 * left + w) / W - 1.0
        sy = h / H
        ty = (2.0 * top + h) / H - 1.0
        angle = params.get("angle")
        if angle is None:
            zero = torch.zeros_like(sx)
            theta = torch.stack(
                (torch.stack((sx, zero, tx), dim=1), torch.stack((zero, sy, ty), dim=1)), dim=1
            )  # [n, 2, 3]
        else:
            # Rotation about the view's centre, applied to the output coordinates before the
            # crop map: output point p reads the flipped crop at R p. In image coordinates (y
            # down), content turned counter-clockwise by a is read at
            # R = [[cos a, -sin a], [sin a, cos a]] (the output is square, so no aspect fix).
            rad = angle.to(x.dtype) * (math.pi / 180.0)
            cos, sin = torch.cos(rad), torch.sin(rad)
            theta = torch.stack(
                (
                    torch.stack((sx * cos, -sx * sin, tx), dim=1),
                    torch.stack((sy * sin, sy * cos, ty), dim=1),
                ),
                dim=1,
            )  # [n, 2, 3]
        # Put the V views of each image next to each other (b-major) and stack them along the
        # grid's height instead of repeating the source V times: grid_sample then reads
        # [B, 3, H, W] once, whatever V is.
        theta = theta.view(V, B, 2, 3).transpose(0, 1).reshape(n, 2, 3)
        make_grid = _axis_aligned_affine_grid if angle is None else _affine_grid
        grid = make_grid(theta, S).view(B, V * S, S, 2)
        # padding_mode="border" replicates the image edge, like F.interpolate's clamping.
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # [B, 3, V*S, S] -> [V, B, 3, S, S] -> [n, 3, S, S] with n ordered view-major.
        out = out.view(B, C, V, S, S).permute(2, 0, 1, 3, 4).reshape(n, C, S, S)
        if angle is not None and self.cfg.rotate_fill == "zeros":
            out = out.masked_fill_(_outside_view(rad, S).unsqueeze(1), 0.0)
        return out

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, n_views: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``n_views`` independently augmented views of every image.

        Args:
            images: uint8 [B, 3, H, W] (or float in [0, 1]) on any device.
            n_views: views per image.
            generator: source of randomness (may live on CPU while images are on CUDA). With a
                fixed seed on CPU the output is bit-identical across calls.

        Returns:
            float32 [n_views, B, 3, out_size, out_size].
        """
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        self._check_images(images)
        B, _, H, W = images.shape
        params = self.sample_params(n_views * B, H, W, images.device, generator)
        out = self.apply(images, params)  # [n_views * B, 3, S, S]
        return out.view(n_views, B, 3, self.out_size, self.out_size)

    @torch.no_grad()
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic eval-time transform: to [0, 1], resize to ``out_size``, normalise.

        Resizing (only if the images are not already ``out_size`` square) is bilinear with
        antialiasing, as ``torchvision.transforms.Resize`` on tensors.

        Args:
            images: uint8 [B, 3, H, W] or float in [0, 1].

        Returns:
            float32 [B, 3, out_size, out_size].
        """
        x = self._to_float(images)
        S = self.out_size
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        if self.cfg.normalize:
            mean, std = self._mean_std(x.device)
            x = (x - mean) / std
        return x

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_images(images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float [B, C, H, W] -> new float32 [B, 3, H, W] in [0, 1]."""
        self._check_images(images)
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).div_(255.0)
        else:
            # copy=True: callers may modify the result in place.
            x = images.to(torch.float32, copy=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        return x

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, 3, 1, 1] mean and std on ``device``, cached to avoid a copy per call."""
        if device not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._stats[device] = (mean, std)
        return self._stats[device]

    @staticmethod
    def _num_outputs(params: dict[str, torch.Tensor], batch: int) -> int:
        sizes = {int(params[k].shape[0]) for k in _PARAM_KEYS if k in params}
        if len(sizes) > 1:
            raise ValueError(f"parameter tensors disagree on the number of outputs: {sizes}")
        return sizes.pop() if sizes else batch
