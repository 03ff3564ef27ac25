"""Synthetic chest radiographs whose pathology signs follow the labels.

`render_xray` draws a frontal (PA/AP) or lateral radiograph from analytic shapes laid out in
a patient frame: `u` runs across the chest (the inner rib cage spans u in [-1, 1]; the
patient's right is image left), `v` runs down (lung apex near -1.15, diaphragm near +0.8).
Every shape is a smooth mask of that frame, so the renderer is vectorised numpy, works at
any size and anti-aliases for free. Densities add up (bone and fluid bright, air dark) and
an exposure curve maps them to 8-bit greys.

Every random number is drawn in a fixed order that never depends on the labels, so two
renders from equal seeds with different labels show the same patient: the difference is
the pathology signs alone. The tests rely on that, and so can anyone measuring a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from chextrain.labels import SLUGS

VIEWS: dict[str, str] = {"pa": "PA", "ap": "AP", "frontal": "PA", "lateral": "lateral", "ll": "lateral",
                         "rl": "lateral"}
EXTRA_SLUGS: tuple[str, ...] = ("support_devices",)  # drawn when 1.0: a central line and ECG leads
CTR_RANGES: dict[str, tuple[float, float]] = {"absent": (0.38, 0.48), "uncertain": (0.495, 0.53),
                                              "positive": (0.56, 0.66)}
F32 = np.float32


class PhantomError(ValueError):
    """Bad arguments to the phantom renderer (labels, view or size)."""


@dataclass(frozen=True)
class PhantomInfo:
    """Measurements of one rendered image.

    ctr: heart width / thorax width measured on the masks along the patient's horizontal axis
    (lateral: heart depth / chest depth). strength: 0 for an absent sign, about 0.3-0.45 for
    uncertain and 1 for positive. masks: boolean H x W maps 'body', 'thorax', 'lungs', 'heart',
    'costophrenic' and one per pathology slug (where its sign was drawn; empty when absent).
    """

    view: str
    shape: tuple[int, int]
    ctr: float
    heart_width: float
    thorax_width: float
    strength: dict[str, float]
    masks: dict[str, np.ndarray] = field(repr=False)
    params: dict[str, float] = field(default_factory=dict)

    @property
    def drawn(self) -> dict[str, bool]:
        """Which pathology signs are present in the image (faint ones included)."""
        return {s: self.strength[s] > 0 for s in SLUGS}


def _state(slug: str, value: object) -> str:
    if value is None:
        return "absent"
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PhantomError(f"label {slug!r} is {value!r}; expected 1.0, 0.0, -1.0 or NaN") from None
    if math.isnan(x) or x == 0.0:
        return "absent"
    if x == 1.0:
        return "positive"
    if x == -1.0:
        return "uncertain"
    raise PhantomError(f"label {slug!r} is {value!r}; expected 1.0, 0.0, -1.0 or NaN")


def _states(labels: Mapping[str, object]) -> dict[str, str]:
    unknown = sorted(set(labels) - set(SLUGS) - set(EXTRA_SLUGS))
    if unknown:
        raise PhantomError(f"unknown label keys {unknown}; expected slugs from {list(SLUGS + EXTRA_SLUGS)}")
    return {s: _state(s, labels.get(s)) for s in SLUGS + EXTRA_SLUGS}


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * float(t)


def _ramp(x: np.ndarray, w: float) -> np.ndarray:
    """Smoothstep from 0 (x <= -w) to 1 (x >= w): a soft, anti-aliased edge."""
    t = np.clip(0.5 + x * (0.5 / w), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, w: float) -> np.ndarray:
    r = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    return _ramp((1.0 - r) * min(au, av), w)


def _segment(u: np.ndarray, v: np.ndarray, p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
    """Distance from every pixel to the segment p-q."""
    du, dv = q[0] - p[0], q[1] - p[1]
    t = np.clip(((u - p[0]) * du + (v - p[1]) * dv) / (du * du + dv * dv + 1e-9), 0.0, 1.0)
    return np.hypot(u - p[0] - t * du, v - p[1] - t * dv)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth unit-variance noise with a correlation length of about `cell` pixels."""
    h, w = max(2, math.ceil(shape[0] / cell) + 1), max(2, math.ceil(shape[1] / cell) + 1)
    g = rng.standard_normal((h, w), dtype=F32)
    z = np.asarray(Image.fromarray(g).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return (z - z.mean()) / (z.std() + 1e-6)


def _frame(shape: tuple[int, int], cx: float, cy: float, s: float, rot: float, hv: float):
    """Patient coordinates (u, v) of every pixel: centre (cx, cy), half thorax width s px."""
    xs = np.arange(shape[1], dtype=F32)[None, :] + 0.5 - cx
    ys = np.arange(shape[0], dtype=F32)[:, None] + 0.5 - cy
    c, sn = math.cos(rot), math.sin(rot)
    return (xs * c + ys * sn) / s, (ys * c - xs * sn) / (s * hv)


@dataclass
class _Patient:
    """Patient-to-patient variation shared by both views, drawn before any sign."""

    s: float
    cx: float
    cy: float
    rot: float
    hv: float
    r: np.ndarray  # spare uniforms for anatomy details
    noise: tuple[np.ndarray, np.ndarray, np.ndarray]  # coarse, medium, fine: H x W each
    signs: dict[str, np.ndarray]  # uniforms per pathology, drawn whatever the label


def _draw_patient(rng: np.random.Generator, shape: tuple[int, int]) -> _Patient:
    H, W = shape
    r = rng.random(40)
    s = min(W, H / 1.15) * _lerp(0.36, 0.43, r[0])
    hv = _lerp(0.9, 1.1, r[1])
    cx = W * (0.5 + _lerp(-0.04, 0.04, r[2]))
    cy = H * _lerp(0.42, 0.48, r[3]) + 0.15 * s * hv
    rot = math.radians(float(np.clip(rng.normal(0.0, 3.0), -7.0, 7.0)))
    noise = (_noise(rng, shape, 0.35 * s), _noise(rng, shape, 0.12 * s), _noise(rng, shape, 0.035 * s))
    signs = {k: rng.random(12) for k in (*SLUGS, *EXTRA_SLUGS)}
    return _Patient(s, cx, cy, rot, hv, r[4:], noise, signs)


def _strength(state: str, t: float) -> float:
    return {"absent": 0.0, "uncertain": _lerp(0.3, 0.45, t), "positive": 1.0}[state]


def _bronchograms(u: np.ndarray, v: np.ndarray, hu: float, hv_: float, phase: float) -> np.ndarray:
    """A fan of thin air-filled tubes radiating from a hilum (dark lines inside an opacity)."""
    r = np.hypot(u - hu, v - hv_) + 1e-3
    theta = np.arctan2(v - hv_, u - hu)
    step = 0.22  # radians between branches
    d = r * np.abs(((theta / step + phase) % 1.0) - 0.5) * step
    return _ramp(0.022 * np.clip(1.3 - r, 0.2, 1.0) - d, 0.008)


def _frontal(st: dict[str, str], p: _Patient, shape: tuple[int, int], ap: bool):
    u, v = _frame(shape, p.cx, p.cy, p.s, p.rot, p.hv)
    e = 0.8 / p.s  # edge softness: 0.8 px in frame units
    r, g = p.r, p.signs
    n_coarse, n_med, n_fine = p.noise
    k = {s: _strength(st[s], g[s][0]) for s in (*SLUGS, *EXTRA_SLUGS)}

    # -- geometry (volume loss and heart size depend on the labels, their uniforms do not) --
    atel_side = -1.0 if g["atelectasis"][1] < 0.6 else 1.0
    raise_ = {"absent": 0.0, "uncertain": 0.04, "positive": _lerp(0.12, 0.18, g["atelectasis"][2])}
    cp = {-1.0: _lerp(0.76, 0.86, r[0]), 1.0: 0.0}
    cp[1.0] = cp[-1.0] + _lerp(0.02, 0.08, r[1])
    if ap:
        cp = {sd: c - 0.07 for sd, c in cp.items()}
    cp[atel_side] -= raise_[st["atelectasis"]]
    hd = _lerp(0.22, 0.32, r[2])
    mid = _lerp(-0.03, 0.05, r[3]) + 0.05 * atel_side * (st["atelectasis"] == "positive")
    side = np.where(u < mid, F32(-1.0), F32(1.0))
    au = np.abs(u - mid)
    cp_map = np.where(side < 0, F32(cp[-1.0]), F32(cp[1.0]))
    dome = cp_map - hd * np.clip(1.0 - ((au - 0.45) / 0.6) ** 2, 0.0, 1.0)  # hemidiaphragm top, per u
    above = _ramp(dome - v, e)
    prof = np.sqrt(np.clip(1.0 - ((np.minimum(v, 0.75) - 0.75) / 1.9) ** 2, 0.0, 1.0)) ** 0.8
    thorax = _ramp(prof - np.abs(u), e) * _ramp(v + 1.15, e) * _ramp(cp_map - v, e)
    lo, hi = CTR_RANGES[st["cardiomegaly"]]
    ctr = _lerp(lo, hi, g["cardiomegaly"][1])
    f = _lerp(0.3, 0.36, r[4])
    ha = ctr  # heart half-width (thorax half-width is 1)
    hu = mid + (1.0 - 2.0 * f) * ctr
    hb = ha * _lerp(0.75, 0.9, r[5])
    hvc = cp[1.0] - hd * 0.8 - 0.25 * hb
    heart = _ellipse(u, v, hu, hvc, ha, hb, e)
    med = _ramp(_lerp(0.1, 0.15, r[6]) - au, e) * _ramp(hvc - v, e)
    med = np.maximum(med, _ellipse(u, v, mid + 0.15, -0.5, 0.1, 0.09, e))  # aortic knob
    sil = np.maximum(heart, med)
    lungs = thorax * above * (1.0 - sil)

    # -- anatomy densities --
    body = _ramp(_lerp(1.2, 1.32, r[7]) + 0.04 * v - au, 2 * e) * _ramp(v + 1.05, 3 * e)
    body = np.maximum(body, _ramp(0.3 - au, 2 * e))  # neck
    for sd in (-1.0, 1.0):
        body = np.maximum(body, _ellipse(u, v, mid + sd * 0.95, -1.05, 0.5, 0.28, 2 * e))  # shoulders
    A = 0.04 + 0.48 * body + 0.03 * n_coarse * body
    A += 0.1 * (1.0 - above) * thorax + 0.08 * sil
    A -= 0.33 * lungs * (1.0 + 0.08 * n_coarse)
    hil = np.exp(-(((au - 0.28) / 0.35) ** 2) - (((v + 0.05) / 0.5) ** 2))
    A += lungs * (0.05 * hil + 0.05 * np.clip(n_fine, 0, None) * (0.3 + hil))  # vessels
    A -= 0.1 * _ramp(0.05 - au, e) * _ramp(-0.35 - v, e)  # trachea
    ribv = v + 0.25 * au - 0.45 * au**2 - _lerp(0.0, 0.17, r[8])
    rib = _ramp(0.035 - np.abs((ribv / 0.17) % 1.0 - 0.5) * 0.17, e)
    A += 0.1 * rib * _ramp(prof + 0.08 - au, e) * _ramp(au - 0.08, e) * _ramp(0.5 - v, 0.15)
    antv = v - 0.5 * (1.0 - au) - _lerp(0.0, 0.2, r[9])
    A += 0.05 * _ramp(0.03 - np.abs((antv / 0.2) % 1.0 - 0.5) * 0.2, e) * thorax
    spine = _ramp(0.09 - np.abs(u - mid * 0.5), e)
    A += spine * (0.08 + 0.06 * _ramp(0.045 - np.abs((v / 0.14) % 1.0 - 0.5) * 0.14, e))
    for sd in (-1.0, 1.0):
        tilt = _lerp(0.05, 0.2, r[10]) * (0.4 if ap else 1.0)
        clav = _segment(u, v, (mid + sd * 0.12, -1.0), (mid + sd * 0.95, -1.0 - tilt))
        A += 0.16 * _ramp(0.045 - clav, e)
        A += 0.14 * _ellipse(u, v, mid + sd * 1.28, -0.98, 0.17, 0.17, e)  # humeral heads
        if ap:  # scapulae project over the upper lungs on AP films
            A += 0.05 * _ellipse(u, v, mid + sd * 0.95, -0.5, 0.28, 0.5, 3 * e)
    if r[11] < 0.4:  # breast shadows
        for sd in (-1.0, 1.0):
            A += 0.07 * _ellipse(u, v, mid + sd * 0.62, cp[sd] - 0.05, 0.45, 0.3, 0.08)

    # -- pathology signs --
    masks: dict[str, np.ndarray] = {}
    d = {}
    ge = g["pleural_effusion"]
    sides = [(-1.0,), (1.0,), (-1.0, 1.0)][0 if ge[1] < 0.3 else 1 if ge[1] < 0.5 else 2]
    eff = np.zeros_like(u)
    for sd in sides:
        h = (_lerp(0.2, 0.4, ge[2]) if st["pleural_effusion"] == "positive" else _lerp(0.07, 0.1, ge[2]))
        men = cp[sd] - h * (0.3 + 0.7 * np.clip((au - 0.15) / 0.85, 0.0, 1.0) ** 1.5)
        eff = np.maximum(eff, _ramp(v - men, 0.05) * (side == sd))
    d["pleural_effusion"] = 0.4 * eff * thorax * above
    haze = np.exp(-(((au - 0.28) / 0.32) ** 2) - ((v / 0.45) ** 2)) * (0.8 + 0.2 * n_med)
    kerley = _ramp(au - prof + 0.2, 0.03) * _ramp(v - 0.25, 0.05)
    kerley *= _ramp(max(0.012, 0.5 / p.s) - np.abs((v / 0.06) % 1.0 - 0.5) * 0.06, e)
    d["edema"] = lungs * (0.28 * haze + 0.15 * kerley * (st["edema"] == "positive"))
    gc = g["consolidation"]
    lobes = ((-0.5, -0.55, -0.15), (-0.35, 0.1, 9.0), (-0.6, 0.4, 9.0), (0.5, -0.45, 0.0), (0.6, 0.4, 9.0))
    lu, lv, fis = lobes[int(gc[1] * 5) % 5]
    cu_, cv_ = mid + lu + _lerp(-0.08, 0.08, gc[2]), lv + _lerp(-0.08, 0.08, gc[3])
    rad = _lerp(0.28, 0.42, gc[4]) if st["consolidation"] == "positive" else _lerp(0.14, 0.2, gc[4])
    dist = np.hypot((u - cu_) / 1.2, v - cv_) / rad
    patch = _ramp(1.0 - dist + 0.3 * n_med, 0.15) * _ramp(fis - v, e) * lungs
    bron = _bronchograms(u, v, mid + math.copysign(0.25, lu), -0.05, gc[5])
    d["consolidation"] = patch * (0.42 - 0.25 * bron * (st["consolidation"] == "positive"))
    ga = g["atelectasis"]
    pu, pv = mid + atel_side * _lerp(0.4, 0.65, ga[3]), cp[atel_side] - _lerp(0.3, 0.45, ga[4])
    ang, ln = math.radians(_lerp(-15, 15, ga[5])), _lerp(0.3, 0.5, ga[6]) / 2
    dl = _segment(u, v, (pu - ln * math.cos(ang), pv - ln * math.sin(ang)),
                  (pu + ln * math.cos(ang), pv + ln * math.sin(ang)))
    d["atelectasis"] = 0.4 * _ramp(_lerp(0.025, 0.035, ga[7]) - dl, e) * thorax * above
    for s in ("pleural_effusion", "edema", "consolidation", "atelectasis"):
        A += k[s] * d[s]
        masks[s] = (k[s] * d[s]) > 0.02
    masks["cardiomegaly"] = (heart > 0.5) & (st["cardiomegaly"] != "absent")
    if k["support_devices"] > 0.5:
        gs = g["support_devices"]
        line = np.minimum(
            _segment(u, v, (mid - 0.7, -1.45), (mid - 0.2, -0.95)),
            _segment(u, v, (mid - 0.2, -0.95), (mid + 0.02, _lerp(-0.5, -0.2, gs[1]))))
        A += 0.45 * _ramp(0.012 - line, e)
        for j in range(3):
            A += 0.5 * _ellipse(u, v, _lerp(-1.1, 1.1, gs[2 + j]), _lerp(-0.9, 0.3, gs[5 + j]), 0.05, 0.05, e)
    costo = (thorax > 0.5) & (au > 0.6) & (v > cp_map - 0.45) & (v < cp_map)
    geo = {"body": body > 0.5, "thorax": (thorax > 0.5), "lungs": lungs > 0.5, "heart": heart > 0.5,
           "costophrenic": costo}
    return A, u, geo, masks, k, {"hd": hd, "cp_right": cp[-1.0], "cp_left": cp[1.0], "ctr_nominal": ctr}
