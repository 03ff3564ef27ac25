"""Choosing the photo quality gate's thresholds on simulated photos of increasing severity.

`calibrate(images, seed)` degrades clean synthetic radiographs (`calibration_images`) with each
recipe effect at levels 1-4 (chextrain.data.photo / phone: defocus and motion blur, glare_matte,
the random-digital brightness factors, the phone recipe's quadrilaterals), measures every check of
chextrain.quality on them, and picks each threshold (`best_threshold`) so that levels PASS_LEVELS
pass and FAIL_LEVELS fail; `calibration_text` prints the table, `write_thresholds` puts them into a
bundle's model.json. Used by `chextrain quality calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chextrain.quality import (
    QualityError,
    Thresholds,
    analysis_view,
    blur,
    exposure,
    frame_share,
    glare,
    tilt,
)

PASS_LEVELS: tuple[int, ...] = (0, 1)  # calibration: must pass (clean, CheXphoto's release level)
FAIL_LEVELS: tuple[int, ...] = (3, 4)  # calibration: must fail
MAX_FALSE_FAIL = 0.02  # calibration: at most this share of the passing levels may fail


@dataclass(frozen=True)
class Calibration:
    """Thresholds chosen on simulated photos, with the table of values per check and level."""

    thresholds: Thresholds
    # rows: (check, level, median value, share failing at the chosen threshold)
    table: list[tuple[str, int, float, float]]
    images: int
    seed: int


def best_threshold(
    good: Sequence[float], bad: Sequence[float], fail_below: bool, max_false_fail: float = MAX_FALSE_FAIL
) -> float:
    """The threshold that best separates `good` (must pass) from `bad` (must fail) values by balanced
    accuracy (the midpoint between neighbouring values, the middle of a tie), made more lenient where
    needed so that at most `max_false_fail` of `good` fails: a gate that withholds good photos is
    worse than one that lets a few poor ones through to the OOD check.

    fail_below: a value below the threshold fails (blur, size, dark); else above fails.
    """
    g, b = np.sort(np.asarray(good, float)), np.sort(np.asarray(bad, float))
    if not len(g) or not len(b):
        raise QualityError("calibration needs values of both passing and failing levels")
    values = np.unique(np.concatenate([g, b]))
    candidates = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-9]])
    if fail_below:  # pass: value >= t
        acc = (len(g) - np.searchsorted(g, candidates)) / len(g) + np.searchsorted(b, candidates) / len(b)
    else:  # pass: value <= t
        acc = np.searchsorted(g, candidates, "right") / len(g) + (
            len(b) - np.searchsorted(b, candidates, "right")
        ) / len(b)
    best = np.flatnonzero(acc == acc.max())
    optimum = float(candidates[best[len(best) // 2]])  # the middle of a tie: the widest margin
    if fail_below:  # lenient: no higher than the max_false_fail quantile of the good values
        return min(optimum, float(np.quantile(g, max_false_fail, method="lower")))
    return max(optimum, float(np.quantile(g, 1.0 - max_false_fail, method="higher")))


def _severity_values(images: Sequence[np.ndarray], seed: int) -> dict[str, dict[int, list[float]]]:
    """Each check's values on the calibration images at levels 0 (clean) to 4."""
    from chextrain.data.phone import defocus_blur, motion_blur
    from chextrain.data.phone_grey import phone_grey_with_corners
    from chextrain.data.photo import brightness, glare_matte
    from chextrain.data.pixels import LEVELS

    def pixels(effect: Callable[[np.ndarray, np.random.Generator, int], np.ndarray], check: Callable) -> dict:
        out: dict[int, list[float]] = {0: [check(*analysis_view(im, None)) for im in images]}
        for level in LEVELS:
            rng = np.random.default_rng([seed, level])
            out[level] = [check(*analysis_view(effect(im, rng, level), None)) for im in images]
        return out

    def factor(up: bool) -> Callable:
        def effect(im: np.ndarray, rng: np.random.Generator, level: int) -> np.ndarray:
            f = 0.5 if level == 1 else float(level)  # random_digital's strength per level
            jitter = rng.uniform(-0.01, 0.01)
            return brightness(im, 1.0 + 0.2 * f + jitter if up else 1.0 / (1.0 + 0.4 * f + jitter))

        return effect

    def geometry() -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        """Size and tilt of the radiograph in the phone recipe's own photos (data/phone_grey.py
        knows the corners it drew): the geometry the demo's and CheXphoto's natural photos have.
        No level 0: an x-ray that is not a photo has no geometry to judge, and counting it as a
        passing photo would let the threshold fail more of the real level-1 photos."""
        size: dict[int, list[float]] = {}
        slant: dict[int, list[float]] = {}
        for level in LEVELS:
            rng = np.random.default_rng([seed, 20 + level])
            shots = [phone_grey_with_corners(im, rng, level) for im in images]
            size[level] = [frame_share(c, out.shape[:2]) for out, c in shots]
            slant[level] = [tilt(c) for _, c in shots]
        return size, slant

    defocus, motion = pixels(defocus_blur, blur), pixels(motion_blur, blur)
    blurred = {k: defocus[k] + motion[k] for k in defocus}
    size, slant = geometry()
    return {
        "blur": blurred,
        "glare": pixels(glare_matte, glare),
        "exposure (dark)": pixels(factor(up=False), lambda g, m: exposure(g, m)[1]),
        "exposure (bright)": pixels(factor(up=True), lambda g, m: exposure(g, m)[0]),
        "size": size,  # the phone recipe: a monitor in a room, smaller in the frame as the level rises
        "tilt": slant,  # its projective warp: the camera at an angle
    }


