"""The patient frame and shape primitives of the phantom renderer (data/phantom.py).

`draw_patient` draws the patient-to-patient variation shared by both views (size, position,
rotation, noise fields and the per-sign uniforms) in a fixed order; `Canvas` maps every pixel
into the patient frame (u across the chest, v down); the soft-mask primitives (`ramp`,
`ellipse`, `segment_distance`, `bands`) draw anti-aliased shapes in that frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from chextrain.labels import SLUGS

EXTRA_SLUGS: tuple[str, ...] = ("support_devices",)  # drawn when 1.0: a central line and ECG leads
F32 = np.float32


def lerp(lo: float, hi: float, t: float) -> float:
    """The value a fraction `t` of the way from `lo` to `hi` (turns a uniform into a range)."""
    return lo + (hi - lo) * float(t)


def ramp(x: np.ndarray, w: float) -> np.ndarray:
    """Linear soft edge from 0 (x <= -w) to 1 (x >= w): anti-aliased shape boundaries."""
    y = x * (0.5 / w)
    y += 0.5
    return np.clip(y, 0.0, 1.0, out=y)


def ellipse(
    u: np.ndarray, v: np.ndarray, c: tuple[float, float], a: tuple[float, float], w: float, tilt: float = 0.0
) -> np.ndarray:
    """Soft mask of an ellipse centred at c with half-axes a, its first axis turned by tilt rad."""
    du, dv = u - c[0], v - c[1]
    if tilt:
        co, si = math.cos(tilt), math.sin(tilt)
        du, dv = du * co + dv * si, dv * co - du * si
    r = np.sqrt((du / a[0]) ** 2 + (dv / a[1]) ** 2)
    return ramp((1.0 - r) * min(a), w)


def segment_distance(
    u: np.ndarray, v: np.ndarray, p: tuple[float, float], q: tuple[float, float]
) -> np.ndarray:
    """Distance from every pixel to the segment p-q."""
    du, dv = q[0] - p[0], q[1] - p[1]
    t = np.clip(((u - p[0]) * du + (v - p[1]) * dv) * (1.0 / (du * du + dv * dv + 1e-9)), 0.0, 1.0)
    return np.sqrt((u - p[0] - t * du) ** 2 + (v - p[1] - t * dv) ** 2)


def bands(x: np.ndarray, period: float, half: float, w: float) -> np.ndarray:
    """Soft periodic bands of half-width `half` every `period` along x (ribs, vertebrae, lines)."""
    y = x * (1.0 / period)
    return ramp(half - np.abs(y - np.floor(y) - 0.5) * period, w)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth unit-variance noise with a correlation length of about `cell` pixels."""
    h, w = max(2, math.ceil(shape[0] / cell) + 1), max(2, math.ceil(shape[1] / cell) + 1)
    g = rng.standard_normal((h, w), dtype=F32)
    z = np.asarray(Image.fromarray(g).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return (z - z.mean()) * (1.0 / (z.std() + 1e-6))


@dataclass
class Patient:
    """Patient-to-patient variation shared by both views, drawn before any sign."""

    s: float  # half thorax width in pixels
    cx: float
    cy: float
    rot: float
    hv: float  # vertical stretch (long or short chests)
    r: np.ndarray  # uniforms for anatomy details
    noise: tuple[np.ndarray, np.ndarray, np.ndarray]  # coarse, medium, fine: H x W each
    signs: dict[str, np.ndarray]  # uniforms per pathology, drawn whatever the label


def draw_patient(rng: np.random.Generator, shape: tuple[int, int]) -> Patient:
    """Draw one patient for an H x W image; the same number of draws in the same order every time."""
    H, W = shape
    r = rng.random(40)
    s = min(W, H / 1.15) * lerp(0.36, 0.43, r[0])
    hv = lerp(0.9, 1.1, r[1])
    cx = W * (0.5 + lerp(-0.04, 0.04, r[2]))
    cy = H * lerp(0.42, 0.48, r[3]) + 0.15 * s * hv
    rot = math.radians(float(np.clip(rng.normal(0.0, 3.0), -7.0, 7.0)))
    noise = (_noise(rng, shape, 0.35 * s), _noise(rng, shape, 0.12 * s), _noise(rng, shape, 0.035 * s))
    signs = {k: rng.random(12) for k in (*SLUGS, *EXTRA_SLUGS)}
    return Patient(s, cx, cy, rot, hv, r[4:], noise, signs)


class Canvas:
    """The patient frame of every pixel, and pixel boxes around regions of it (for speed)."""

    def __init__(self, p: Patient, shape: tuple[int, int]) -> None:
        self.p, self.shape = p, shape
        self.co, self.si = math.cos(p.rot), math.sin(p.rot)
        xs = np.arange(shape[1], dtype=F32)[None, :] + (0.5 - p.cx)
        ys = np.arange(shape[0], dtype=F32)[:, None] + (0.5 - p.cy)
        self.u = (xs * self.co + ys * self.si) * (1.0 / p.s)  # H x W
        self.v = (ys * self.co - xs * self.si) * (1.0 / (p.s * p.hv))  # H x W
        self.e = 0.8 / p.s  # edge softness: 0.8 px in frame units

    def box(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        """Pixel slices covering the frame rectangle [u0, u1] x [v0, v1] (possibly empty)."""
        p, xs, ys = self.p, [], []
        for uu in (u0, u1):
            for vv in (v0, v1):
                U, V = uu * p.s, vv * p.s * p.hv
                xs.append(p.cx + U * self.co - V * self.si)
                ys.append(p.cy + U * self.si + V * self.co)
        H, W = self.shape
        x0, x1 = max(0, int(min(xs)) - 2), min(W, int(max(xs)) + 3)
        y0, y1 = max(0, int(min(ys)) - 2), min(H, int(max(ys)) + 3)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def uv(self, b: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """The frame coordinates (u, v) of the pixels in box `b`."""
        return self.u[b], self.v[b]
