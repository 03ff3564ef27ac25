"""The radiograph's outline for the web service: found, or given by the person, and scored.

`parse_corners` checks the corners a client sends (the page's dragged outline); `score_upload`
finds the quadrilateral (`rectify.find_quad`) or uses the given one, scores the image with the
predictor and adds the outline to the answer (`quad_json`).

What is scored. Without corners, the whole photo as it was uploaded (the served models were
trained on whole photos, and a found quadrilateral can be wrong); the found quadrilateral feeds the
quality gate's size and tilt checks. With corners, the person has said where the radiograph is:
that quadrilateral is warped flat (`rectify.warp`) and scored as a photo, and the quality gate
judges what the model saw (the flat radiograph: its blur, glare and exposure; size and tilt pass,
the warp removed them).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from chextrain.errors import ChextrainError
from chextrain.inference import Predictor
from chextrain.rectify import CornerModel, Quad, find_quad, warp

CORNERS_FIELD = "corners"
MAX_CORNERS_CHARS = 400  # 8 numbers with separators; anything longer is not corners
MIN_AREA_SHARE = 0.01  # a quadrilateral smaller than this share of the image is no radiograph
MIN_SIDE = 2.0  # px: every side at least this long


class CornersError(ChextrainError):
    """Corners a client sent that cannot be used; the message names the field and what was expected."""


def parse_corners(text: str, width: int, height: int, field: str = CORNERS_FIELD) -> np.ndarray:
    """'x,y,x,y,x,y,x,y' (TL, TR, BR, BL in the image's pixels) -> 4 x 2 float32.

    Commas and/or spaces separate the numbers. Refused with CornersError naming `field`: not 8
    numbers, a number that is not finite, a corner outside the W x H image ([0, W] x [0, H]), a
    polygon that is not convex or not in the order TL, TR, BR, BL (clockwise on the screen), a
    side shorter than MIN_SIDE px or an area under MIN_AREA_SHARE of the image.
    """
    if len(text) > MAX_CORNERS_CHARS:
        raise CornersError(f"{field}: expected 8 numbers, got {len(text)} characters")
    tokens = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    if len(tokens) != 8:
        raise CornersError(f"{field}: expected 8 numbers (x, y of TL, TR, BR, BL), got {len(tokens)}")
    values = []
    for i, token in enumerate(tokens):
        try:
            v = float(token)
        except ValueError:
            raise CornersError(f"{field}: value {i + 1} ({token[:20]!r}) is not a number") from None
        if not math.isfinite(v):
            raise CornersError(f"{field}: value {i + 1} ({token[:20]!r}) is not a finite number")
        values.append(v)
    corners = np.array(values, dtype=np.float64).reshape(4, 2)
    names = ("TL", "TR", "BR", "BL")
    for name, (x, y) in zip(names, corners, strict=True):
        if not (0 <= x <= width and 0 <= y <= height):
            raise CornersError(
                f"{field}: corner {name} ({x:g}, {y:g}) lies outside the {width} x {height} image"
            )
    edges = np.roll(corners, -1, axis=0) - corners  # TL->TR, TR->BR, BR->BL, BL->TL
    if (np.linalg.norm(edges, axis=1) < MIN_SIDE).any():
        raise CornersError(f"{field}: two corners lie on top of each other (sides under {MIN_SIDE:g} px)")
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not (turns > 0).all():
        raise CornersError(
            f"{field}: the corners must form a convex quadrilateral in the order TL, TR, BR, BL "
            "(clockwise on the screen)"
        )
    x, y = corners[:, 0], corners[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    if area < MIN_AREA_SHARE * width * height:
        raise CornersError(
            f"{field}: the quadrilateral covers {area / (width * height):.2%} of the image; "
            f"expected at least {MIN_AREA_SHARE:.0%}"
        )
    return corners.astype(np.float32)


def quad_json(quad: Quad, width: int, height: int) -> dict[str, Any]:
    """A Quad as JSON: corners [[x, y] x 4] (TL, TR, BR, BL, rounded to 0.1 px), confidence
    (None for a person's outline), method, and the width and height of the image they refer to."""
    return {
        "corners": [[round(float(x), 1), round(float(y), 1)] for x, y in quad.corners],
        "confidence": None if quad.method == "user" else round(float(quad.confidence), 4),
        "method": quad.method,
        "width": int(width),
        "height": int(height),
    }


def score_upload(
    predictor: Predictor,
    image: np.ndarray,
    corners: np.ndarray | None = None,
    *,
    corner_model: CornerModel | None = None,
    score_anyway: bool = False,
) -> tuple[dict[str, Any], np.ndarray]:
    """(the predictor's result with "quad" and "rectified", the image that was scored).

    corners None: the quadrilateral is found and given to the quality gate (method "none": the
    whole image, no quadrilateral); "quad" is set when the image was scored as a photo, else None.
    corners 4 x 2 (parse_corners): that quadrilateral warped flat is scored, as a photo unless the
    predictor's domain is fixed; "quad" is it, method "user".
    """
    h, w = image.shape[:2]
    if corners is None:
        quad = find_quad(image, corner_model)
        found = None if quad.method == "none" else quad
        result = predictor.predict_images([image], ["upload"], score_anyway=score_anyway, quads=[found])[0]
        result["quad"] = quad_json(quad, w, h) if result["domain"] == "photo" else None
        result["rectified"] = False
        return result, image
    flat = warp(image, corners)
    domain = "photo" if predictor.domain == "auto" else None
    result = predictor.predict_images([flat], ["upload"], score_anyway=score_anyway, domain=domain)[0]
    result["quad"] = quad_json(Quad(corners, 1.0, "user"), w, h)
    result["rectified"] = True
    return result, flat
