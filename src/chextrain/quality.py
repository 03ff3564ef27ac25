"""Photo quality gate: is a phone photo of an x-ray good enough to be scored, and if not, what to redo.

One small pure function per check, each returning a number:

- `blur`: the variance of the Laplacian (4-neighbour, grey levels 0-255) of the radiograph; low =
  blurred ("hold the phone still").
- `glare`: the share of the radiograph's pixels at or above `SATURATED` (near the top of the range,
  where a reflection washes the film out); high = glare ("avoid the reflection").
- `exposure`: the 10th and 90th percentile grey of the radiograph, 0-1; a low 90th percentile = too
  dark ("add light"), a high 10th percentile = too bright.
- `frame_share`: the radiograph's area as a share of the frame (from the quadrilateral); low = the
  film is small in the photo ("move closer").
- `tilt`: the largest deviation of a corner angle of the quadrilateral from 90 degrees (in-plane
  rotation leaves it at 0; a camera not parallel to the film does not) ("hold the phone parallel to
  the film").

The radiograph is the quadrilateral when one is given (an object with `corners`, 4 x 2 pixel x, y in
the order TL, TR, BR, BL, as `chextrain.rectify.find_quad` returns), else the whole image. Pixel
checks run on the grey image shrunk so that its longer side is at most `ANALYSIS_SIZE`, so a 12 MP
photo and its 2,048 px copy get the same verdicts (smaller images are analysed as they are).

Thresholds (`Thresholds`) are chosen by `calibrate` (chextrain.quality_calibration) on simulated
photos of increasing severity: the recipes' levels 1-4 of chextrain.data.photo / phone (defocus and
motion blur, glare_matte, the random-digital brightness factors, the room scene's and the
projective warp's quadrilaterals). Level 0 (the clean image) and level 1 (CheXphoto's release,
which models are trained on) must pass; levels 3 and 4 must fail; each threshold is the value that
best separates the two (balanced accuracy), made lenient enough that at most 2% of the passing
levels fail, and level 2 shows where it falls. `chextrain quality calibrate` prints that table and
can write the thresholds into a bundle's model.json (key "quality"); a bundle without them uses
`DEFAULT_THRESHOLDS`, that command's output for its defaults (seed 0, 24 phantoms), rounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

from chextrain.errors import ChextrainError

ANALYSIS_SIZE = 256  # px, the longer side the pixel checks run at
SATURATED = 240  # grey level from which a pixel counts as washed out by glare
CHECKS: tuple[str, ...] = ("blur", "glare", "exposure", "size", "tilt")
ADVICE: dict[str, str] = {
    "blur": "hold the phone still",
    "glare": "avoid the reflection",
    "dark": "add light: the picture is too dark",
    "bright": "dim the light or the screen: the picture is too bright",
    "size": "move closer",
    "tilt": "hold the phone parallel to the film",
}


class QualityError(ChextrainError):
    """A quadrilateral, image or threshold set the quality gate cannot use; the message says which."""


class HasCorners(Protocol):
    """A quadrilateral: `corners` 4 x 2 (pixel x, y; TL, TR, BR, BL)."""

    corners: np.ndarray


@dataclass(frozen=True)
class Thresholds:
    """Where each check's verdict turns from pass to fail (values as the check functions return)."""

    blur_min: float  # variance of the Laplacian below this: blurred
    glare_max: float  # share of saturated pixels above this: glare
    exposure_min: float  # 90th percentile grey (0-1) below this: too dark
    exposure_max: float  # 10th percentile grey (0-1) above this: too bright
    size_min: float  # share of the frame below this: too far
    tilt_max: float  # degrees above this: not parallel

    def to_dict(self) -> dict[str, float]:
        """The thresholds as plain floats (for model.json)."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, given: Mapping[str, Any], where: str = "quality thresholds") -> Thresholds:
        """Thresholds from a mapping such as model.json's "quality"; QualityError naming a bad key."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in given]
        if missing:
            raise QualityError(f"{where}: missing {missing}; expected the keys {names}")
        values = {}
        for n in names:
            v = given[n]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise QualityError(f"{where}: {n} must be a finite number; got {v!r}")
            values[n] = float(v)
        return cls(**values)


