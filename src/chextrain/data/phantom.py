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
    """Linear soft edge from 0 (x <= -w) to 1 (x >= w): anti-aliased shape boundaries."""
    y = x * (0.5 / w)
    y += 0.5
    return np.clip(y, 0.0, 1.0, out=y)


def _ellipse(u: np.ndarray, v: np.ndarray, c: tuple[float, float], a: tuple[float, float], w: float,
             tilt: float = 0.0) -> np.ndarray:
    """Soft mask of an ellipse centred at c with half-axes a, its first axis turned by tilt rad."""
    du, dv = u - c[0], v - c[1]
    if tilt:
        co, si = math.cos(tilt), math.sin(tilt)
        du, dv = du * co + dv * si, dv * co - du * si
    r = np.sqrt((du / a[0]) ** 2 + (dv / a[1]) ** 2)
    return _ramp((1.0 - r) * min(a), w)


def _segment(u: np.ndarray, v: np.ndarray, p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
    """Distance from every pixel to the segment p-q."""
    du, dv = q[0] - p[0], q[1] - p[1]
    t = np.clip(((u - p[0]) * du + (v - p[1]) * dv) * (1.0 / (du * du + dv * dv + 1e-9)), 0.0, 1.0)
    return np.sqrt((u - p[0] - t * du) ** 2 + (v - p[1] - t * dv) ** 2)


def _bands(x: np.ndarray, period: float, half: float, w: float) -> np.ndarray:
    """Soft periodic bands of half-width `half` every `period` along x (ribs, vertebrae, lines)."""
    y = x * (1.0 / period)
    return _ramp(half - np.abs(y - np.floor(y) - 0.5) * period, w)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth unit-variance noise with a correlation length of about `cell` pixels."""
    h, w = max(2, math.ceil(shape[0] / cell) + 1), max(2, math.ceil(shape[1] / cell) + 1)
    g = rng.standard_normal((h, w), dtype=F32)
    z = np.asarray(Image.fromarray(g).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return (z - z.mean()) * (1.0 / (z.std() + 1e-6))


@dataclass
class _Patient:
    """Patient-to-patient variation shared by both views, drawn before any sign."""

    s: float  # half thorax width in pixels
    cx: float
    cy: float
    rot: float
    hv: float  # vertical stretch (long or short chests)
    r: np.ndarray  # uniforms for anatomy details
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


class _Canvas:
    """The patient frame of every pixel, and pixel boxes around regions of it (for speed)."""

    def __init__(self, p: _Patient, shape: tuple[int, int]) -> None:
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
        return self.u[b], self.v[b]


def _strength(state: str, t: float) -> float:
    return {"absent": 0.0, "uncertain": _lerp(0.3, 0.45, t), "positive": 1.0}[state]


def _bronchograms(u: np.ndarray, v: np.ndarray, hilum: tuple[float, float], phase: float,
                  width: float, e: float) -> np.ndarray:
    """A fan of thin air-filled tubes radiating from a hilum (dark lines inside an opacity)."""
    du, dv = u - hilum[0], v - hilum[1]
    r = np.sqrt(du * du + dv * dv) + 1e-3
    theta = np.arctan2(dv, du)
    step = 0.45  # radians between branches
    y = theta * (1.0 / step) + phase
    d = r * np.abs(y - np.floor(y) - 0.5) * step
    return _ramp(width * np.clip(1.4 - r, 0.3, 1.0) - d, e)


def _focal(cv: _Canvas, acc: np.ndarray, masks: dict[str, np.ndarray], st: dict[str, str],
           k: dict[str, float], g: dict[str, np.ndarray], lungs: np.ndarray, region: np.ndarray,
           n_med: np.ndarray, lobe: tuple[float, float, float], hilum: tuple[float, float],
           plate: tuple[float, float]) -> None:
    """Consolidation: a dense patchy opacity around `lobe` (u, v, fissure: cut below v = fissure)
    with air bronchograms when positive. Atelectasis: a plate-like band at `plate` (within region)."""
    gc, ga = g["consolidation"], g["atelectasis"]
    rad = _lerp(0.28, 0.42, gc[4]) if st["consolidation"] == "positive" else _lerp(0.14, 0.2, gc[4])
    cu, cv_ = lobe[0] + _lerp(-0.08, 0.08, gc[2]), lobe[1] + _lerp(-0.08, 0.08, gc[3])
    b = cv.box(cu - 2 * rad, cu + 2 * rad, cv_ - 1.7 * rad, cv_ + 1.7 * rad)
    u, v = cv.uv(b)
    dist = np.sqrt(((u - cu) * (1 / 1.2)) ** 2 + (v - cv_) ** 2) * (1.0 / rad)
    patch = np.clip((1.0 - dist + 0.3 * n_med[b]) * 2.5, 0.0, 1.0) * _ramp(lobe[2] - v, cv.e) * lungs[b]
    dens = 0.42 * patch
    if st["consolidation"] == "positive":
        dens -= 0.25 * patch * _bronchograms(u, v, hilum, float(gc[5]), max(0.015, 0.6 / cv.p.s), cv.e)
    _add(acc, masks, "consolidation", k["consolidation"], dens, b)
    half, angle = _lerp(0.15, 0.25, ga[6]), math.radians(_lerp(-15, 15, ga[5]))
    du, dv = half * math.cos(angle), half * math.sin(angle)
    b = cv.box(plate[0] - half - 0.1, plate[0] + half + 0.1, plate[1] - 0.2, plate[1] + 0.2)
    d = _segment(*cv.uv(b), (plate[0] - du, plate[1] - dv), (plate[0] + du, plate[1] + dv))
    thick = max(_lerp(0.025, 0.035, ga[7]), 0.8 / cv.p.s)
    _add(acc, masks, "atelectasis", k["atelectasis"], 0.4 * _ramp(thick - d, cv.e) * region[b], b)


def _add(dens_map: np.ndarray, masks: dict[str, np.ndarray], slug: str, k: float, dens: np.ndarray,
         b: tuple[slice, slice] | None = None) -> None:
    """Add a sign's density `dens` (over box b) times its strength, recording where it shows."""
    b = b or (slice(None), slice(None))
    masks[slug] = np.zeros(dens_map.shape, dtype=bool)
    if k > 0:
        dens_map[b] += k * dens
        masks[slug][b] = k * dens > 0.02


def _frontal(st: dict[str, str], p: _Patient, shape: tuple[int, int], ap: bool) -> tuple:
    """A PA or AP view. Returns (density, canvas, geometry masks, sign masks, strengths, params)."""
    cv = _Canvas(p, shape)
    u, v, e = cv.u, cv.v, cv.e
    r, g = p.r, p.signs
    n_coarse, n_med, n_fine = p.noise
    k = {s: _strength(st[s], g[s][0]) for s in (*SLUGS, *EXTRA_SLUGS)}

    # -- geometry; volume loss and heart size follow the labels, their uniforms do not --
    atel = st["atelectasis"]
    atel_side = -1.0 if g["atelectasis"][1] < 0.6 else 1.0
    cp = {-1.0: _lerp(0.76, 0.86, r[0]) - 0.07 * ap}
    cp[1.0] = cp[-1.0] + _lerp(0.02, 0.08, r[1])  # the left hemidiaphragm sits lower
    loss = {"absent": 0.0, "uncertain": 0.04, "positive": _lerp(0.13, 0.2, g["atelectasis"][2])}
    cp[atel_side] -= loss[atel]
    hd = _lerp(0.22, 0.32, r[2])
    mid = _lerp(-0.03, 0.05, r[3]) + 0.06 * atel_side * (atel == "positive")  # shifts toward collapse
    left = _ramp(u - mid, 0.03)  # the patient's left: image right
    au = np.abs(u - mid)
    cp_map = cp[-1.0] + (cp[1.0] - cp[-1.0]) * left
    dome = cp_map - hd * np.clip(1.0 - ((au - 0.45) * (1 / 0.6)) ** 2, 0.0, 1.0)  # diaphragm, per u
    above = _ramp(dome - v, e)
    vv = np.minimum(v, 0.75) - 0.75
    prof = np.sqrt(np.clip(1.0 - (vv * (1 / 1.9)) ** 2, 0.0, 1.0))  # rib cage half-width at v
    thorax = _ramp(prof - au, e) * _ramp(v + 1.15, e) * _ramp(cp_map - v, e)
    ctr = _lerp(*CTR_RANGES[st["cardiomegaly"]], g["cardiomegaly"][1])
    tilt, q, f = math.radians(_lerp(20, 35, r[4])), _lerp(0.7, 0.85, r[5]), _lerp(0.3, 0.36, r[6])
    ha = ctr / math.sqrt(math.cos(tilt) ** 2 + (q * math.sin(tilt)) ** 2)  # u-extent is exactly 2 ctr
    vext = math.sqrt((ha * math.sin(tilt)) ** 2 + (q * ha * math.cos(tilt)) ** 2)
    hc = (mid + (1.0 - 2.0 * f) * ctr, cp[1.0] - hd - 0.35 * vext)
    bh = cv.box(hc[0] - ctr - 0.1, hc[0] + ctr + 0.1, hc[1] - vext - 0.1, hc[1] + vext + 0.1)
    heart = np.zeros(shape, F32)
    heart[bh] = _ellipse(*cv.uv(bh), hc, (ha, q * ha), e, tilt)
    mw = _lerp(0.1, 0.14, r[7])
    med = _ramp(mw + 0.07 * _ramp(-0.7 - v, 0.2) - au, e) * _ramp(hc[1] - v, e)
    knob = cv.box(mid, mid + 0.35, -0.7, -0.35)
    med[knob] = np.maximum(med[knob], _ellipse(*cv.uv(knob), (mid + mw + 0.03, -0.55), (0.08, 0.08), e))
    sil = np.maximum(heart, med)
    lungs = thorax * above * (1.0 - sil)

    # -- anatomy densities: soft tissue, air, bone --
    bw = _lerp(1.18, 1.3, r[8])
    vs = np.minimum(v + 1.0, 0.0)  # rounded shoulders above v = -1
    wb = bw - 0.35 + np.sqrt(np.clip(0.35**2 - vs * vs, 0.0, None)) + 0.04 * np.maximum(v, 0.0)
    body = np.maximum(_ramp(wb - au, 2 * e) * _ramp(v + 1.33, 2 * e), _ramp(0.32 - au, 2 * e))
    path = np.sqrt(np.clip(1.0 - (au * (1.0 / bw)) ** 2, 0.0, 1.0))  # tissue thickness across
    A = 0.03 + body * (0.26 + 0.22 * path + 0.03 * n_coarse)
    A += 0.1 * (1.0 - above) * thorax + 0.08 * sil
    A -= lungs * (0.31 + 0.03 * n_coarse)
    hil = np.exp(-(((au - 0.28) * (1 / 0.35)) ** 2) - (((v + 0.05) * 2.0) ** 2))
    A += lungs * (0.06 * hil + 0.05 * np.maximum(n_fine, 0.0) * (0.3 + hil))  # vessels
    tb = cv.box(mid - 0.1, mid + 0.1, -1.5, -0.3)
    A[tb] -= 0.1 * _ramp(0.05 - np.abs(cv.u[tb] - mid), e) * _ramp(-0.35 - cv.v[tb], e)  # trachea
    rb = cv.box(-1.4 + mid, 1.4 + mid, -1.3, 0.95)
    ur, vr = cv.uv(rb)
    aur = au[rb]
    ribs = _bands(vr + 0.3 * aur - 0.65 * aur**2 - _lerp(0.0, 0.17, r[9]), 0.18, 0.04, e)
    ribs *= _ramp(prof[rb] + 0.1 - aur, e) * _ramp(aur - 0.1, e) * _ramp(0.6 - vr, 0.15)
    A[rb] += 0.09 * ribs + 0.04 * _bands(vr - 0.45 * (1.0 - aur) - _lerp(0.0, 0.2, r[10]), 0.2, 0.03, e) \
        * thorax[rb]
    sb = cv.box(mid * 0.5 - 0.12, mid * 0.5 + 0.12, -1.6, 1.6)
    us, vsp = cv.uv(sb)
    A[sb] += _ramp(0.085 - np.abs(us - mid * 0.5), e) * (0.04 + 0.04 * _bands(vsp, 0.14, 0.05, e))
    for sd in (-1.0, 1.0):
        drop = _lerp(0.05, 0.2, r[11]) * (0.4 if ap else 1.0)
        b = cv.box(mid + sd * 0.05, mid + sd * 1.0, -1.45, -0.9)
        ub, vb = cv.uv(b)
        clav = _segment(ub, vb, (mid + sd * 0.1, -1.0), (mid + sd * 0.95, -1.05 - drop))
        A[b] += 0.16 * _ramp(0.045 - clav, e)
        b = cv.box(mid + sd * (bw - 0.12) - 0.2, mid + sd * (bw - 0.12) + 0.2, -1.25, -0.85)
        A[b] += 0.14 * _ellipse(*cv.uv(b), (mid + sd * (bw - 0.12), -1.05), (0.16, 0.16), e)  # humeral heads
        if ap:  # scapulae project over the upper lungs on AP films
            b = cv.box(mid + sd * 0.95 - 0.3, mid + sd * 0.95 + 0.3, -1.05, 0.0)
            A[b] += 0.05 * _ellipse(*cv.uv(b), (mid + sd * 0.95, -0.5), (0.28, 0.5), 3 * e)
        if r[12] < 0.4:  # breast shadows
            b = cv.box(mid + sd * 0.62 - 0.5, mid + sd * 0.62 + 0.5, cp[sd] - 0.4, cp[sd] + 0.3)
            A[b] += 0.07 * _ellipse(*cv.uv(b), (mid + sd * 0.62, cp[sd] - 0.05), (0.45, 0.3), 0.08)

    # -- pathology signs --
    masks: dict[str, np.ndarray] = {}
    ge = g["pleural_effusion"]
    sides = [(-1.0,), (1.0,), (-1.0, 1.0)][0 if ge[1] < 0.3 else 1 if ge[1] < 0.5 else 2]
    h = _lerp(0.3, 0.5, ge[2]) if st["pleural_effusion"] == "positive" else _lerp(0.1, 0.14, ge[2])
    b = cv.box(mid - 1.2, mid + 1.2, min(cp.values()) - h - 0.6, max(cp.values()) + 0.1)
    vb, aub, lb = cv.v[b], au[b], left[b]
    c = np.clip((aub - 0.15) * (1 / 0.85), 0.0, 1.0)
    men = cp_map[b] - h * (0.3 + 0.7 * c * np.sqrt(c))
    on = lb if sides == (1.0,) else 1.0 - lb if sides == (-1.0,) else 1.0
    _add(A, masks, "pleural_effusion", k["pleural_effusion"],
         0.45 * np.clip((vb - men) * 10.0 + 0.5, 0.0, 1.0) * on * thorax[b] * above[b], b)
    dens = _lerp(0.17, 0.26, g["edema"][2]) * hil * (0.8 + 0.2 * n_med) * lungs  # perihilar bat-wing haze
    if st["edema"] == "positive":  # Kerley B lines: short horizontal lines at the lung bases
        b = cv.box(mid - 1.1, mid + 1.1, 0.15, max(cp.values()) + 0.05)
        vb = v[b]
        dens[b] += 0.15 * lungs[b] * _ramp(au[b] - prof[b] + 0.2, 0.03) * _ramp(vb - 0.25, 0.05) * _bands(
            vb, 0.06, max(0.006, 0.3 / p.s), e)
    _add(A, masks, "edema", k["edema"], dens)
    lobes = ((-0.5, -0.55, -0.15), (-0.35, 0.1, 9.0), (-0.6, 0.4, 9.0), (0.5, -0.45, 0.0), (0.6, 0.4, 9.0))
    lu, lv, fis = lobes[int(g["consolidation"][1] * 5) % 5]
    ga = g["atelectasis"]
    _focal(cv, A, masks, st, k, g, lungs, thorax * above, n_med, (mid + lu, lv, fis),
           (mid + math.copysign(0.25, lu), -0.05),
           (mid + atel_side * _lerp(0.4, 0.65, ga[3]), cp[atel_side] - _lerp(0.32, 0.45, ga[4])))
    masks["cardiomegaly"] = (heart > 0.5) & (st["cardiomegaly"] != "absent")
    if k["support_devices"] > 0.5:  # a right subclavian line into the SVC, and ECG electrodes
        gs = g["support_devices"]
        pts = ((mid - 0.75, -1.5), (mid - 0.25, -0.98), (mid + 0.02, _lerp(-0.5, -0.2, gs[1])))
        for a, c in zip(pts[:-1], pts[1:], strict=True):
            b = cv.box(min(a[0], c[0]) - 0.05, max(a[0], c[0]) + 0.05,
                       min(a[1], c[1]) - 0.05, max(a[1], c[1]) + 0.05)
            A[b] += 0.45 * _ramp(max(0.012, 0.5 / p.s) - _segment(*cv.uv(b), a, c), e)
        for j in range(3):
            c = (_lerp(-1.1, 1.1, gs[2 + j]), _lerp(-0.9, 0.3, gs[5 + j]))
            b = cv.box(c[0] - 0.07, c[0] + 0.07, c[1] - 0.07, c[1] + 0.07)
            A[b] += 0.5 * _ellipse(*cv.uv(b), c, (0.05, 0.05), e)
    costo = (thorax > 0.5) & (au > 0.6) & (v > cp_map - 0.45) & (v < cp_map)
    geo = {"body": body > 0.5, "thorax": thorax > 0.5, "lungs": lungs > 0.5, "heart": heart > 0.5,
           "costophrenic": costo}
    return A, cv, geo, masks, k, {"ctr_nominal": ctr, "cp_right": cp[-1.0], "cp_left": cp[1.0], "dome": hd}


def _lateral(st: dict[str, str], p: _Patient, shape: tuple[int, int]) -> tuple:
    """A lateral view, patient facing image left: sternum left, spine right, heart anterior."""
    cv = _Canvas(p, shape)
    u, v, e = cv.u, cv.v, cv.e
    r, g = p.r, p.signs
    n_coarse, n_med, n_fine = p.noise
    k = {s: _strength(st[s], g[s][0]) for s in (*SLUGS, *EXTRA_SLUGS)}
    atel = st["atelectasis"]
    cp = _lerp(0.72, 0.84, r[0]) - {"absent": 0.0, "uncertain": 0.03,
                                    "positive": _lerp(0.09, 0.13, g["atelectasis"][2])}[atel]
    hd = _lerp(0.22, 0.32, r[2])
    dome = cp - hd * np.clip(1.0 - ((u + 0.1) * (1 / 0.95)) ** 2, 0.0, 1.0) + 0.14 * np.maximum(u, 0.0)
    above = _ramp(dome - v, e)
    cavity = _ellipse(u, v, (0.02, -0.05), (0.95, 1.12), e)
    ctr = _lerp(*CTR_RANGES[st["cardiomegaly"]], g["cardiomegaly"][1])
    ha = ctr * 0.97  # heart depth / chest depth = ctr (the cavity is 1.94 deep)
    hb = ha * _lerp(0.8, 0.95, r[5])
    hc = (-0.9 + ha, cp - hd * 0.75 - 0.2 * hb)
    heart = _ellipse(u, v, hc, (ha, hb), e, math.radians(_lerp(-10, 10, r[4])))
    lungs = cavity * above * (1.0 - heart)
    x = ((u - 0.08) * (1 / 1.22)) ** 2
    y = ((v - 0.3) * (1 / 1.75)) ** 2
    body = _ramp(1.0 - x * x - y * y, 0.05) * _ramp(v + 1.3, 2 * e)  # rounded box
    body = np.maximum(body, _ramp(0.45 - np.abs(u - 0.15), 2 * e))  # neck
    A = 0.04 + body * (0.5 + 0.03 * n_coarse) + 0.08 * (1.0 - above) * cavity + 0.08 * heart
    A -= lungs * (0.29 + 0.03 * n_coarse)
    hil = np.exp(-(((u - 0.05) * 2.5) ** 2) - (((v + 0.05) * 2.5) ** 2))
    A += lungs * (0.06 * hil + 0.04 * np.maximum(n_fine, 0.0) * (0.3 + hil))
    b = cv.box(-0.25, 0.15, -1.5, -0.25)
    A[b] -= 0.1 * _ramp(0.04 - _segment(*cv.uv(b), (-0.15, -1.4), (0.05, -0.3)), e)  # trachea
    b = cv.box(-0.25, 0.35, -0.75, -0.4)
    ub, vb = cv.uv(b)
    A[b] += 0.06 * _ramp(0.04 - np.abs(np.sqrt((ub - 0.05) ** 2 + (vb + 0.45) ** 2) - 0.22), e) \
        * _ramp(-0.45 - vb, e)  # aortic arch
    us = _lerp(0.74, 0.84, r[3])
    b = cv.box(us - 0.35, us + 0.4, -1.8, 1.8)
    ub, vb = cv.uv(b)
    usv = us - 0.06 * vb * vb  # kyphosis
    A[b] += 0.2 * _ramp(0.1 - np.abs(ub - usv), e) * _bands(vb, 0.16, 0.06, e) \
        + 0.06 * _ramp(0.1 - np.abs(ub - usv - 0.2), e)  # vertebral bodies and posterior elements
    b = cv.box(-1.0, -0.8, -0.95, 0.45)
    A[b] += 0.15 * _ramp(0.025 - _segment(*cv.uv(b), (-0.95, -0.85), (-0.88, 0.35)), e)  # sternum
    if r[12] < 0.6:  # raised arms: humeri over the upper chest
        b = cv.box(-0.9, 0.1, -1.9, -0.8)
        A[b] += 0.15 * _ramp(0.09 - _segment(*cv.uv(b), (-0.05, -0.95), (-0.75, -1.8)), 2 * e)
    masks: dict[str, np.ndarray] = {}
    h = _lerp(0.3, 0.5, g["pleural_effusion"][2]) if st["pleural_effusion"] == "positive" else 0.12
    c = np.clip((u + 0.2) * (1 / 1.1), 0.0, 1.0)
    men = dome - h * (0.2 + 0.8 * c * np.sqrt(c))
    _add(A, masks, "pleural_effusion", k["pleural_effusion"],
         0.4 * np.clip((v - men) * 10.0 + 0.5, 0.0, 1.0) * cavity * above * _ramp(u + 0.2, 0.1))
    haze = np.exp(-(((u - 0.05) * (1 / 0.55)) ** 2) - (((v + 0.05) * 2.0) ** 2)) * (0.8 + 0.2 * n_med)
    _add(A, masks, "edema", k["edema"], _lerp(0.17, 0.26, g["edema"][2]) * haze * lungs)
    lobes = ((-0.35, -0.5), (-0.45, 0.15), (0.45, 0.35), (0.35, -0.35), (0.2, 0.45))
    lu, lv = lobes[int(g["consolidation"][1] * 5) % 5]
    ga = g["atelectasis"]
    _focal(cv, A, masks, st, k, g, lungs, cavity * above, n_med, (lu, lv, 9.0), (0.05, -0.05),
           (_lerp(-0.3, 0.4, ga[3]), cp - _lerp(0.35, 0.5, ga[4])))
    masks["cardiomegaly"] = (heart > 0.5) & (st["cardiomegaly"] != "absent")
    if k["support_devices"] > 0.5:
        b = cv.box(-0.4, 0.05, -1.6, -0.2)
        A[b] += 0.45 * _ramp(max(0.012, 0.5 / p.s) - _segment(*cv.uv(b), (-0.3, -1.5), (-0.05, -0.3)), e)
    costo = (cavity > 0.5) & (u > 0.3) & (v > dome - 0.45) & (v < dome)
    geo = {"body": body > 0.5, "thorax": (cavity * above) > 0.5, "lungs": lungs > 0.5, "heart": heart > 0.5,
           "costophrenic": costo}
    return A, cv, geo, masks, k, {"ctr_nominal": ctr, "cp": cp, "dome": hd}


def _shape(size: tuple[int, int] | int) -> tuple[int, int]:
    shape = (size, size) if isinstance(size, int | np.integer) else size
    ok = isinstance(shape, tuple | list) and len(shape) == 2
    if not (ok and all(isinstance(n, int | np.integer) and not isinstance(n, bool) and 16 <= n <= 8192
                       for n in shape)):
        raise PhantomError(f"size {size!r} must be an int or (height, width) of ints, each 16..8192 px")
    return int(shape[0]), int(shape[1])


def _expose(dens: np.ndarray, t: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """Film/detector response: gain, offset, gamma, heel effect and quantum noise -> uint8."""
    H, W = dens.shape
    heel = _lerp(-0.06, 0.06, t[3]) * (np.arange(H, dtype=F32)[:, None] / H - 0.5)
    x = dens * _lerp(0.85, 1.2, t[0]) + _lerp(-0.06, 0.06, t[1]) + heel
    x = np.clip(x, 0.0, 1.0) ** _lerp(0.8, 1.25, t[2]) + grain * _lerp(0.008, 0.03, t[4])
    if t[5] < 0.6:  # lead side marker in a top corner
        mh, mw = max(2, H // 28), max(2, W // 36)
        y0, x0 = int(_lerp(0.03, 0.08, t[6]) * H), int((0.06 if t[7] < 0.5 else 0.88) * W)
        x[y0:y0 + mh, x0:x0 + mw] = 0.95
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_xray(labels: Mapping[str, object], view: str, rng: np.random.Generator,
                size: tuple[int, int] | int) -> tuple[np.ndarray, PhantomInfo]:
    """Render one synthetic radiograph whose signs follow `labels`.

    Args:
        labels: slug -> raw label (1.0 positive, 0.0 negative, -1.0 uncertain, NaN / missing = not
            mentioned = absent) for the five SLUGS; `support_devices` is also understood.
        view: 'PA', 'AP' or 'frontal' (= PA); 'lateral', 'LL' or 'RL'. Case-insensitive.
        rng: the only source of randomness; equal seeds give equal patients whatever the labels.
        size: output (height, width) in pixels, or an int for a square image.

    Returns:
        (image, info): uint8 H x W greyscale (bone and fluid bright, air dark) and PhantomInfo.
    """
    st = _states(labels)
    name = VIEWS.get(str(view).lower())
    if name is None:
        raise PhantomError(f"view {view!r} is not one of {sorted(VIEWS)}")
    shape = _shape(size)
    p = _draw_patient(rng, shape)
    t = rng.random(8)
    grain = rng.standard_normal(shape, dtype=F32)
    if name == "lateral":
        A, cv, geo, masks, k, extra = _lateral(st, p, shape)
    else:
        A, cv, geo, masks, k, extra = _frontal(st, p, shape, ap=name == "AP")
    heart_w, thorax_w = _extent(geo["heart"], cv.u) * p.s, _extent(geo["thorax"], cv.u) * p.s
    info = PhantomInfo(
        view=name, shape=shape, ctr=heart_w / max(thorax_w, 1e-6), heart_width=heart_w, thorax_width=thorax_w,
        strength={s: float(k[s]) for s in SLUGS}, masks={**geo, **masks},
        params={"scale": p.s, "cx": p.cx, "cy": p.cy, "rotation_deg": math.degrees(p.rot), **extra})
    return _expose(A, t, grain), info


def _extent(mask: np.ndarray, u: np.ndarray) -> float:
    """Width of a mask along the patient's horizontal axis, in frame units."""
    if not mask.any():
        return 0.0
    vals = u[mask]
    return float(vals.max() - vals.min())