# check -> (Thresholds field, a value below the threshold fails?)
_CALIBRATED: dict[str, tuple[str, bool]] = {
    "blur": ("blur_min", True),
    "glare": ("glare_max", False),
    "exposure (dark)": ("exposure_min", True),
    "exposure (bright)": ("exposure_max", False),
    "size": ("size_min", True),
    "tilt": ("tilt_max", False),
}


def calibration_images(
    count: int = 24, seed: int = 0, size: tuple[int, int] = (390, 320)
) -> list[np.ndarray]:
    """`count` clean synthetic radiographs (chextrain.data.phantom), most with findings, 390 x 320."""
    from chextrain.data.phantom import render_xray

    signs = ({}, {"edema": 1.0}, {"cardiomegaly": 1.0, "pleural_effusion": 1.0}, {"consolidation": 1.0})
    views = ("PA", "AP")
    return [
        render_xray(signs[i % len(signs)], views[i % 2], np.random.default_rng([seed, i]), size)[0]
        for i in range(count)
    ]


def calibrate(images: Sequence[np.ndarray], seed: int = 0) -> Calibration:
    """Thresholds that pass levels PASS_LEVELS and fail FAIL_LEVELS of simulated photos of `images`.

    Each image is degraded by each recipe effect at levels 1-4 (seeded by `seed`); the table gives
    each check's median value per level and the share that fails at the chosen threshold.
    """
    if not images:
        raise QualityError("calibration needs at least one image")
    values = _severity_values(images, seed)
    chosen = {}
    for check, (name, fail_below) in _CALIBRATED.items():
        good = [v for level in PASS_LEVELS for v in values[check].get(level, [])]
        bad = [v for level in FAIL_LEVELS for v in values[check].get(level, [])]
        chosen[name] = best_threshold(good, bad, fail_below)
    thresholds = Thresholds(**chosen)
    table = []
    for check, (name, fail_below) in _CALIBRATED.items():
        t = chosen[name]
        for level, vals in values[check].items():
            v = np.asarray(vals)
            failing = float(np.mean(v < t if fail_below else v > t))
            table.append((check, level, float(np.median(v)), failing))
    return Calibration(thresholds, table, len(images), seed)


def calibration_text(cal: Calibration) -> str:
    """The calibration as a plain-text table: check, level, median value, share failing, threshold."""
    names = dict(_CALIBRATED)
    lines = [
        f"quality thresholds from {cal.images} simulated radiographs (seed {cal.seed}): levels "
        f"{', '.join(map(str, PASS_LEVELS))} must pass, {', '.join(map(str, FAIL_LEVELS))} must fail",
        f"{'check':<18} {'level':>5} {'median':>10} {'failing':>8}  threshold",
    ]
    for check, level, median, failing in cal.table:
        field, below = names[check]
        t = getattr(cal.thresholds, field)
        lines.append(
            f"{check:<18} {level:>5} {median:>10.4g} {failing:>7.0%}  {'<' if below else '>'} {t:.4g} fails"
        )
    return "\n".join(lines) + "\n"


def write_thresholds(bundle: str | Path, cal: Calibration) -> Path:
    """Write `cal`'s thresholds into the bundle's model.json under "quality" (atomically); return it.

    The rest of model.json is kept as it was; the Predictor reads them back (`thresholds_from_meta`).
    """
    import json

    from chextrain.fileio import write_json

    path = Path(bundle)
    path = path / "model.json" if path.is_dir() else path
    try:
        document = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise QualityError(f"{path}: cannot read the bundle's model.json ({err})") from None
    if not isinstance(document, dict):
        raise QualityError(f"{path}: model.json is not a JSON object")
    document["quality"] = {
        "thresholds": cal.thresholds.to_dict(),
        "calibration": {
            "images": cal.images,
            "seed": cal.seed,
            "pass_levels": list(PASS_LEVELS),
            "fail_levels": list(FAIL_LEVELS),
            "max_false_fail": MAX_FALSE_FAIL,
        },
    }
    return write_json(path, document, newline=True)
