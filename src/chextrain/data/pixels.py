"""Pixel helpers shared by the photo effects (data/photo.py and data/phone.py).

Images are uint8 H x W (grey) or H x W x 3 (RGB). Pixel parameters are given for a full-size
x-ray whose longer side is REFERENCE_SIZE px and scaled by `reference_scale`. This module
imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

Point = tuple[float, float]
Quad = Sequence[Sequence[float]]  # four corners (x, y): top-left, top-right, bottom-right, bottom-left

REFERENCE_SIZE = 2500  # px, the longer side pixel parameters are specified for
LEVELS: tuple[int, ...] = (1, 2, 3, 4)


def check_image(image: np.ndarray) -> np.ndarray:
    """Return `image` if it is uint8 H x W or H x W x 3 with H, W >= 2, else raise ValueError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 numpy array, got {kind}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or min(image.shape[:2]) < 2:
        raise ValueError(f"image must be H x W or H x W x 3 with H, W >= 2, got shape {image.shape}")
    return image


def check_level(level: int) -> int:
    """The photo level as an int if it is one of LEVELS, else raise ValueError."""
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or int(level) not in LEVELS:
        raise ValueError(f"photo level {level!r} is not one of {list(LEVELS)}")
    return int(level)


def reference_scale(image: np.ndarray) -> float:
    """Factor turning pixel parameters at REFERENCE_SIZE into this image's pixels."""
    return max(image.shape[:2]) / REFERENCE_SIZE


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey H x W -> H x W x 3 (the grey copied to each channel); RGB is returned as is."""
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def expand_field(field: np.ndarray, image: np.ndarray) -> np.ndarray:
    """H x W field -> broadcastable against `image` (H x W or H x W x 3)."""
    return field[..., None] if image.ndim == 3 else field


def round_to_uint8(x: np.ndarray) -> np.ndarray:
    """Round float pixels to uint8 with clipping; `x` must be a temporary (it is overwritten)."""
    x += 0.5
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def perspective_matrix(src: Sequence[Point], dst: Sequence[Point]) -> np.ndarray:
    """3 x 3 homography taking the 4 points `src` to `dst` (least squares, like find_coeffs)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b += [u, v]
    coeffs = np.linalg.lstsq(np.asarray(a, float), np.asarray(b, float), rcond=None)[0]
    return np.append(coeffs, 1.0).reshape(3, 3)


def perspective_coeffs(quad: Quad, w: int, h: int) -> tuple[float, ...]:
    """PIL PERSPECTIVE data drawing the whole w x h input inside `quad` of the output."""
    m = perspective_matrix([tuple(p) for p in quad], [(0, 0), (w, 0), (w, h), (0, h)])
    return tuple(m.ravel()[:8])


def warp_to_quad(image: np.ndarray, quad: Quad, resample: Image.Resampling) -> np.ndarray:
    """Draw the whole image inside `quad` of a same-size frame (bilinear/bicubic), black outside."""
    h, w = image.shape[:2]
    im = Image.fromarray(image).transform(
        (w, h), Image.Transform.PERSPECTIVE, perspective_coeffs(quad, w, h), resample
    )
    return np.array(im)
