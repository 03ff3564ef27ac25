"""The phone recipe on one channel, fast enough to augment at the training size (320 px).

`phone_grey(image, rng, level)` makes what `to_grey(phone(image, rng, level))` makes (data/phone.py:
the x-ray on a monitor with a bezel, in a room with a desk, clutter and a stand, under a projective
warp, uneven light and vignetting, lens or motion blur, sensor noise, a colour cast, exposure and
JPEG re-compression), computed on the luma alone and with fewer passes:

- the screen, its bezel and the x-ray inside it are sampled in ONE warp from the x-ray (the RGB
  recipe resizes the x-ray into the screen, then warps the whole monitor face);
- colours (wall, desk, clutter, stand) are drawn as their luma, and the colour cast becomes the
  gain it gives a grey pixel;
- the warp, the blurs and the JPEG round trip run in OpenCV (warpPerspective onto the drawn room,
  its separable and 2-D filters; libjpeg gives the same bytes as Pillow's encoder);
- lighting and vignette are applied from their separable factors in a few passes;
- luma noise only (chroma noise averages out in the luma), cut from a bank of N(0, 1) pixels made
  once per process: a window, flips and a transposition picked by the draw that seeds the RGB
  recipe's noise (drawing 100k normals afresh cost more than the rest of the noise). Within a
  photo the pixels are independent; across photos the windows overlap, which a network cannot
  use (the noise says nothing about the labels).

The random draws are those of `phone` up to the sensor noise, so a seed gives the same screen,
room and warp in both recipes; later draws differ (the RGB recipe also draws chroma noise).
PhotoSim (training augmentation) uses this recipe; `simulate_photo(..., "phone")` and the demo's
photos keep the RGB one. Takes uint8 H x W (RGB is made grey first), returns uint8 H x W.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw

from chextrain.data.phone import (
    _random_quad,
    face_to_photo,
    lighting_factors,
    motion_kernel,
    region_corners,
    vignette_factors,
)
from chextrain.data.photo import simulate_photo_with_corners
from chextrain.data.pixels import check_image, check_level, reference_scale

LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L"


def luma(colour: np.ndarray | tuple[float, ...]) -> int:
    """The grey level PIL's "L" conversion gives an (r, g, b) colour of ints."""
    r, g, b = (int(v) for v in colour)
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def simulate_photo_grey(image: np.ndarray, recipe: str, level: int, rng: np.random.Generator) -> np.ndarray:
    """A simulated photo of `image`, grey uint8 H x W: `phone_grey` for the phone recipe, else
    data/photo.py's `simulate_photo` made grey (its digital and photographic recipes are grey inside)."""
    if recipe == "phone":
        return phone_grey(image, rng, level)  # no corners to compute
    return simulate_photo_grey_with_corners(image, recipe, level, rng)[0]


def simulate_photo_grey_with_corners(
    image: np.ndarray,
    recipe: str,
    level: int,
    rng: np.random.Generator,
    region: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`simulate_photo_grey`, and the radiograph's corners (TL, TR, BR, BL, 4 x 2 float32 output
    pixels) of `region` (x0, y0, x1, y1 input pixels; default the whole input), as in
    photo.simulate_photo_with_corners."""
    if recipe == "phone":
        return phone_grey_with_corners(image, rng, level, region)
    out, corners = simulate_photo_with_corners(image, recipe, level=level, rng=rng, region=region)
    return (out if out.ndim == 2 else np.asarray(Image.fromarray(out).convert("L"))), corners


def phone_grey(image: np.ndarray, rng: np.random.Generator, level: int = 1) -> np.ndarray:
    """A phone photo of the x-ray on a monitor in a room, grey: uint8 H x W (see the module docstring)."""
    return _phone_grey(image, rng, level, None, with_corners=False)[0]


def phone_grey_with_corners(
    image: np.ndarray,
    rng: np.random.Generator,
    level: int = 1,
    region: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`phone_grey`, and the corners of `region` (default the whole input) in the photo, as
    phone.phone_with_corners: (uint8 H x W, TL, TR, BR, BL 4 x 2 float32 output pixels)."""
    out, corners = _phone_grey(image, rng, level, region, with_corners=True)
    assert corners is not None
    return out, corners


