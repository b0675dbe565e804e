"""Decoding encoded image files / bytes (PNG, JPEG, ...) into fixed-size RGB arrays."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .core import DataError

# PIL's errors for unreadable / truncated / hostile inputs. DecompressionBombError is not an
# OSError; DecompressionBombWarning is turned into an error below.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_image(source: bytes | Path, size: int, where: str) -> np.ndarray:
    """Decode one image and bring it to ``uint8 [size, size, 3]`` RGB.

    The image is converted to RGB (grayscale replicated, palette expanded, alpha dropped),
    then its central square (side = shorter side) is resized to ``size`` with PIL's bilinear
    filter, which is antialiased when downscaling. A square image already at ``size`` is
    returned unchanged, so lossless formats round-trip exactly. For JPEG, ``draft`` lets the
    decoder downscale by a power of two during the DCT (never below ``size``), which makes
    large photos several times cheaper to decode.

    Args:
        source: encoded bytes or a file path.
        size: output side length.
        where: what to name in an error message (file, or file + row).

    Returns:
        ``uint8 [size, size, 3]`` array.

    Raises:
        DataError: the data does not decode as an image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
            with Image.open(fp) as f:
                if f.format == "JPEG":
                    f.draft("RGB", (size, size))
                if f.mode in ("I", "I;16", "I;16B", "I;16L"):
                    # 16-bit grayscale (PNG/TIFF): PIL's convert clips at 255 instead of
                    # rescaling, so map 0..65535 to 0..255 here.
                    gray = (np.asarray(f, dtype=np.float64) / 257.0).round().clip(0, 255)
                    img = Image.fromarray(gray.astype(np.uint8)).convert("RGB")
                else:
                    img = f.convert("RGB")  # forces the full decode: truncation raises here
    except (*_DECODE_ERRORS, Image.DecompressionBombWarning) as e:
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if (w, h) != (size, size):
        m = min(w, h)
        box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(img, dtype=np.uint8)
