"""Where the radiograph lies in a photo: CheXphoto v1.1's labelme polygons, read and written.

CheXphoto v1.1 ships, for each valid natural and film photo, a labelme JSON file with one
polygon around the radiograph:

    ROOT/labels/CheXphoto-v1.1/valid/natural/oneplus/patient64541/study1/view1_frontal.json
    ROOT/labels/CheXphoto-v1.1/valid/film/VBSF00001/study1/view1_frontal.json

(the photo's path below its release folder, `.jpg` -> `.json`; ROOT/CheXphoto-v1.1/labels/...
is read too). The polygon's four points are stored TR, BR, BL, TL in full-resolution photo
pixels, in the orientation a viewer shows (EXIF orientation applied, as labelme loads images);
`imageWidth` / `imageHeight` give that size. chextrain's own order is TL, TR, BR, BL everywhere
else: `read_labelme` returns that order and `write_labelme` stores the release's.

The demo tree (data/demo.py) and `chextrain photo-sim --corners` write the same files for the
photos they simulate, so the learned rectifier (training/objectives/corners.py) trains and is
measured on them exactly as on the release.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chextrain.errors import ChextrainError
from chextrain.fileio import write_json

LABELS_DIR = "labels"
LABELS_RELEASE = "CheXphoto-v1.1"
LABELME_VERSION = "4.5.6"
SHAPE_LABEL = "xray"
STORED_ORDER = ("TR", "BR", "BL", "TL")  # how v1.1 stores the points
# stored index of each of TL, TR, BR, BL (chextrain's order)
_FROM_STORED = (3, 0, 1, 2)


class CornersError(ChextrainError):
    """A corner-label file cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class PhotoCorners:
    """One labelled photo: its label file, the corners (4 x 2 float32, TL, TR, BR, BL, photo
    pixels), the photo's size as labelled and the image name the file refers to."""

    path: Path
    corners: np.ndarray
    width: int
    height: int
    image: str

    def normalised(self) -> np.ndarray:
        """Corners as fractions of the photo's width and height (4 x 2 float32)."""
        return (self.corners / np.array([self.width, self.height], np.float32)).astype(np.float32)


def label_path(root: Path, rel_path: str) -> Path:
    """The v1.1 label file of a photo, from its catalog `rel_path` (release folder first)."""
    parts = Path(rel_path).parts
    if len(parts) < 2:
        raise CornersError(f"{rel_path!r}: expected RELEASE/split/... (a catalog rel_path)")
    return Path(root, LABELS_DIR, LABELS_RELEASE, *parts[1:]).with_suffix(".json")


def _label_candidates(root: Path, rel_path: str) -> list[Path]:
    first = label_path(root, rel_path)
    inner = first.relative_to(Path(root, LABELS_DIR, LABELS_RELEASE))
    return [first, Path(root, LABELS_RELEASE, LABELS_DIR, inner)]


