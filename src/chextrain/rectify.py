"""Find the radiograph in a photo and flatten it: `find_quad` and `warp`.

A phone photo of an x-ray shows the radiograph as a quadrilateral (a monitor or a film on a
lightbox, seen at an angle) inside a room. `find_quad(image)` returns its four corners (TL, TR,
BR, BL, pixel x, y), a confidence in [0, 1] and the method that found them:

- `learned`: a small network (trained by the `corners` objective,
  training/objectives/corners.py) regresses the corners and how sure it is, as the CheXphoto
  competition's winner (PTRN) did;
- `classical`: OpenCV's edges, contours and polygon approximation (the fallback, and the
  baseline the learned model is measured against in benchmarks/rectify.py);
- `none`: neither is confident enough, so the photo is used as it is (the corners are the
  whole frame) and the result says so.

`warp(image, corners)` maps the quadrilateral onto an upright rectangle (the flat, cropped
radiograph). `corner_error` and `quad_iou` are the measures of a found quadrilateral.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from chextrain.data.corners import order_corners
from chextrain.errors import ChextrainError

METHODS: tuple[str, ...] = ("learned", "classical", "none")
CLASSICAL_MIN_CONFIDENCE = 0.6  # below it the classical quad is not used (measured on simulated photos)
LEARNED_MIN_CONFIDENCE = 0.5  # the default when the bundle records none
CORNER_RANGE = (-0.2, 1.2)  # the network's corners, as fractions of the side: may lie a little outside
WORK_SIDE = 256  # the classical finder works at this longer side (px)
CORNER_HEAD = "corners"
CORNER_OUTPUTS = 9  # 4 corners x (x, y) + the confidence logit
CORNER_GRID = 6  # the encoder's feature map is pooled to this many cells a side
CORNER_HIDDEN = 128


class RectifyError(ChextrainError):
    """A corner model or an image cannot be used for rectification."""


@dataclass(frozen=True)
class Quad:
    """A radiograph's quadrilateral in a photo.

    corners: 4 x 2 float32, pixel x, y of TL, TR, BR, BL (continuous: the image spans [0, W] x
    [0, H]); confidence: in [0, 1]; method: "learned", "classical" or "none" (the whole frame:
    nothing was found confidently, the photo is used as it is).
    """

    corners: np.ndarray
    confidence: float
    method: str


def full_frame(width: int, height: int) -> np.ndarray:
    """The corners of the whole image (TL, TR, BR, BL), 4 x 2 float32."""
    return np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
        raise RectifyError(
            f"image must be uint8 H x W or H x W x 3 (H, W >= 2); got {image.dtype} {image.shape}"
        )
    if image.ndim == 3:
        if image.shape[2] != 3:
            raise RectifyError(f"image must be grey or RGB; got {image.shape[2]} channels")
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return image


# --- measures -------------------------------------------------------------------------------


def corner_error(found: np.ndarray, true: np.ndarray, width: int, height: int) -> float:
    """Mean distance between matching corners, as a fraction of the image diagonal."""
    d = np.linalg.norm(np.asarray(found, np.float64) - np.asarray(true, np.float64), axis=1)
    return float(d.mean() / math.hypot(width, height))


def quad_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two convex quadrilaterals (4 x 2 corners each)."""
    pa = cv2.convexHull(np.asarray(a, np.float32).reshape(-1, 1, 2))
    pb = cv2.convexHull(np.asarray(b, np.float32).reshape(-1, 1, 2))
    inter, _ = cv2.intersectConvexConvex(pa, pb)
    union = cv2.contourArea(pa) + cv2.contourArea(pb) - inter
    return float(inter / union) if union > 0 else 0.0


# --- the classical finder -------------------------------------------------------------------


def _quad_of(contour: np.ndarray) -> np.ndarray | None:
    """The 4-corner polygon approximating a contour's convex hull, or None if it has no such form."""
    hull = cv2.convexHull(contour)
    perimeter = cv2.arcLength(hull, True)
    for eps in (0.01, 0.02, 0.03, 0.05, 0.08):
        approx = cv2.approxPolyDP(hull, eps * perimeter, True)
        if len(approx) == 4:
            return approx.reshape(4, 2).astype(np.float32)
        if len(approx) < 4:
            return None
    return None