def _phone_grey(
    image: np.ndarray,
    rng: np.random.Generator,
    level: int,
    region: tuple[float, float, float, float] | None,
    with_corners: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    image, level = check_image(image), check_level(level)
    if image.ndim == 3:
        image = np.asarray(Image.fromarray(image).convert("L"))
    h, w = image.shape
    face = _screen(h, w, rng, level)
    x, quad = _room(image, face, rng, level)  # float32 H x W
    corners = face_to_photo(region_corners(region, w, h), face.xray, w, h, quad) if with_corners else None
    _light(x, rng, level)
    x = _defocus(x, rng, level) if rng.random() < 0.5 else _motion(x, rng, level)
    noise, sigma = _noise_window(x.shape, rng, level)
    cast = _cast_gain(rng, level)
    gain_bc, offset = 1 + rng.uniform(-0.075, 0.075) * level, rng.uniform(-10, 10) * level
    quality = int(rng.integers(max(70, 100 - 8 * level), 100 - 3 * (level - 1)))
    # sensor noise, colour cast, exposure and the rounding to uint8 (saturated) in one pass:
    # (x + sigma n) g + offset, g = cast x exposure gain
    g = cast * gain_bc
    out = cv2.addWeighted(x, g, noise, sigma * g, offset, dtype=cv2.CV_8U)
    return _jpeg(out, quality), corners


# --- the monitor in the room --------------------------------------------------------------


class _Screen:
    """The monitor face in frame pixels: bezel and screen greys, the screen and x-ray rectangles."""

    def __init__(
        self, bezel: int, bezel_grey: int, screen_grey: int, screen: tuple[int, ...], xray: tuple[int, ...]
    ):
        self.bezel, self.bezel_grey, self.screen_grey = bezel, bezel_grey, screen_grey
        self.screen, self.xray = screen, xray  # (x0, y0, width, height)


def _screen(h: int, w: int, rng: np.random.Generator, level: int) -> _Screen:
    """phone.screen_border's draws and geometry, without drawing."""
    bezel = min(int(round(rng.uniform(0.015, 0.045) * max(h, w))), (min(h, w) - 1) // 2)
    bezel_grey, screen_grey = int(rng.uniform(15, 50)), int(rng.uniform(0, 12))
    margin = rng.uniform(0, 0.15 * level) if rng.random() < 0.3 + 0.1 * (level - 1) else 0.0
    sw, sh = max(1, w - 2 * bezel), max(1, h - 2 * bezel)
    k = (1.0 - margin) * min(sw / w, sh / h)
    iw, ih = max(1, round(w * k)), max(1, round(h * k))
    ox = bezel + int(rng.uniform(0, sw - iw + 1))
    oy = bezel + int(rng.uniform(0, sh - ih + 1))
    return _Screen(bezel, bezel_grey, screen_grey, (bezel, bezel, sw, sh), (ox, oy, iw, ih))


def _room(
    image: np.ndarray, face: _Screen, rng: np.random.Generator, level: int
) -> tuple[np.ndarray, np.ndarray]:
    """phone.room_scene in luma: the room drawn, the monitor face sampled in one warp. float32 H x W,
    and the quadrilateral (4 x 2, TL, TR, BR, BL) the face went onto."""
    h, w = image.shape
    scene = _background(h, w, rng, level)
    quad = _random_quad(rng, w, h, level, rng.uniform(1 - 0.12 * level, 1 - 0.04 * level))
    draw = ImageDraw.Draw(scene)
    (x0, y0), (x1, y1) = (quad[3] + quad[2]) / 2, quad[2] - quad[3]  # bottom-edge midpoint
    neck, grey = 0.08 * math.hypot(x1, y1), luma(rng.uniform(10, 45, 3))
    base_y = y0 + rng.uniform(0.08, 0.2) * h
    draw.polygon(
        [(x0 - neck / 2, y0), (x0 + neck / 2, y0), (x0 + neck / 3, base_y), (x0 - neck / 3, base_y)],
        fill=grey,
    )
    draw.ellipse([x0 - 2.5 * neck, base_y - neck / 3, x0 + 2.5 * neck, base_y + neck / 3], fill=grey)
    canvas, (gx0, gy0, step_x, step_y) = _face_canvas(image, face, h, w)
    # output pixel -> monitor-face coordinates (frame -> quad inverted) -> canvas pixel, in OpenCV's
    # convention (pixel centres at whole numbers), sampled bilinearly over the drawn room; output
    # pixels whose source falls outside the canvas keep the room.
    m = _homography(quad, [(0, 0), (w, 0), (w, h), (0, h)])
    to_canvas = np.array([[1 / step_x, 0, -gx0 / step_x], [0, 1 / step_y, -gy0 / step_y], [0, 0, 1]]) @ m
    centre = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    to_canvas = np.linalg.inv(centre) @ to_canvas @ centre
    out = np.array(scene, dtype=np.float32)  # writable: the warp draws over it
    cv2.warpPerspective(
        canvas,
        to_canvas,
        (w, h),
        dst=out,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_TRANSPARENT,
    )
    return out, quad


def _homography(src: np.ndarray, dst: list[tuple[float, float]]) -> np.ndarray:
    """3 x 3 homography taking the 4 points `src` to `dst` (pixels.perspective_matrix, solved exactly)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b += [u, v]
    return np.append(np.linalg.solve(np.asarray(a, float), np.asarray(b, float)), 1.0).reshape(3, 3)


def _face_canvas(
    image: np.ndarray, face: _Screen, h: int, w: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The monitor face drawn at the x-ray's own pixel pitch: float32 canvas and its placement.

    The x-ray's pixels are copied as they are (no resize); bezel, rim and screen are drawn around
    them on the same lattice. Returns (canvas, (x, y of its top-left corner in face coordinates,
    pixel width, pixel height)).
    """
    ih_px, iw_px = image.shape
    ox, oy, iw, ih = face.xray
    step_x, step_y = iw / iw_px, ih / ih_px  # face pixels per x-ray pixel (<= 1)
    left, top = math.ceil(ox / step_x), math.ceil(oy / step_y)
    right, bottom = math.ceil((w - ox - iw) / step_x), math.ceil((h - oy - ih) / step_y)
    gx0, gy0 = ox - left * step_x, oy - top * step_y
    canvas = np.full((top + ih_px + bottom, left + iw_px + right), face.bezel_grey, dtype=np.float32)

    def cols(a: float, b: float) -> slice:
        return slice(max(0, round((a - gx0) / step_x)), max(0, round((b - gx0) / step_x)))

    def rows(a: float, b: float) -> slice:
        return slice(max(0, round((a - gy0) / step_y)), max(0, round((b - gy0) / step_y)))

    sx, sy, sw, sh = face.screen
    if face.bezel >= 2:  # the lighter rim where the bezel meets the screen, lit from above-left
        rim = min(255, face.bezel_grey + 25)
        canvas[rows(sy - 1, sy), cols(sx - 1, sx + sw + 1)] = rim
        canvas[rows(sy - 1, sy + sh + 1), cols(sx - 1, sx)] = rim
    canvas[rows(sy, sy + sh), cols(sx, sx + sw)] = face.screen_grey
    canvas[top : top + ih_px, left : left + iw_px] = image
    return canvas, (gx0, gy0, step_x, step_y)


def _background(h: int, w: int, rng: np.random.Generator, level: int) -> Image.Image:
    """phone._room_background in luma: wall gradient, desk and clutter ("L" image)."""
    wall = rng.uniform(40, 150) * (1 + rng.uniform(-0.25, 0.25, 3))
    ramp = 1 + rng.uniform(-0.3, 0.3) * (np.linspace(-0.5, 0.5, h)[:, None])
    rows = np.clip(ramp * wall, 0, 255).astype(np.uint32)  # h x 3
    col = ((rows @ np.array([19595, 38470, 7471], np.uint32) + 0x8000) >> 16).astype(np.uint8)  # h
    scene = Image.fromarray(np.ascontiguousarray(np.broadcast_to(col[:, None], (h, w))))
    draw = ImageDraw.Draw(scene)
    desk_y = rng.uniform(0.55, 0.9) * h
    draw.rectangle([0, desk_y, w, h], fill=luma(rng.uniform(30, 140) * (1 + rng.uniform(-0.3, 0.3, 3))))
    for _ in range(int(rng.integers(2 + level, 5 + 2 * level))):
        colour = luma(rng.uniform(0, 255, 3))
        cw, ch = rng.uniform(0.05, 0.3) * w, rng.uniform(0.03, 0.2) * h
        x = rng.uniform(-0.1, 1.0) * w
        y = desk_y - ch * rng.uniform(0, 1) if rng.random() < 0.7 else rng.uniform(0, desk_y)
        if rng.random() < 0.6:
            draw.rectangle([x, y, x + cw, y + ch], fill=colour)
        else:
            draw.ellipse([x, y, x + cw, y + ch], fill=colour)
    return scene


# --- camera effects -----------------------------------------------------------------------


def _light(x: np.ndarray, rng: np.random.Generator, level: int) -> None:
    """phone's uneven lighting and vignette (their draws, in order) on float32 H x W in place, built
    from their separable factors: gain (1 + slope (yn + xn)) max(1 - k (ry + rx), 0), then the glow
    amp gy gx^T added. While the vignette stays positive (always, up to level 3), the gain is a
    sum of 4 outer products, made by one matrix product."""
    h, w = x.shape
    slope, xn, yn, amp, gx, gy = lighting_factors(h, w, rng, level)
    k, rx, ry = vignette_factors(h, w, rng, level)
    f32 = np.float32
    a, b = (1.0 + slope * yn).astype(f32), (slope * xn).astype(f32)  # rows, columns of the lighting
    c, d = (1.0 - k * ry).astype(f32), (-k * rx).astype(f32)  # of the vignette
    if float(c.min()) + float(d.min()) >= 0.0:  # (a_i + b_j)(c_i + d_j), one product
        gain = np.stack([a * c, a, c, np.ones_like(a)], axis=1) @ np.stack([np.ones_like(b), d, b, b * d])
    else:
        gain = np.add.outer(a, b)
        gain *= np.maximum(np.add.outer(c, d), f32(0.0))
    x *= gain
    x += np.outer((amp * gy).astype(f32), gx)
    np.clip(x, f32(0.0), f32(255.0), out=x)


def _taps(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate float32 H x W with a small 2-D kernel (odd sides), edges repeated."""
    return cv2.filter2D(x, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REPLICATE)


def _defocus(x: np.ndarray, rng: np.random.Generator, level: int) -> np.ndarray:
    """phone.defocus_blur's draw: a Gaussian of sigma U(0.5, 1) * 3 L px at the reference size."""
    sigma = rng.uniform(0.5, 1.0) * 3.0 * level * reference_scale(x)
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g = g[g >= 1e-3 * g.max()]  # taps that cannot move a grey level are left out
    if len(g) == 1:
        return x
    g = (g / g.sum()).astype(np.float32)
    return cv2.sepFilter2D(x, -1, g, g, borderType=cv2.BORDER_REPLICATE)


def _motion(x: np.ndarray, rng: np.random.Generator, level: int) -> np.ndarray:
    """phone.motion_blur's draws and line kernel (bilinearly splatted), applied by OpenCV."""
    return _taps(x, motion_kernel(x, rng, level))


NOISE_BANK = 1024  # side of the bank of N(0, 1) pixels that sensor noise is cut from


@functools.cache
def _noise_bank() -> np.ndarray:
    """NOISE_BANK x NOISE_BANK float32 N(0, 1) pixels, the same in every process (seed 0), made once."""
    return torch.randn((NOISE_BANK, NOISE_BANK), generator=torch.Generator().manual_seed(0)).numpy()


def _noise_window(shape: tuple[int, ...], rng: np.random.Generator, level: int) -> tuple[np.ndarray, float]:
    """phone.sensor_noise's sigma draw, and N(0, 1) luma noise of `shape` cut from the bank.

    The draw that seeds the RGB recipe's noise picks a window of the bank, a flip of each axis and,
    for a square image, a transposition: independent N(0, 1) pixels within a photo at the cost of a
    copy (drawing them afresh costs more than the rest of the noise). An image larger than the bank
    draws its own from a generator seeded by the same draw. Returns (float32 H x W, sigma); a
    window that is neither flipped nor transposed is a view of the bank (rows a bank row apart).
    """
    sigma = float(rng.uniform(0.25, 1.0) * 0.025 * level * 255.0)
    seed = int(rng.integers(2**62))
    h, w = shape
    if h > NOISE_BANK or w > NOISE_BANK:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((h, w), generator=g, dtype=torch.float32).numpy(), sigma
    rows, cols = NOISE_BANK - h + 1, NOISE_BANK - w + 1
    top, left, turn = seed % rows, (seed // rows) % cols, (seed >> 48) & 7
    if turn & 4 and h == w:  # OpenCV's blocked transpose and flip: the view's rows are contiguous
        window = cv2.transpose(_noise_bank()[left : left + w, top : top + h])
    else:
        window = _noise_bank()[top : top + h, left : left + w]
    flip = {1: 0, 2: 1, 3: -1}.get(turn & 3)  # rows, columns, both
    return (window if flip is None else cv2.flip(window, flip)), sigma


def _cast_gain(rng: np.random.Generator, level: int) -> float:
    """phone.colour_cast's draws, as the gain its colour matrix gives the luma of a grey pixel.

    The matrix is gains @ hue @ saturation. On a grey pixel (r = g = b) the saturation step and
    the hue rotation (about the grey axis) change nothing, so only the warm and tint gains remain:
    luma(1 + warm, 1 + tint, 1 - warm). Their draws are still made, in the RGB recipe's order."""
    warm, tint = rng.normal(0, 0.05 * level), rng.normal(0, 0.02 * level)
    rng.uniform(-6, 6)  # hue angle
    rng.uniform(-0.2, 0.2)  # saturation
    r, g, b = LUMA
    return r * (1 + warm) + g * (1 + tint) + b * (1 - warm)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG re-compression of a grey image in memory (libjpeg through OpenCV, as Pillow's encoder)."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 grey image
        raise RuntimeError("JPEG re-compression failed")
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
