"""Photo simulation: CheXphoto's two released recipes and the effects real phone photos show.

Each effect is a small function `effect(image, rng, level=1, ...) -> new uint8 array` for one
physical cause. Images are uint8 H x W (grey) or H x W x 3 (RGB) and keep their size; grey
stays grey unless the effect adds colour (`colour_cast`, `room_scene`, which return RGB).
Levels run 1 (CheXphoto's release) to 4 (strongest).

Pixel parameters (glare sigma, moire spacing, blur, offsets) are given for a full-size x-ray
whose longer side is REFERENCE_SIZE = 2500 px, and scaled by max(H, W) / 2500, so a 320 px
image gets the same look as the full-size one shrunk.

Recipes (`simulate_photo`):
- digital: CheXphoto's "random digital" (contrast then brightness, each up or down).
- photographic: CheXphoto's glare_matte -> moire -> tilt (RGB).
- phone: what the release lacks, from real phone photos of monitors: the x-ray inside a
  screen with a bezel, in a room with a desk, clutter and a monitor stand, under a full
  projective warp, uneven light, lens blur and vignetting, sensor noise, a colour cast,
  exposure changes and JPEG re-compression (RGB).

This module holds `simulate_photo` and CheXphoto's released effects; the phone-photo effects
and the `phone` recipe composed of them live in data/phone.py, the shared pixel helpers in
data/pixels.py. Every effect and `phone` are re-exported here, so `chextrain.data.photo` stays
the one import point.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

from chextrain.data.phone import (
    brightness_contrast,
    colour_cast,
    defocus_blur,
    jpeg_recompress,
    map_points,
    motion_blur,
    phone,
    phone_with_corners,
    projective_warp,
    region_corners,
    room_scene,
    screen_border,
    sensor_noise,
    uneven_lighting,
    vignette,
)
from chextrain.data.pixels import (
    LEVELS,
    REFERENCE_SIZE,
    check_image,
    check_level,
    expand_field,
    perspective_matrix,
    reference_scale,
    round_to_uint8,
    to_rgb,
    warp_to_quad,
)

__all__ = [
    "LEVELS",
    "RECIPES",
    "REFERENCE_SIZE",
    "simulate_photo",
    "simulate_photo_with_corners",
    "phone",
    "phone_with_corners",
    "contrast",
    "brightness",
    "random_digital",
    "glare_matte",
    "moire",
    "tilt",
    "screen_border",
    "room_scene",
    "projective_warp",
    "colour_cast",
    "brightness_contrast",
    "uneven_lighting",
    "vignette",
    "defocus_blur",
    "motion_blur",
    "sensor_noise",
    "jpeg_recompress",
]

RECIPES: tuple[str, ...] = ("digital", "photographic", "phone")

# level: (gap between lines in px at REFERENCE_SIZE, line opacity), CheXphoto's moire settings
MOIRE: dict[int, tuple[float, float]] = {1: (20.0, 0.05), 2: (4.5, 0.15), 3: (2.5, 0.35), 4: (1.0, 0.5)}


def simulate_photo(
    image: np.ndarray, recipe: str, level: int = 1, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Make `image` (uint8 H x W or H x W x 3) look like a photo of it, keeping H x W.

    `digital` returns the input's layout (grey stays grey); `photographic` and `phone`
    return RGB H x W x 3. The same `rng` seed gives identical bytes.
    """
    return simulate_photo_with_corners(image, recipe, level, rng)[0]


