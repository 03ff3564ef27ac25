"""The effects real phone photos of a monitor show, which CheXphoto's release lacks.

Each effect is a small function `effect(image, rng, level=1, ...) -> new uint8 array` for one
physical cause: the screen and its bezel, the room around it, a hand-held projective warp,
uneven light, vignetting, lens and motion blur, sensor noise, a colour cast, exposure and JPEG
re-compression; `phone` composes them into the phone recipe that data/photo.py's
`simulate_photo` runs. Images and levels follow data/photo.py: uint8 H x W or H x W x 3, same
size out, levels 1-4, pixel parameters at REFERENCE_SIZE scaled to the image.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from chextrain.data.pixels import (
    check_image,
    check_level,
    expand_field,
    perspective_coeffs,
    perspective_matrix,
    reference_scale,
    round_to_uint8,
    to_rgb,
    warp_to_quad,
)


def phone(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """A phone photo of the x-ray on a monitor in a room (RGB): simulate_photo's `phone` recipe.

    screen_border -> room_scene -> uneven_lighting with vignette (one pass) -> defocus or
    motion blur -> sensor_noise -> colour_cast -> brightness_contrast -> jpeg_recompress.
    """
    return phone_with_corners(image, rng, level)[0]


def phone_with_corners(
    image: np.ndarray,
    rng: np.random.Generator,
    level: int = 1,
    region: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`phone`, and where the radiograph ended up: (photo RGB H x W x 3, corners 4 x 2 float32).

    `region` (x0, y0, x1, y1 in input pixels, edges not centres; default the whole input) is the
    radiograph inside `image`; the corners are its TL, TR, BR, BL in output pixels. The random
    draws and the photo are exactly `phone`'s.
    """
    image = to_rgb(check_image(image))
    h, w = image.shape[:2]
    x, (ox, oy, iw, ih) = _screen_border(image, rng, level)
    x, quad = _room_scene(x, rng, level)
    corners = face_to_photo(region_corners(region, w, h), (ox, oy, iw, ih), w, h, quad)
    h, w = x.shape[:2]
    gain, add = _lighting(h, w, rng, level)  # uneven_lighting and vignette in one pass
    x = round_to_uint8(
        x.astype(np.float32) * (gain * _vignette_gain(h, w, rng, level))[..., None] + add[..., None]
    )
    x = defocus_blur(x, rng, level) if rng.random() < 0.5 else motion_blur(x, rng, level)
    x = sensor_noise(x, rng, level)
    x = colour_cast(x, rng, level)
    x = brightness_contrast(x, rng, level)
    return jpeg_recompress(x, rng, level), corners


