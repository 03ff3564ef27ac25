"""Test-time augmentation (TTA): the fixed views `Predictor(..., tta=True)` averages, and their warp.

A few percent of zoom and shift, as in the training augmentation; no flips: a chest x-ray is not
left-right symmetric (the heart lies left; cardiomegaly is judged on that side). The first view
is the image itself (the OOD check uses it alone).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# TTA views (zoom, shift x, shift y; shifts as a fraction of the side): a few percent, as in
# the training augmentation; the first view is the image itself (OOD uses it alone).
TTA_VIEWS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (1.05, 0.0, 0.0),
    (0.95, 0.0, 0.0),
    (1.0, 0.03, 0.0),
    (1.0, -0.03, 0.0),
    (1.0, 0.0, 0.03),
    (1.0, 0.0, -0.03),
)


def jitter(image: np.ndarray, zoom: float, dx: float, dy: float) -> np.ndarray:
    """uint8 H x W zoomed about its centre and shifted by (dx, dy) x its size; black borders."""
    if (zoom, dx, dy) == (1.0, 0.0, 0.0):
        return image
    h, w = image.shape
    cx, cy = w / 2.0, h / 2.0
    # PIL maps each output pixel to its input: x_in = (x_out - c - d) / zoom + c.
    coeffs = (1 / zoom, 0.0, cx - (cx + dx * w) / zoom, 0.0, 1 / zoom, cy - (cy + dy * h) / zoom)
    out = Image.fromarray(image).transform(
        (w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0
    )
    return np.asarray(out)