def _field(doc: dict[str, Any], key: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    if key not in doc:
        raise CornersError(f"{path}: field {key!r} is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CornersError(f"{path}: field {key!r} is {value!r}; expected {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"int": "an integer", "list": "a list", "str": "a string"}.get(k.__name__, k.__name__) for k in kinds
    )


def read_labelme(path: str | Path, *, check_inside: bool = True, tolerance: float = 0.1) -> PhotoCorners:
    """Read a v1.1 labelme file: the one 4-point polygon, reordered TL, TR, BR, BL.

    Args:
        path: the JSON file.
        check_inside: refuse points outside the labelled image by more than `tolerance` of its
            side (a point a little outside is a radiograph corner cut off by the photo's edge,
            as in hand-held photos and the simulated ones).
    Raises CornersError naming the file and the field: not JSON, no or several polygons, a
    polygon without exactly 4 finite points, a bad size, points outside the image.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CornersError(f"{path}: cannot read the corner labels ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CornersError(f"{path}: not a labelme JSON file ({err})") from None
    if not isinstance(doc, dict):
        raise CornersError(f"{path}: expected a JSON object (labelme), got {type(doc).__name__}")
    width = _field(doc, "imageWidth", path, int)
    height = _field(doc, "imageHeight", path, int)
    if width < 1 or height < 1:
        raise CornersError(f"{path}: imageWidth x imageHeight {width} x {height} must be positive")
    shapes = _field(doc, "shapes", path, list)
    polygons = [
        (i, s)
        for i, s in enumerate(shapes)
        if isinstance(s, dict) and s.get("shape_type", "polygon") == "polygon"
    ]
    if len(polygons) != 1:
        raise CornersError(f"{path}: field 'shapes' holds {len(polygons)} polygons; expected exactly 1")
    index, shape = polygons[0]
    where = f"shapes[{index}].points"
    points = shape.get("points")
    if not isinstance(points, list) or len(points) != 4:
        n = len(points) if isinstance(points, list) else type(points).__name__
        raise CornersError(f"{path}: field {where} has {n} points; expected 4 (TR, BR, BL, TL)")
    try:
        stored = np.array(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise CornersError(f"{path}: field {where} is {points!r}; expected 4 [x, y] number pairs") from None
    if stored.shape != (4, 2) or not np.isfinite(stored).all():
        raise CornersError(f"{path}: field {where} is {points!r}; expected 4 finite [x, y] pairs")
    if check_inside:
        margin = tolerance * np.array([width, height])
        outside = (stored < -margin) | (stored > np.array([width, height]) + margin)
        if outside.any():
            k = int(np.flatnonzero(outside.any(axis=1))[0])
            raise CornersError(
                f"{path}: field {where}[{k}] ({STORED_ORDER[k]}) = {points[k]} lies outside the "
                f"{width} x {height} image"
            )
    image = doc.get("imagePath")
    return PhotoCorners(
        path,
        stored[list(_FROM_STORED)].astype(np.float32),
        int(width),
        int(height),
        image if isinstance(image, str) else "",
    )


def labelme_document(corners: np.ndarray, width: int, height: int, image: str) -> dict[str, Any]:
    """The labelme JSON object for a radiograph's corners (TL, TR, BR, BL), stored TR, BR, BL, TL."""
    c = np.asarray(corners, dtype=np.float64)
    if c.shape != (4, 2) or not np.isfinite(c).all():
        raise ValueError(f"corners must be 4 x 2 finite numbers (TL, TR, BR, BL); got shape {c.shape}")
    stored = c[[1, 2, 3, 0]]  # TR, BR, BL, TL
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": [
            {
                "label": SHAPE_LABEL,
                "points": [[round(float(x), 3), round(float(y), 3)] for x, y in stored],
                "group_id": None,
                "shape_type": "polygon",
                "flags": {},
            }
        ],
        "imagePath": image,
        "imageData": None,
        "imageHeight": int(height),
        "imageWidth": int(width),
    }


def write_labelme(path: str | Path, corners: np.ndarray, width: int, height: int, image: str) -> Path:
    """Write a v1.1 labelme file (atomically, folders created) for corners TL, TR, BR, BL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, labelme_document(corners, width, height, image), newline=True)


def catalog_corners(catalog: Any, *, kinds: Iterable[str] = ("natural", "film")) -> dict[str, PhotoCorners]:
    """{catalog path: PhotoCorners} of the photos of `kinds` that have a v1.1 label file.

    The data root of each row is its `path` without its `rel_path`. A label file that exists but
    cannot be used raises CornersError naming it.
    """
    rows = catalog.loc[catalog["kind"].isin(list(kinds))]
    found: dict[str, PhotoCorners] = {}
    for path, rel in zip(rows["path"].astype(str), rows["rel_path"].astype(str), strict=True):
        if not path.endswith(rel):
            continue
        root = Path(path[: len(path) - len(rel)] or ".")
        for candidate in _label_candidates(root, rel):
            if candidate.is_file():
                found[path] = read_labelme(candidate)
                break
    return found


def order_corners(points: np.ndarray) -> np.ndarray:
    """Four points in any order -> TL, TR, BR, BL (clockwise on screen from the top-left).

    Sorted by angle about their centroid (image y points down), starting at the point with the
    smallest x + y. Returns 4 x 2 float32.
    """
    p = np.asarray(points, dtype=np.float64).reshape(4, 2)
    centre = p.mean(axis=0)
    angle = np.arctan2(p[:, 1] - centre[1], p[:, 0] - centre[0])
    p = p[np.argsort(angle, kind="stable")]
    start = int(np.argmin(p.sum(axis=1)))
    return np.roll(p, -start, axis=0).astype(np.float32)


def diagonal(width: int, height: int) -> float:
    """The image diagonal in pixels (corner errors are fractions of it)."""
    return math.hypot(width, height)
