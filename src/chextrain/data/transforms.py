"""Preprocessing (the paper's: resize to S x S, grey -> 3 channels, ImageNet mean/std) and augmentation.

Names: the spec is a `Preprocessing` (`as_preprocessing` builds one from a name or a dict; bundles
store it under `preprocessing`). It runs in two steps, so that workers hand the device uint8:

- on a loader worker, `Decoding(size, resize).load(path)`: decode (a large JPEG at the scale
  needed, `draft`), grey, resize -> uint8 S x S (what the prepared image store holds); then the
  augmentations at that size, and `input_uint8` (histogram equalisation for `histeq`);
- on the device, `to_network_input(batch uint8 B x [1 x] S x S, preprocessing)`: /255, mean/std
  and the grey -> 3-channel copy -> float32 B x 3 x S x S. Its float32 arithmetic is that of the
  former CPU preprocessing, so the numbers are the same bit for bit.

`preprocess(image, size, preprocessing)` runs both on one decoded image (inference, OOD features).
Augmentations are small callables `(image uint8 H x W, rng) -> image uint8 H x W` that take an
explicit `numpy.random.Generator`; they run on the S x S image, never on the full-size one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from chextrain.data.images import centre_square, load_resized, resize_pil

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
NORMS: tuple[str, ...] = ("imagenet", "histeq", "meanstd", "xrv")  # the values of Preprocessing.name
XRV_SCALE = 1024.0  # torchxrayvision's input: grey 0..255 scaled to [-XRV_SCALE, XRV_SCALE]


class Rectify(BaseModel):
    """Photos are flattened before the resize: the radiograph's quadrilateral found
    (rectify.find_quad) and warped to an upright rectangle (rectify.warp). Digital rows untouched.

    model: `classical` (OpenCV's finder) or the path of a `corners` bundle (the learned finder,
        the classical one as its fallback). min_confidence: the finder's threshold (None: the
        bundle's, or rectify.CLASSICAL_MIN_CONFIDENCE); below it the photo is used as it is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default="classical", min_length=1)
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("model")
    @classmethod
    def _no_stage_ref(cls, value: str) -> str:
        if value.startswith("stage:"):
            raise ValueError(
                f"{value!r}: a stage reference is not resolved here; give `classical` or the path "
                "of a corners bundle (a finished corners stage's folder)"
            )
        return value

    @property
    def tag(self) -> str:
        """A short name of these settings for the prepared store's folder, e.g. `rectify-classical`."""
        if self.model == "classical" and self.min_confidence is None:
            return "rectify-classical"
        import hashlib

        key = f"{self.model}|{self.min_confidence}"
        return "rectify-" + hashlib.sha256(key.encode()).hexdigest()[:10]


class Preprocessing(BaseModel):
    """How a decoded image becomes the network's input (stored in bundles as `preprocessing`).

    name: `imagenet` (x/255 then ImageNet mean/std, the paper's), `histeq` (histogram-equalised
        values on a 0-255 scale, unnormalised, as CovidPrognosis' MoCo models expect), or
        `meanstd` (x/255 then the given mean/std, one value or one per channel), or `xrv`
        (torchxrayvision's: grey scaled to [-1024, 1024], resize `crop`; see `xrv_input`).
    mean, std: per channel; filled in for `imagenet`, none for `histeq` and `xrv`.
    resize: `stretch` to S x S (the paper's), `pad` (keep the aspect ratio, black borders) or
        `crop` (the centred square, torchxrayvision's; the default for `xrv`).
    rectify: flatten photos first (`Rectify`; `true` = the classical finder). Absent (None) it is
        left out of the dumped dict, so older configs, bundles and config hashes stay as they were.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["imagenet", "histeq", "meanstd", "xrv"] = "imagenet"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: Literal["stretch", "pad", "crop"] = "stretch"
    rectify: Rectify | None = None

    @field_validator("rectify", mode="before")
    @classmethod
    def _rectify_flag(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value

    @model_serializer(mode="wrap")
    def _drop_unset_rectify(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.rectify is None:
            data.pop("rectify", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _fill_imagenet(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("name", "imagenet") == "imagenet":
            return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **data}
        if isinstance(data, Mapping) and data.get("name") == "xrv":
            return {"resize": "crop", **data}
        return data

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _broadcast(cls, value: Any) -> Any:
        return (value,) * 3 if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _stats_match_name(self) -> Preprocessing:
        if self.name == "imagenet" and (self.mean, self.std) != (IMAGENET_MEAN, IMAGENET_STD):
            raise ValueError("imagenet uses ImageNet's mean/std; for other values use name 'meanstd'")
        if self.name == "meanstd" and (self.mean is None or self.std is None):
            raise ValueError("name 'meanstd' needs both mean and std")
        if self.name == "histeq" and (self.mean is not None or self.std is not None):
            raise ValueError("histeq takes no mean/std (its output is on a 0-255 scale)")
        if self.name == "xrv" and (self.mean is not None or self.std is not None):
            raise ValueError("xrv takes no mean/std (its input is on torchxrayvision's [-1024, 1024])")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be > 0; got {self.std}")
        return self

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel applied after scaling (histeq: identity; xrv: x/255 -> [-1024, 1024])."""
        if self.name == "xrv":
            return (0.5, 0.5, 0.5), (0.5 / XRV_SCALE,) * 3
        if self.mean is None or self.std is None:
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return self.mean, self.std