def region_corners(region: tuple[float, float, float, float] | None, w: int, h: int) -> np.ndarray:
    """Corners TL, TR, BR, BL (4 x 2 float64) of `region` (x0, y0, x1, y1), or of the w x h frame."""
    x0, y0, x1, y1 = (0.0, 0.0, float(w), float(h)) if region is None else (float(v) for v in region)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"region {region} must lie inside the {w} x {h} image with x0 < x1 and y0 < y1")
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def map_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points N x 2 through a 3 x 3 homography (N x 2 float64)."""
    p = np.c_[np.asarray(points, np.float64), np.ones(len(points))] @ np.asarray(matrix, np.float64).T
    return p[:, :2] / p[:, 2:3]


def face_to_photo(
    corners: np.ndarray, xray: tuple[float, float, float, float], w: int, h: int, quad: np.ndarray
) -> np.ndarray:
    """Input-image points -> photo pixels: scaled into the screen's x-ray box `xray` (x, y, width,
    height in monitor-face pixels), then through the warp of the w x h face onto `quad`. 4 x 2 float32."""
    ox, oy, iw, ih = xray
    face = corners * np.array([iw / w, ih / h]) + np.array([ox, oy])
    frame = [(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))]
    return map_points(perspective_matrix(frame, [tuple(p) for p in quad]), face).astype(np.float32)


def screen_border(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """The x-ray on a monitor: a dark bezel, a black screen, the x-ray sometimes smaller.

    With probability 0.3 (more at higher levels) the x-ray is shrunk by a margin up to
    0.15 L of the screen and placed at a random spot on the black screen.
    """
    return _screen_border(image, rng, level)[0]


def _screen_border(
    image: np.ndarray, rng: np.random.Generator, level: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """screen_border, and the x-ray's box on the screen (x, y, width, height)."""
    image, level = check_image(image), check_level(level)
    h, w = image.shape[:2]
    bezel = min(int(round(rng.uniform(0.015, 0.045) * max(h, w))), (min(h, w) - 1) // 2)
    bezel_grey, screen_grey = int(rng.uniform(15, 50)), int(rng.uniform(0, 12))
    margin = rng.uniform(0, 0.15 * level) if rng.random() < 0.3 + 0.1 * (level - 1) else 0.0
    sw, sh = max(1, w - 2 * bezel), max(1, h - 2 * bezel)
    k = (1.0 - margin) * min(sw / w, sh / h)
    iw, ih = max(1, round(w * k)), max(1, round(h * k))
    ox = bezel + int(rng.uniform(0, sw - iw + 1))
    oy = bezel + int(rng.uniform(0, sh - ih + 1))
    out = np.full(image.shape, bezel_grey, dtype=np.uint8)
    out[bezel : bezel + sh, bezel : bezel + sw] = screen_grey
    if bezel >= 2:  # a lighter rim where the bezel meets the screen, lit from above-left
        rim = min(255, bezel_grey + 25)
        out[bezel - 1, bezel - 1 : bezel + sw + 1] = rim
        out[bezel - 1 : bezel + sh + 1, bezel - 1] = rim
    xray = Image.fromarray(image).resize((iw, ih), Image.Resampling.BILINEAR)
    out[oy : oy + ih, ox : ox + iw] = np.asarray(xray)
    return out, (ox, oy, iw, ih)


def room_scene(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Place `image` (the monitor face) in a room: wall, desk, clutter, a monitor stand.

    The monitor goes through a full projective warp (scale, shear, rotation, perspective);
    its sides are 88-96 % of the frame's at level 1 and 52-84 % at level 4. Returns RGB.
    """
    return _room_scene(image, rng, level)[0]


def _room_scene(image: np.ndarray, rng: np.random.Generator, level: int) -> tuple[np.ndarray, np.ndarray]:
    """room_scene, and the quadrilateral (4 x 2, TL, TR, BR, BL) the monitor face was warped onto."""
    image, level = check_image(image), check_level(level)
    h, w = image.shape[:2]
    scene = _room_background(h, w, rng, level)
    quad = _random_quad(rng, w, h, level, rng.uniform(1 - 0.12 * level, 1 - 0.04 * level))
    draw = ImageDraw.Draw(scene)
    (x0, y0), (x1, y1) = (quad[3] + quad[2]) / 2, quad[2] - quad[3]  # bottom-edge midpoint
    neck, grey = 0.08 * math.hypot(x1, y1), tuple(int(v) for v in rng.uniform(10, 45, 3))
    base_y = y0 + rng.uniform(0.08, 0.2) * h
    neck_poly = [(x0 - neck / 2, y0), (x0 + neck / 2, y0), (x0 + neck / 3, base_y), (x0 - neck / 3, base_y)]
    draw.polygon(neck_poly, fill=grey)
    draw.ellipse([x0 - 2.5 * neck, base_y - neck / 3, x0 + 2.5 * neck, base_y + neck / 3], fill=grey)
    face = Image.fromarray(to_rgb(image)).transform(
        (w, h), Image.Transform.PERSPECTIVE, perspective_coeffs(quad, w, h), Image.Resampling.BILINEAR
    )
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in quad], fill=255)
    scene.paste(face, (0, 0), mask)
    return np.array(scene), quad


def projective_warp(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """A hand-held camera's projective warp (scale, shear, rotation, perspective), black fill."""
    image, level = check_image(image), check_level(level)
    h, w = image.shape[:2]
    quad = _random_quad(rng, w, h, level, rng.uniform(1 - 0.06 * level, 1 + 0.02 * level))
    return warp_to_quad(image, [tuple(p) for p in quad], Image.Resampling.BILINEAR)


def colour_cast(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """White-balance cast (warm/cool, green/magenta), hue rotation, saturation change. RGB."""
    image, level = check_image(image), check_level(level)
    warm, tint = rng.normal(0, 0.05 * level), rng.normal(0, 0.02 * level)
    gains = np.diag([1 + warm, 1 + tint, 1 - warm])
    a = math.radians(rng.uniform(-6, 6) * level)  # hue: rotation about the grey axis
    k = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
    hue = math.cos(a) * np.eye(3) + (1 - math.cos(a)) / 3 * np.ones((3, 3)) + math.sin(a) * k
    sat = max(0.0, 1 + rng.uniform(-0.2, 0.2) * level)
    luma = np.tile([0.299, 0.587, 0.114], (3, 1))
    m = gains @ hue @ ((1 - sat) * luma + sat * np.eye(3))
    matrix = tuple(float(v) for row in m for v in (*row, 0.0))  # PIL's 3 x 4 colour matrix
    return np.array(Image.fromarray(to_rgb(image)).convert("RGB", matrix=matrix))


def brightness_contrast(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Exposure: x * gain + offset, gain 1 +- 0.075 L, offset +- 10 L grey levels (a LUT)."""
    image, level = check_image(image), check_level(level)
    gain, offset = 1 + rng.uniform(-0.075, 0.075) * level, rng.uniform(-10, 10) * level
    lut = round_to_uint8(np.arange(256, dtype=np.float32) * gain + offset)
    return lut[image]


def uneven_lighting(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Room light: a linear gain gradient across the frame plus a broad additive reflection."""
    image, level = check_image(image), check_level(level)
    gain, add = _lighting(image.shape[0], image.shape[1], rng, level)
    return round_to_uint8(image.astype(np.float32) * expand_field(gain, image) + expand_field(add, image))


def vignette(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Lens vignetting: gain 1 - k r^2 about a jittered optical centre, k up to 0.1 L."""
    image, level = check_image(image), check_level(level)
    gain = _vignette_gain(image.shape[0], image.shape[1], rng, level)
    return round_to_uint8(image.astype(np.float32) * expand_field(gain, image))


def defocus_blur(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Out-of-focus lens: Gaussian blur, sigma U(0.5, 1) * 3 L px at the reference size."""
    image, level = check_image(image), check_level(level)
    sigma = rng.uniform(0.5, 1.0) * 3.0 * level * reference_scale(image)
    return np.array(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def motion_kernel(image: np.ndarray, rng: np.random.Generator, level: int) -> np.ndarray:
    """motion_blur's draws and its line kernel for `image`: float32 2-D, summing to 1, its taps
    below 1e-4 of the largest set to 0 (filters that skip zero taps cost ~ the line's length)."""
    length = rng.uniform(0.5, 1.0) * 6.0 * level * reference_scale(image)
    angle = rng.uniform(0, math.pi)
    t = np.linspace(-length / 2, length / 2, 2 * int(math.ceil(length)) + 3)
    px, py = t * math.cos(angle), t * math.sin(angle)
    p = int(math.ceil(length / 2)) + 1
    kernel = np.zeros((2 * p + 1, 2 * p + 1), dtype=np.float32)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - x0, py - y0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        np.add.at(kernel, (y0 + dy + p, x0 + dx + p), wgt)
    kernel[kernel < 1e-4 * kernel.max()] = 0.0
    kernel /= kernel.sum()
    return kernel


def motion_blur(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Camera shake: average along a line of U(0.5, 1) * 6 L px (reference) at a random angle.

    The line kernel is splatted bilinearly, so sub-pixel lengths still blur a little.
    """
    image, level = check_image(image), check_level(level)
    kernel = motion_kernel(image, rng, level)
    kernel = kernel[..., None] if image.ndim == 3 else kernel
    return round_to_uint8(ndimage.correlate(image, kernel, output=np.float32, mode="nearest"))


def sensor_noise(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """Sensor noise: Gaussian, sigma U(0.25, 1) * 0.025 L * 255 (up to 0.1 * 255 at level 4).

    Per-pixel luma noise; RGB images also get half-resolution chroma noise (sigma / 2), as a
    phone's demosaicing and denoising leave colour noise coarser than luma noise.
    """
    image, level = check_image(image), check_level(level)
    h, w = image.shape[:2]
    sigma = np.float32(rng.uniform(0.25, 1.0) * 0.025 * level * 255.0)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= sigma
    if image.ndim == 3:
        chroma = rng.standard_normal(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32)
        chroma *= sigma / 2
        chroma = chroma.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
        chroma += noise[..., None]
        noise = chroma
    noise += image
    return round_to_uint8(noise)


def jpeg_recompress(
    image: np.ndarray, rng: np.random.Generator, level: int = 1, quality: int | None = None
) -> np.ndarray:
    """JPEG re-compression in memory; quality 92-99 at level 1 down to 70-90 at level 4."""
    image, level = check_image(image), check_level(level)
    if quality is None:
        quality = int(rng.integers(max(70, 100 - 8 * level), 100 - 3 * (level - 1)))
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality {quality} is not in 1-100")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.array(im)


# --- helpers ------------------------------------------------------------------------------


def _random_quad(rng: np.random.Generator, w: int, h: int, level: int, scale: float) -> np.ndarray:
    """Corners (TL, TR, BR, BL) of the frame after scale, shear, rotation, perspective, shift."""
    angle = math.radians(float(np.clip(rng.normal(0, 2.0 * level), -6.0 * level, 6.0 * level)))
    shear = rng.uniform(-0.04, 0.04) * level
    c, s = math.cos(angle), math.sin(angle)
    a = np.array([[c, -s], [s, c]]) @ np.array([[1, shear], [0, 1]])
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=float) * (scale / 2)
    jitter = rng.uniform(-1, 1, size=(4, 2)) * 0.03 * level * np.array([w, h])
    shift = rng.uniform(-1, 1, size=2) * abs(1 - scale) / 2 * np.array([w, h])
    return corners @ a.T + jitter + np.array([w / 2, h / 2]) + shift


def _lighting(h: int, w: int, rng: np.random.Generator, level: int) -> tuple[np.ndarray, np.ndarray]:
    """H x W gain (a linear gradient, up to 0.15 L end to end) and additive glow (up to 0.05 L)."""
    slope, xn, yn, amp, gx, gy = lighting_factors(h, w, rng, level)
    return 1.0 + slope * (xn[None, :] + yn[:, None]), amp * np.outer(gy, gx)


def lighting_factors(
    h: int, w: int, rng: np.random.Generator, level: int
) -> tuple[float, np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """_lighting's draws as separable factors: gain 1 + slope (xn + yn), glow amp * gy gx^T."""
    slope, direction = rng.uniform(0, 0.15) * level, rng.uniform(0, 2 * math.pi)
    glow, cx, cy = rng.uniform(0, 0.05) * level, rng.uniform(0, w), rng.uniform(0, h)
    sigma = rng.uniform(0.2, 0.5) * max(h, w)
    xn = (np.arange(w, dtype=np.float32) / w - 0.5) * math.cos(direction)
    yn = (np.arange(h, dtype=np.float32) / h - 0.5) * math.sin(direction)
    gx = np.exp(-0.5 * ((np.arange(w, dtype=np.float32) - cx) / sigma) ** 2)
    gy = np.exp(-0.5 * ((np.arange(h, dtype=np.float32) - cy) / sigma) ** 2)
    return slope, xn, yn, 255.0 * glow, gx, gy


def _vignette_gain(h: int, w: int, rng: np.random.Generator, level: int) -> np.ndarray:
    """H x W gain 1 - k r^2 (r = 1 at the mid-edges), k U(0.5, 1) * 0.1 L, centre jittered."""
    k, rx, ry = vignette_factors(h, w, rng, level)
    return np.maximum(1.0 - k * (rx[None, :] + ry[:, None]), 0.0).astype(np.float32)


def vignette_factors(
    h: int, w: int, rng: np.random.Generator, level: int
) -> tuple[float, np.ndarray, np.ndarray]:
    """_vignette_gain's draws as separable factors: gain max(1 - k (rx + ry), 0)."""
    k = rng.uniform(0.5, 1.0) * 0.1 * level
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    rx = ((np.arange(w, dtype=np.float32) + 0.5 - cx) / (w / 2)) ** 2
    ry = ((np.arange(h, dtype=np.float32) + 0.5 - cy) / (h / 2)) ** 2
    return k, rx, ry


def _room_background(h: int, w: int, rng: np.random.Generator, level: int) -> Image.Image:
    """A dim wall with a vertical light gradient, a desk, and 2 + L to 4 + 2 L clutter objects."""
    wall = rng.uniform(40, 150) * (1 + rng.uniform(-0.25, 0.25, 3))  # muted colour
    ramp = 1 + rng.uniform(-0.3, 0.3) * (np.linspace(-0.5, 0.5, h)[:, None])
    rows = np.clip(ramp * wall, 0, 255).astype(np.uint8)  # h x 3
    scene = Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (h, w, 3))))
    draw = ImageDraw.Draw(scene)
    desk_y = rng.uniform(0.55, 0.9) * h
    desk = tuple(int(v) for v in rng.uniform(30, 140) * (1 + rng.uniform(-0.3, 0.3, 3)))
    draw.rectangle([0, desk_y, w, h], fill=desk)
    for _ in range(int(rng.integers(2 + level, 5 + 2 * level))):
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        cw, ch = rng.uniform(0.05, 0.3) * w, rng.uniform(0.03, 0.2) * h
        x = rng.uniform(-0.1, 1.0) * w
        y = desk_y - ch * rng.uniform(0, 1) if rng.random() < 0.7 else rng.uniform(0, desk_y)
        if rng.random() < 0.6:
            draw.rectangle([x, y, x + cw, y + ch], fill=colour)
        else:
            draw.ellipse([x, y, x + cw, y + ch], fill=colour)
    return scene
