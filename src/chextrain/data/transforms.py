"""Preprocessing (the paper's: resize to S x S, grey -> 3 channels, ImageNet mean/std) and augmentation.

Names: the spec is a `Preprocessing` (`as_preprocessing` builds one from a name or a dict; bundles
store it under `preprocessing`), and `preprocess(image, size, preprocessing)` applies it, so
inference repeats exactly what training did.
Augmentations are small callables `(image uint8 H x W, rng) -> image uint8 H x W` that take an
explicit `numpy.random.Generator`; they run on the decoded image before `preprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from chextrain.data.photo import simulate_photo

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
NORMS: tuple[str, ...] = ("imagenet", "histeq", "meanstd")  # the values of Preprocessing.name


class Preprocessing(BaseModel):
    """How a decoded image becomes the network's input (stored in bundles as `preprocessing`).

    name: `imagenet` (x/255 then ImageNet mean/std, the paper's), `histeq` (histogram-equalised
        values on a 0-255 scale, unnormalised, as CovidPrognosis' MoCo models expect), or
        `meanstd` (x/255 then the given mean/std, one value or one per channel).
    mean, std: per channel; filled in for `imagenet`, none for `histeq`.
    resize: `stretch` to S x S (the paper's) or `pad` (keep the aspect ratio, black borders).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["imagenet", "histeq", "meanstd"] = "imagenet"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: Literal["stretch", "pad"] = "stretch"

    @model_validator(mode="before")
    @classmethod
    def _fill_imagenet(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("name", "imagenet") == "imagenet":
            return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **data}
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
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be > 0; got {self.std}")
        return self

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel applied after scaling (histeq: identity)."""
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
    pil = Image.fromarray(image)
    if mode == "stretch":
        return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; expected 'stretch' or 'pad'")
    h, w = image.shape
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(pil.resize((nw, nh), Image.Resampling.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


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


def preprocess(
    image: np.ndarray, size: int, preprocessing: str | Preprocessing | Mapping[str, Any] = "imagenet"
) -> torch.Tensor:
    """Decoded image (uint8 H x W, or H x W x 3) -> network input float32 3 x size x size.

    `preprocessing` is anything as_preprocessing accepts (a name, a Preprocessing, a bundle's dict).
    """
    spec = as_preprocessing(preprocessing)
    small = resize(to_grey(image), size, spec.resize)  # S x S uint8
    values = histeq_lut(small) if spec.name == "histeq" else np.arange(256, dtype=np.float32) / 255.0
    mean, std = spec.stats()
    lut = (values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    out = np.empty((3, *small.shape), dtype=np.float32)  # 3 x S x S
    for c in range(3):  # one table lookup per channel: resize, scale and normalise in a pass
        np.take(lut[c].astype(np.float32), small, out=out[c])
    return torch.from_numpy(out)


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
    """With probability p, turn the x-ray into a simulated photo of it (data/photo.py), kept grey."""

    p: float = 0.5
    recipe: str = "phone"
    level: int = 1

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        return to_grey(simulate_photo(image, self.recipe, level=self.level, rng=rng))


def augment(image: np.ndarray, steps: Sequence[Augment], rng: np.random.Generator) -> np.ndarray:
    """Apply the augmentations in order with one generator."""
    for step in steps:
        image = step(image, rng)
    return image
