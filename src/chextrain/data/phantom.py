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

This module holds the API (labels, sizes, exposure, `render_xray`); the patient frame and shape
primitives live in data/phantom_frame.py and the two views with their signs in
data/phantom_views.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from chextrain.data.phantom_frame import EXTRA_SLUGS, F32, draw_patient, lerp
from chextrain.data.phantom_views import CTR_RANGES, draw_frontal, draw_lateral
from chextrain.errors import ChextrainError
from chextrain.labels import SLUGS

__all__ = ["CTR_RANGES", "EXTRA_SLUGS", "VIEWS", "PhantomError", "PhantomInfo", "render_xray"]

VIEWS: dict[str, str] = {
    "pa": "PA",
    "ap": "AP",
    "frontal": "PA",
    "lateral": "lateral",
    "ll": "lateral",
    "rl": "lateral",
}


class PhantomError(ChextrainError):
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


def _shape(size: tuple[int, int] | int) -> tuple[int, int]:
    shape = (size, size) if isinstance(size, int | np.integer) else size
    ok = isinstance(shape, tuple | list) and len(shape) == 2
    if not (
        ok
        and all(
            isinstance(n, int | np.integer) and not isinstance(n, bool) and 16 <= n <= 8192 for n in shape
        )
    ):
        raise PhantomError(f"size {size!r} must be an int or (height, width) of ints, each 16..8192 px")
    return int(shape[0]), int(shape[1])


def _expose(dens: np.ndarray, t: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """Film/detector response: gain, offset, gamma, heel effect and quantum noise -> uint8."""
    H, W = dens.shape
    heel = lerp(-0.06, 0.06, t[3]) * (np.arange(H, dtype=F32)[:, None] / H - 0.5)
    x = dens * lerp(0.85, 1.2, t[0]) + lerp(-0.06, 0.06, t[1]) + heel
    x = np.clip(x, 0.0, 1.0) ** lerp(0.8, 1.25, t[2]) + grain * lerp(0.008, 0.03, t[4])
    if t[5] < 0.6:  # lead side marker in a top corner
        mh, mw = max(2, H // 28), max(2, W // 36)
        y0, x0 = int(lerp(0.03, 0.08, t[6]) * H), int((0.06 if t[7] < 0.5 else 0.88) * W)
        x[y0 : y0 + mh, x0 : x0 + mw] = 0.95
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_xray(
    labels: Mapping[str, object], view: str, rng: np.random.Generator, size: tuple[int, int] | int
) -> tuple[np.ndarray, PhantomInfo]:
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
    p = draw_patient(rng, shape)
    t = rng.random(8)
    grain = rng.standard_normal(shape, dtype=F32)
    if name == "lateral":
        A, cv, geo, masks, k, extra = draw_lateral(st, p, shape)
    else:
        A, cv, geo, masks, k, extra = draw_frontal(st, p, shape, ap=name == "AP")
    heart_w, thorax_w = _extent(geo["heart"], cv.u) * p.s, _extent(geo["thorax"], cv.u) * p.s
    info = PhantomInfo(
        view=name,
        shape=shape,
        ctr=heart_w / max(thorax_w, 1e-6),
        heart_width=heart_w,
        thorax_width=thorax_w,
        strength={s: float(k[s]) for s in SLUGS},
        masks={**geo, **masks},
        params={"scale": p.s, "cx": p.cx, "cy": p.cy, "rotation_deg": math.degrees(p.rot), **extra},
    )
    return _expose(A, t, grain), info


def _extent(mask: np.ndarray, u: np.ndarray) -> float:
    """Width of a mask along the patient's horizontal axis, in frame units."""
    if not mask.any():
        return 0.0
    vals = u[mask]
    return float(vals.max() - vals.min())