def as_preprocessing(spec: str | Preprocessing | Mapping[str, Any]) -> Preprocessing:
    """Accept a name from NORMS, a Preprocessing, or its dict form (as read from a bundle)."""
    if isinstance(spec, Preprocessing):
        return spec
    if isinstance(spec, str):
        if spec not in NORMS:
            raise ValueError(f"unknown preprocessing name {spec!r}; expected one of {list(NORMS)}")
        return Preprocessing(name=spec)
    return Preprocessing.model_validate(dict(spec))


def to_grey(image: np.ndarray) -> np.ndarray:
    """uint8 H x W or H x W x 3 -> uint8 H x W (ITU-R 601 luma, as PIL's "L")."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, :3])).convert("L"))
    raise ValueError(f"expected an image H x W or H x W x 3; got shape {image.shape}")


def resize(image: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """uint8 H x W -> uint8 size x size; `pad` keeps the aspect ratio with black borders."""
    return np.asarray(resize_pil(Image.fromarray(image), size, mode))


@dataclass(frozen=True)
class Decoding:
    """How an image file becomes the uint8 S x S image a stage starts from (the store's key too).

    size: S; resize: `stretch` or `pad` (Preprocessing.resize); draft: decode large JPEGs at the
    smallest scale whose sides stay >= S (about 0.2-0.3 grey levels from a full decode at 320 px).
    """

    size: int
    resize: str = "stretch"
    draft: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"image size must be a positive int (px), got {self.size!r}")
        if self.resize not in ("stretch", "pad", "crop"):
            raise ValueError(f"unknown resize mode {self.resize!r}; expected 'stretch', 'pad' or 'crop'")

    @property
    def tag(self) -> str:
        """A name for these settings, e.g. `320px-stretch-draft-v1` (v: the decoding's version)."""
        return f"{self.size}px-{self.resize}-{'draft' if self.draft else 'full'}-v1"

    def load(self, path: str, out: np.ndarray | None = None) -> np.ndarray:
        """The file decoded, grey, resized: uint8 S x S (ImageLoadError naming it when unreadable);
        written into `out` (writable uint8 S x S) when given."""
        return load_resized(path, self.size, self.resize, draft=self.draft, out=out)

    def fit(self, image: np.ndarray) -> np.ndarray:
        """An image already decoded (uint8 H x W or H x W x 3) -> grey uint8 S x S."""
        return resize(to_grey(image), self.size, self.resize)


def histeq_lut(image: np.ndarray, bins: int = 256) -> np.ndarray:
    """float32 256-entry table of CovidPrognosis' HistogramNormalize for this uint8 image.

    That transform ran on the [0, 1] tensor after resizing: a histogram with `bins` bins over
    the image's value range, its CDF scaled to 0-255, and np.interp of each pixel on that CDF.
    Each output depends on the pixel value only, so it is a lookup table.
    """
    x = image.ravel().astype(np.float64) / 255.0
    hist, edges = np.histogram(x, bins, density=True)
    cdf = hist.cumsum()
    cdf = 255.0 * cdf / cdf[-1]
    return np.interp(np.arange(256) / 255.0, edges[:-1], cdf).astype(np.float32)


def histeq(image: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram equalisation to a 0-255 float32 scale (CovidPrognosis' HistogramNormalize)."""
    return histeq_lut(image, bins)[image]


def input_uint8(image: np.ndarray, preprocessing: str | Preprocessing | Mapping[str, Any]) -> np.ndarray:
    """What a worker hands over for an S x S grey image: itself, or (histeq) its equalised values
    rounded to uint8 (CovidPrognosis' HistogramNormalize, on a 0-255 scale)."""
    if as_preprocessing(preprocessing).name != "histeq":
        return image
    return np.rint(histeq(image)).astype(np.uint8)


def input_scale(spec: Preprocessing) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
    """(divisor, mean, std) of the network input: x / divisor, then (x - mean) / std per channel."""
    mean, std = spec.stats()
    return (1.0 if spec.name == "histeq" else 255.0), mean, std


def to_network_input(
    batch: torch.Tensor, preprocessing: str | Preprocessing | Mapping[str, Any] = "imagenet"
) -> torch.Tensor:
    """uint8 B x S x S or B x 1 x S x S (on any device) -> float32 B x 3 x S x S there.

    x / 255 (not for histeq), then (x - mean) / std per channel, which also makes the grey copy
    per channel. The float32 operations are those of the former CPU preprocessing (a table
    computed as (v / 255 - mean) / std), so CPU results are identical bit for bit.
    """
    if batch.dtype != torch.uint8:
        raise ValueError(f"to_network_input takes uint8 images; got {batch.dtype}")
    if batch.dim() == 3:
        batch = batch[:, None]
    if batch.dim() != 4 or batch.shape[1] != 1:
        raise ValueError(f"expected images B x S x S or B x 1 x S x S; got shape {tuple(batch.shape)}")
    divisor, mean, std = input_scale(as_preprocessing(preprocessing))
    x = batch.to(torch.float32)
    if divisor != 1.0:  # a tensor divisor: a true division on every device (no reciprocal)
        x = x / torch.tensor(divisor, dtype=torch.float32, device=x.device)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - m).div_(s)  # B x 3 x S x S


def preprocess(
    image: np.ndarray, size: int, preprocessing: str | Preprocessing | Mapping[str, Any] = "imagenet"
) -> torch.Tensor:
    """Decoded image (uint8 H x W, or H x W x 3) -> network input float32 3 x size x size.

    Both steps on the CPU: resize, `input_uint8`, `to_network_input`. `preprocessing` is anything
    as_preprocessing accepts (a name, a Preprocessing, a bundle's dict). `xrv`: `xrv_input`.
    """
    spec = as_preprocessing(preprocessing)
    if spec.name == "xrv":
        return xrv_input(image, size)
    small = input_uint8(resize(to_grey(image), size, spec.resize), spec)  # S x S uint8
    return to_network_input(torch.from_numpy(np.array(small))[None], spec)[0]


def xrv_input(image: np.ndarray, size: int) -> torch.Tensor:
    """torchxrayvision's input from a decoded image: float32 3 x S x S, its preprocessing repeated exactly.

    xrv.datasets.normalize (grey -> [-1024, 1024]), XRayCenterCrop, then XRayResizer (skimage's
    resize: a Gaussian anti-aliasing filter and bilinear zoom, whose scipy calls are made here as
    skimage makes them), in float from the full image, the grey copied to 3 channels. The uint8
    worker step (resize `crop`, then x/255 -> [-1024, 1024] on the device) is its rounded cousin.
    """
    from scipy import ndimage

    x = (2 * (to_grey(image).astype(np.float32) / 255) - 1.0) * XRV_SCALE  # H x W
    left, top, side = centre_square(x.shape[1], x.shape[0])
    x = x[top : top + side, left : left + side]
    sigma = max(0.0, (side / size - 1) / 2)  # skimage's anti-aliasing when shrinking
    filtered = ndimage.gaussian_filter(x, sigma, mode="grid-constant", cval=0.0) if sigma > 0 else x
    out = ndimage.zoom(filtered, size / side, order=1, mode="grid-constant", cval=0.0, grid_mode=True)
    low, high = float(x.min()), float(x.max())  # skimage clips to the input's range (and cval's)
    if not low <= 0.0 <= high and float(out.min()) <= 0.0 <= float(out.max()):
        low, high = min(low, 0.0), max(high, 0.0)
    out = np.clip(out, np.float32(low), np.float32(high))  # S x S
    return torch.from_numpy(np.ascontiguousarray(out)).expand(3, size, size).contiguous()


class Augment(Protocol):
    """A training augmentation: a new uint8 image from an image and a generator."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class StandardAugment:
    """Small rotation, scale and translation (one affine warp) then brightness/contrast.

    rotation: max degrees either way; scale: (low, high) zoom factor; translate: max shift as a
    fraction of width/height; brightness: max offset as a fraction of 255; contrast: max
    relative change about mid-grey. Borders that come into view are black.
    """

    rotation: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = to_grey(image)
        h, w = image.shape
        angle = math.radians(rng.uniform(-self.rotation, self.rotation))
        zoom = rng.uniform(*self.scale)
        tx, ty = rng.uniform(-self.translate, self.translate, size=2) * (w, h)
        offset = rng.uniform(-self.brightness, self.brightness) * 255.0
        gain = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)
        # PIL maps each OUTPUT pixel to its input: x_in = R(-angle)/zoom (x_out - c - t) + c.
        cx, cy = w / 2.0, h / 2.0
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        ox, oy = cx + tx, cy + ty
        coeffs = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
        warped = Image.fromarray(image).transform(
            (w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0
        )
        lut = np.clip((np.arange(256) - 127.5) * gain + 127.5 + offset, 0, 255).round().astype(np.uint8)
        return lut[np.asarray(warped)]


@dataclass(frozen=True)
class PhotoSim:
    """With probability p, turn the x-ray into a simulated photo of it, kept grey.

    The `phone` recipe runs as data/phone_grey.py (the RGB recipe's effects on the luma, about
    3x faster); the others as data/photo.py makes them, then grey.
    """

    p: float = 0.5
    recipe: str = "phone"
    level: int = 1

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        from chextrain.data.phone_grey import simulate_photo_grey  # OpenCV, for training only

        return simulate_photo_grey(image, self.recipe, self.level, rng)


def augment(image: np.ndarray, steps: Sequence[Augment], rng: np.random.Generator) -> np.ndarray:
    """Apply the augmentations in order with one generator."""
    for step in steps:
        image = step(image, rng)
    return image