def simulate_photo_with_corners(
    image: np.ndarray,
    recipe: str,
    level: int = 1,
    rng: np.random.Generator | None = None,
    region: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`simulate_photo`, and the radiograph's four corners in the photo: (photo, 4 x 2 float32).

    `region` (x0, y0, x1, y1 in input pixels; default the whole input) is where the radiograph
    lies in `image` (e.g. an x-ray padded onto a black canvas). Corners are TL, TR, BR, BL in
    output pixels (continuous coordinates: the image spans [0, W] x [0, H]); they may lie
    outside the frame when the warp pushes them out. Same draws and bytes as `simulate_photo`.
    """
    image = check_image(image)
    level = check_level(level)
    if recipe not in RECIPES:
        raise ValueError(f"unknown photo recipe {recipe!r}; expected one of {list(RECIPES)}")
    rng = np.random.default_rng() if rng is None else rng
    h, w = image.shape[:2]
    corners = region_corners(region, w, h)
    if recipe == "digital":
        return random_digital(image, rng, level), corners.astype(np.float32)
    if recipe == "photographic":
        # Grey in, grey effects: run them on one channel and make RGB at the end (same bytes).
        tilted, quad = _tilt(moire(glare_matte(image, rng, level), rng, level), rng, level)
        frame = [(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))]
        return to_rgb(tilted), map_points(perspective_matrix(frame, quad), corners).astype(np.float32)
    return phone_with_corners(image, rng, level, region)


# --- CheXphoto's released effects ---------------------------------------------------------


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Contrast: blend with the mean grey; factor > 1 raises contrast."""
    return np.array(ImageEnhance.Contrast(Image.fromarray(check_image(image))).enhance(factor))


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Brightness: scale towards black; factor > 1 brightens."""
    return np.array(ImageEnhance.Brightness(Image.fromarray(check_image(image))).enhance(factor))


def random_digital(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """CheXphoto's random digital: contrast up or down, then brightness up or down.

    Up factor 1 + 0.2 f + U(-0.01, 0.01), down 1 / (1 + 0.4 f + U(-0.01, 0.01)), with
    f = 0.5 at level 1 and f = level above (the official code's jitter at every level).
    """
    level = check_level(level)
    f = 0.5 if level == 1 else float(level)

    def factor() -> float:
        if rng.random() < 0.5:
            return 1.0 + 0.2 * f + rng.uniform(-0.01, 0.01)
        return 1.0 / (1.0 + 0.4 * f + rng.uniform(-0.01, 0.01))

    return brightness(contrast(image, factor()), factor())


def glare_matte(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """A soft white glare: alpha is an isotropic Gaussian at a uniform random centre.

    sigma = 50 L px (reference size), peak alpha 100 L / 255 capped at (150 + 20 L) / 255.
    """
    image, level = check_image(image), check_level(level)
    h, w = image.shape[:2]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    sigma = 50.0 * level * reference_scale(image)
    dx2, dy2 = (np.arange(w, dtype=np.float32) - cx) ** 2, (np.arange(h, dtype=np.float32) - cy) ** 2
    # peak 1 at the pixel nearest the centre (normalised in the exponent: no 0 / 0 when tiny)
    g = np.outer(np.exp((dy2.min() - dy2) / (2 * sigma**2)), np.exp((dx2.min() - dx2) / (2 * sigma**2)))
    alpha = np.floor(np.minimum(100.0 * level * g, 150.0 + 20.0 * level)) / 255.0
    x = image.astype(np.float32)
    return round_to_uint8(x + (255.0 - x) * expand_field(alpha, image))


def moire(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Moire: two fanned-out masks of thin black lines (90 and 90 + N(0, 1) degrees).

    As in CheXphoto: lines 1 px thick every 1 + gap px, fanned by a perspective warp with
    spread 0.5, rotated, offset by U(0, 100) px, drawn on a 2x upsampled image that is then
    downsampled. The masks are evaluated analytically per pixel (no drawing, no loops).
    """
    image, level = check_image(image), check_level(level)
    gap, opacity = MOIRE[level]
    h, w = image.shape[:2]
    s = reference_scale(image)
    H2, W2 = 2 * h, 2 * w
    D = 2.0 * max(H2, W2)  # the mask is large enough to cover the image when rotated
    fan = perspective_matrix([(0, 0), (D, 0), (D, D), (0, D)], [(0, 0.25 * D), (D, 0), (D, D), (0, 0.75 * D)])
    xs = np.arange(W2, dtype=np.float32) + 0.5
    ys = np.arange(H2, dtype=np.float32)[:, None] + 0.5
    keep = np.ones((H2, W2), dtype=np.float32)
    for angle in (90.0, 90.0 + rng.normal(0.0, 1.0)):
        ox, oy = rng.uniform(0, 100, size=2) * s
        phi = -math.radians(angle)  # PIL's rotate(angle): output -> input about the centre
        c, si = math.cos(phi), math.sin(phi)
        # output pixel -> rotated-mask pixel (crop + offset) -> unrotated mask pixel
        tx, ty = (D - W2) / 2 + ox - D / 2, (D - H2) / 2 + oy - D / 2
        rot = np.array([[c, si, c * tx + si * ty + D / 2], [-si, c, -si * tx + c * ty + D / 2], [0, 0, 1]])
        m = (fan @ rot).astype(np.float32)
        row = (m[1, 0] * xs + (m[1, 1] * ys + m[1, 2])) / (m[2, 0] * xs + (m[2, 1] * ys + m[2, 2]))
        row *= np.float32(1.0 / ((1.0 + gap) * s))  # base-mask row, in line periods
        row -= np.floor(row)  # position within the period; the first 1 / (1 + gap) is a dark line
        keep *= np.where(row < 1.0 / (1.0 + gap), np.float32(1.0 - opacity), np.float32(1.0))
    keep = 0.25 * (keep[0::2, 0::2] + keep[1::2, 0::2] + keep[0::2, 1::2] + keep[1::2, 1::2])  # 2x down
    return round_to_uint8(image.astype(np.float32) * expand_field(keep, image))


def tilt(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """3-D tilt: the frame maps onto a quadrilateral whose corners move in by up to 5 L %.

    Bicubic, black outside the quadrilateral, as in CheXphoto.
    """
    return _tilt(image, rng, level)[0]


def _tilt(
    image: np.ndarray, rng: np.random.Generator, level: int
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """tilt, and the quadrilateral (TL, TR, BR, BL) the frame was mapped onto."""
    image, level = check_image(image), check_level(level)
    h, w = image.shape[:2]
    d = 0.05 * level
    quad = [
        (w * rng.uniform(0, d), h * rng.uniform(0, d)),
        (w * rng.uniform(1 - d, 1), h * rng.uniform(0, d)),
        (w * rng.uniform(1 - d, 1), h * rng.uniform(1 - d, 1)),
        (w * rng.uniform(0, d), h * rng.uniform(1 - d, 1)),
    ]
    return warp_to_quad(image, quad, Image.Resampling.BICUBIC), quad