# `chextrain quality calibrate` (seed 0, 24 phantoms of 390 x 320) chose these (rounded)
DEFAULT_THRESHOLDS = Thresholds(
    blur_min=107.0, glare_max=0.0048, exposure_min=0.39, exposure_max=0.33, size_min=0.52, tilt_max=5.8
)


def thresholds_from_meta(meta: Mapping[str, Any]) -> tuple[Thresholds, str]:
    """(thresholds, "bundle" | "default") from a bundle's meta: its "quality" key, else the defaults."""
    given = meta.get("quality")
    if given is None:
        return DEFAULT_THRESHOLDS, "default"
    if not isinstance(given, Mapping):
        raise QualityError(f"model.json: quality must be a mapping of thresholds; got {type(given).__name__}")
    return Thresholds.from_dict(given.get("thresholds", given), "model.json quality"), "bundle"


# --- the region and the image the checks look at --------------------------------------------


def quad_corners(quad: HasCorners | np.ndarray | None) -> np.ndarray | None:
    """The corners of `quad` as float64 4 x 2 (None stays None); QualityError if not 4 finite points."""
    if quad is None:
        return None
    corners = np.asarray(getattr(quad, "corners", quad), dtype=np.float64)
    if corners.shape != (4, 2) or not np.isfinite(corners).all():
        raise QualityError(
            f"a quadrilateral needs 4 x 2 finite corners (TL, TR, BR, BL); got {corners.shape}"
        )
    return corners