def _band(shape: tuple[int, int], quad: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """Mask of the band between `quad` scaled about its centroid by `inner` and by `outer`."""
    centre = quad.mean(axis=0)
    masks = []
    for k in (outer, inner):
        mask = np.zeros(shape, np.uint8)
        cv2.fillConvexPoly(mask, np.round(centre + (quad - centre) * k).astype(np.int32), 1)
        masks.append(mask.astype(bool))
    return masks[0] & ~masks[1]


def _edge_contrast(grey: np.ndarray, quad: np.ndarray) -> float:
    """How sharply the quadrilateral's outline separates light from dark, in [0, 1]: the mean grey
    just inside its edges against just outside (a difference of 40 grey levels or more gives 1)."""
    inside, outside = _band(grey.shape, quad, 0.94, 1.0), _band(grey.shape, quad, 1.0, 1.06)
    if not inside.any() or not outside.any():
        return 0.0
    return float(min(1.0, abs(grey[inside].mean() - grey[outside].mean()) / 40.0))


def classical_quad(image: np.ndarray) -> Quad:
    """OpenCV's baseline: bright regions and edge regions -> contours -> 4-corner polygons.

    The grey photo (at WORK_SIDE px) is blurred; candidate regions are its Otsu-bright parts and
    the regions its Canny edges close. Each large contour's convex hull is approximated by a
    polygon (approxPolyDP at growing tolerance); a 4-corner one is a candidate, scored by how
    fully the region fills it (area ratio), how much light and dark its outline separates, and
    less when it covers little of the frame.
    The confidence is the best score; without a candidate it is 0 (method "none", whole frame).
    """
    grey = _grey(image)
    h, w = grey.shape
    scale = min(1.0, WORK_SIDE / max(h, w))
    small = cv2.resize(
        grey, (max(2, round(w * scale)), max(2, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    small = cv2.GaussianBlur(small, (5, 5), 0)
    sh, sw = small.shape
    masks = []
    _, bright = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    masks.append(cv2.morphologyEx(bright, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)))
    median = float(np.median(small))
    edges = cv2.Canny(small, 0.66 * median, 1.33 * median + 20)
    closed = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    filled = np.zeros_like(closed)
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    masks.append(filled)
    best: tuple[float, np.ndarray] | None = None
    frame = float(sh * sw)
    for mask in masks:
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            area = cv2.contourArea(contour)
            if area < 0.08 * frame:
                continue
            quad = _quad_of(contour)
            if quad is None:
                continue
            quad_area = cv2.contourArea(quad.reshape(-1, 1, 2))
            if quad_area <= 0 or quad_area > 0.98 * frame:  # the frame itself is no finding
                continue
            fill = min(area / quad_area, quad_area / area)
            size = min(1.0, quad_area / (0.25 * frame)) ** 0.5
            score = fill * size * _edge_contrast(small, quad)
            if best is None or score > best[0]:
                best = (score, quad)
    if best is None:
        return Quad(full_frame(w, h), 0.0, "none")
    score, quad = best
    corners = order_corners(quad / np.float32(scale))
    return Quad(corners.astype(np.float32), float(np.clip(score, 0.0, 1.0)), "classical")


# --- the learned finder ---------------------------------------------------------------------


def corner_input(image: np.ndarray, size: int) -> np.ndarray:
    """What the corner network sees: the photo grey, stretched to size x size (uint8).

    Stretching (not padding) keeps corners as fractions of the width and height.
    """
    grey = _grey(image)
    interp = cv2.INTER_AREA if max(grey.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(grey, (size, size), interpolation=interp)


def decode_outputs(outputs: Any) -> tuple[Any, Any]:
    """Network outputs B x 9 -> (corners B x 4 x 2 as fractions of the side, confidence B).

    Works on torch tensors (training) and numpy arrays alike: sigmoid, then the corners are
    spread over CORNER_RANGE.
    """
    lo, hi = CORNER_RANGE
    if isinstance(outputs, np.ndarray):
        s = 1.0 / (1.0 + np.exp(-outputs.astype(np.float64)))
    else:
        s = outputs.float().sigmoid()
    corners = (s[:, :8] * (hi - lo) + lo).reshape(-1, 4, 2)
    return corners, s[:, 8]


def to_corner_network(net: Any, grid: int = CORNER_GRID, hidden: int = CORNER_HIDDEN) -> Any:
    """Turn a CXRNet into the corner network, in place: the encoder's feature map pooled to
    grid x grid cells and flattened (where things are matters here, so no global pooling), and one
    head `corners`, an MLP to 9 outputs (see decode_outputs).

    The encoder must be a FeaturesEncoder (tiny, densenet121, efficientnet_b0): its weights keep
    their names, so an init's encoder still loads.
    """
    from collections import OrderedDict

    from torch import nn

    from chextrain.models.net import FeaturesEncoder

    encoder = net.encoder
    if isinstance(encoder, FeaturesEncoder):
        layers: OrderedDict[str, nn.Module] = OrderedDict(features=encoder.features)
        if encoder.final_relu:
            layers["relu"] = nn.ReLU()
        layers["pool"] = nn.AdaptiveAvgPool2d(grid)  # B x C x grid x grid
        layers["flat"] = nn.Flatten()  # B x C * grid^2
        net.encoder = nn.Sequential(layers)
        net.num_features = int(encoder.num_features) * grid * grid
    elif not (isinstance(encoder, nn.Sequential) and "pool" in encoder._modules):
        raise RectifyError(
            f"backbone {net.backbone_name!r} cannot make a corner network: use tiny, densenet121 "
            "or efficientnet_b0"
        )
    net.heads = nn.ModuleDict(
        {
            CORNER_HEAD: nn.Sequential(
                nn.Linear(net.num_features, hidden), nn.ReLU(), nn.Linear(hidden, CORNER_OUTPUTS)
            )
        }
    )
    net.head_names = [CORNER_HEAD]
    net.num_classes = CORNER_OUTPUTS
    return net


class CornerModel:
    """A trained corner network (a `corners` stage's bundle) and what it needs to run.

    Load with `CornerModel.load(bundle)`; `predict(image)` -> (corners 4 x 2 px, confidence).
    """

    def __init__(self, net: Any, meta: dict[str, Any]) -> None:
        from chextrain.data.transforms import as_preprocessing

        self.net = net.eval()
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.preprocessing = as_preprocessing(meta.get("preprocessing", "imagenet"))
        corners = meta.get("corners") if isinstance(meta.get("corners"), dict) else {}
        threshold = corners.get("min_confidence")
        self.min_confidence = LEARNED_MIN_CONFIDENCE if threshold is None else float(threshold)

    @classmethod
    def load(cls, path: str | Path) -> CornerModel:
        """Load a `corners` bundle (folder or model.json); RectifyError if it is another kind."""
        from safetensors.torch import load_file

        from chextrain.models.meta import (
            WEIGHTS_FILE,
            meta_path_of,
            read_bundle_meta,
            read_safetensors_header,
        )
        from chextrain.models.net import CXRNet

        meta_path = meta_path_of(Path(path))
        meta = read_bundle_meta(meta_path)
        spec = meta.get("corners")
        if meta.get("objective") != "corners" or not isinstance(spec, dict):
            raise RectifyError(
                f"{meta_path}: not a corner model (objective {meta.get('objective')!r}); "
                "train one with `objective: corners`"
            )
        weights = meta_path.parent / WEIGHTS_FILE
        read_safetensors_header(weights)  # a truncated or foreign file: an error naming it
        net = to_corner_network(
            CXRNet(meta["architecture"]["backbone"], heads=[CORNER_HEAD]),
            int(spec.get("grid", CORNER_GRID)),
            int(spec.get("hidden", CORNER_HIDDEN)),
        )
        try:
            net.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as err:
            raise RectifyError(f"{weights} does not match its corner network: {str(err)[:300]}") from None
        return cls(net, meta)

    def predict_batch(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Corners B x 4 x 2 in each image's pixels and confidences B (float32)."""
        import torch

        from chextrain.data.transforms import to_network_input

        x = np.stack([corner_input(im, self.image_size) for im in images])[:, None]  # B x 1 x S x S
        with torch.inference_mode():
            out = self.net(to_network_input(torch.from_numpy(x), self.preprocessing)).numpy()  # B x 9
        corners, confidence = decode_outputs(out)
        sizes = np.array([[im.shape[1], im.shape[0]] for im in images], np.float64)[:, None, :]
        return (corners * sizes).astype(np.float32), confidence.astype(np.float32)

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Corners 4 x 2 (pixels, TL, TR, BR, BL) and the confidence for one image."""
        corners, confidence = self.predict_batch([image])
        return corners[0], float(confidence[0])


def find_quad(
    image: np.ndarray,
    model: CornerModel | str | Path | None = None,
    *,
    min_confidence: float | None = None,
    classical_min_confidence: float = CLASSICAL_MIN_CONFIDENCE,
    fallback: bool = True,
) -> Quad:
    """The radiograph's quadrilateral in `image` (uint8 grey or RGB).

    Args:
        image: the photo.
        model: a CornerModel or the path of a `corners` bundle; None uses the classical finder.
        min_confidence: the learned model's threshold (default: the one its bundle records).
        classical_min_confidence: the classical finder's threshold.
        fallback: when the learned model is below its threshold, try the classical finder.
    Returns Quad(corners, confidence, method): method "none" (whole frame, the photo used as it
    is) when nothing is confident enough; its confidence is then the best one seen.
    """
    grey = _grey(image)
    h, w = grey.shape
    seen = 0.0
    if model is not None:
        if not isinstance(model, CornerModel):
            model = CornerModel.load(model)
        corners, confidence = model.predict(grey)
        threshold = model.min_confidence if min_confidence is None else min_confidence
        if confidence >= threshold:
            return Quad(corners, confidence, "learned")
        seen = confidence
        if not fallback:
            return Quad(full_frame(w, h), seen, "none")
    found = classical_quad(grey)
    if found.method == "classical" and found.confidence >= classical_min_confidence:
        return found
    return Quad(full_frame(w, h), max(seen, found.confidence), "none")


def warp(image: np.ndarray, corners: np.ndarray, size: int | None = None) -> np.ndarray:
    """The quadrilateral `corners` (TL, TR, BR, BL px) of `image` flattened to an upright rectangle.

    The rectangle's sides are the quadrilateral's longer opposite sides; `size` sets its longer
    side instead (aspect kept). Grey stays grey, RGB stays RGB; uint8 out.
    """
    image = np.asarray(image)
    _grey(image)  # checks the layout
    c = np.asarray(corners, dtype=np.float32)
    if c.shape != (4, 2) or not np.isfinite(c).all():
        raise RectifyError(f"corners must be 4 x 2 finite numbers (TL, TR, BR, BL); got shape {c.shape}")
    width = max(np.linalg.norm(c[1] - c[0]), np.linalg.norm(c[2] - c[3]))
    height = max(np.linalg.norm(c[3] - c[0]), np.linalg.norm(c[2] - c[1]))
    if min(width, height) < 1:
        raise RectifyError(f"corners {c.tolist()} enclose no area")
    if size is not None:
        if size < 2:
            raise RectifyError(f"size {size} must be >= 2 px")
        k = size / max(width, height)
        width, height = width * k, height * k
    out_w, out_h = max(2, round(width)), max(2, round(height))
    target = full_frame(out_w, out_h)
    matrix = cv2.getPerspectiveTransform(c, target)
    return cv2.warpPerspective(
        np.ascontiguousarray(image),
        matrix,
        (out_w, out_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