def analysis_view(image: np.ndarray, corners: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(grey uint8 h x w with longer side <= ANALYSIS_SIZE, mask h x w of the radiograph or None).

    `image` uint8 H x W or H x W x 3; `corners` in the image's pixels (scaled with it).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 3:
        raise QualityError(
            f"expected a uint8 image H x W (x 3) of at least 3 x 3; got {image.dtype} {image.shape}"
        )
    pil = Image.fromarray(image).convert("L")
    h, w = image.shape[:2]
    scale = min(1.0, ANALYSIS_SIZE / max(h, w))
    if scale < 1.0:
        pil = pil.resize((max(3, round(w * scale)), max(3, round(h * scale))), Image.Resampling.BILINEAR)
    grey = np.asarray(pil)
    if corners is None:
        return grey, None
    mask = Image.new("L", pil.size, 0)
    sx, sy = pil.size[0] / w, pil.size[1] / h
    ImageDraw.Draw(mask).polygon([(float(x) * sx, float(y) * sy) for x, y in corners], fill=1)
    return grey, np.asarray(mask, dtype=bool)


# --- the checks ------------------------------------------------------------------------------


def blur(grey: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Variance of the 4-neighbour Laplacian of uint8 grey H x W over the pixels whose neighbours
    all lie in `mask` (None: the whole image); low means blurred."""
    g = grey.astype(np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]  # (H-2) x (W-2)
    if mask is not None:
        inner = mask[1:-1, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:] & mask[:-2, 1:-1] & mask[2:, 1:-1]
        lap = lap[inner]
    return float(lap.var()) if lap.size else 0.0


def glare(grey: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Share (0-1) of the radiograph's pixels at or above SATURATED; high means glare."""
    pixels = grey if mask is None else grey[mask]
    return float((pixels >= SATURATED).mean()) if pixels.size else 0.0


def exposure(grey: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(10th, 90th percentile grey), 0-1, of the radiograph.

    Too dark: even its brightest tenth (bone, the mediastinum) is dark (a low 90th percentile).
    Too bright: even its darkest tenth (the lungs) is light (a high 10th percentile). Percentiles
    rather than the median keep a dark room or screen around the film from reading as underexposure.
    """
    pixels = grey if mask is None else grey[mask]
    if not pixels.size:
        return 0.0, 0.0
    low, high = np.percentile(pixels, [10, 90])
    return float(low) / 255.0, float(high) / 255.0


def frame_share(corners: np.ndarray | None, shape: tuple[int, int]) -> float:
    """The quadrilateral's area (shoelace) as a share of the H x W frame; None: the whole frame, 1."""
    if corners is None:
        return 1.0
    x, y = corners[:, 0], corners[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return min(1.0, area / float(shape[0] * shape[1]))


def tilt(corners: np.ndarray | None) -> float:
    """The largest |corner angle - 90| of the quadrilateral, in degrees; None (a rectangle): 0."""
    if corners is None:
        return 0.0
    worst = 0.0
    for i in range(4):
        a, b = corners[i - 1] - corners[i], corners[(i + 1) % 4] - corners[i]
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        if norm == 0.0:
            return 90.0  # a corner on top of its neighbour: no quadrilateral at all
        worst = max(worst, abs(math.degrees(math.acos(np.clip(np.dot(a, b) / norm, -1.0, 1.0))) - 90.0))
    return worst


# --- the gate --------------------------------------------------------------------------------


def measure(image: np.ndarray, quad: HasCorners | np.ndarray | None = None) -> dict[str, Any]:
    """Each check's value for uint8 `image` (H x W or H x W x 3) and the radiograph's `quad`."""
    corners = quad_corners(quad)
    grey, mask = analysis_view(image, corners)
    return {
        "blur": blur(grey, mask),
        "glare": glare(grey, mask),
        "exposure": exposure(grey, mask),
        "size": frame_share(corners, image.shape[:2]),
        "tilt": tilt(corners),
    }


def verdicts(values: Mapping[str, Any], t: Thresholds) -> dict[str, dict[str, Any]]:
    """Per check: value, verdict ("pass" | "fail"), the threshold it was held to and, on failure,
    the retake advice in plain words. Exposure's value is {"p10", "p90"} and its threshold
    {"p90_min", "p10_max"}; the other checks' are numbers."""

    def check(value: Any, ok: bool, threshold: Any, advice: str) -> dict[str, Any]:
        return {"value": value, "verdict": "pass" if ok else "fail", "threshold": threshold,
                "advice": None if ok else advice}  # fmt: skip

    low, high = values["exposure"]
    return {
        "blur": check(values["blur"], values["blur"] >= t.blur_min, t.blur_min, ADVICE["blur"]),
        "glare": check(values["glare"], values["glare"] <= t.glare_max, t.glare_max, ADVICE["glare"]),
        "exposure": check(
            {"p10": low, "p90": high},
            high >= t.exposure_min and low <= t.exposure_max,
            {"p90_min": t.exposure_min, "p10_max": t.exposure_max},
            ADVICE["dark"] if high < t.exposure_min else ADVICE["bright"],
        ),
        "size": check(values["size"], values["size"] >= t.size_min, t.size_min, ADVICE["size"]),
        "tilt": check(values["tilt"], values["tilt"] <= t.tilt_max, t.tilt_max, ADVICE["tilt"]),
    }


def assess(
    image: np.ndarray,
    quad: HasCorners | np.ndarray | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    source: str = "default",
) -> dict[str, Any]:
    """The quality report of a photo: {"passed", "checks" (see `verdicts`), "retake" (the advice of
    the failed checks, one sentence, or None), "region" ("quadrilateral" | "whole image"),
    "thresholds" (`source`: where they came from)}."""
    checks = verdicts(measure(image, quad), thresholds)
    advice = [c["advice"] for c in checks.values() if c["advice"]]
    retake = None
    if advice:
        retake = "Please take the photo again: " + "; ".join(dict.fromkeys(advice)) + "."
    return {
        "passed": not advice,
        "checks": checks,
        "retake": retake,
        "region": "whole image" if quad is None else "quadrilateral",
        "thresholds": source,
    }
