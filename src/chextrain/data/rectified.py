"""Rectified decoding: a photo's radiograph found and flattened before the resize to S x S.

`make_decoding(size, preprocessing)` is the Decoding a stage, a dataset or a predictor uses: the
plain `transforms.Decoding`, or a `RectifiedDecoding` when the preprocessing has `rectify`. The
latter decodes a photo at a few times S (a large JPEG through `draft`), finds its quadrilateral
(rectify.find_quad: the classical finder or a corners bundle) and warps it flat (rectify.warp),
then resizes as the plain decoding does; a digital image goes the plain way, byte for byte.

Which rows are photos: a dataset passes each row's catalog `domain`; the prepared image store
knows paths only, so there a path is a photo when it lies in a CheXphoto release (`photo_path`,
the official layout, where every kind is a photo). Its folder name carries the rectify setting
(`Decoding.tag` + `-rectify-...`), so rectified and plain rows never mix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chextrain.data.images import load_image
from chextrain.data.transforms import Decoding, Preprocessing, Rectify, as_preprocessing, resize
from chextrain.rectify import Quad, find_quad, warp

SPLIT_DIRS: frozenset[str] = frozenset({"train", "valid", "test"})
PHOTO_RELEASE_PREFIX = "chexphoto"
DRAFT_FACTOR = 4  # photos decode at >= this many times S a side: the radiograph fills part of the frame
MIN_DRAFT = 256  # ... and at least this (the classical finder works at 256 px)


def photo_path(path: str) -> bool:
    """Whether an image path lies in a CheXphoto release (its folder above train/valid/test)."""
    parts = str(path).replace(os.sep, "/").split("/")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in SPLIT_DIRS and parts[i - 1]:
            return parts[i - 1].lower().startswith(PHOTO_RELEASE_PREFIX)
    return False


@dataclass(frozen=True)
class RectifiedDecoding(Decoding):
    """A Decoding that flattens photos first (see the module docstring).

    rectify: the finder's settings. The corner model, when one is named, is loaded on first use
    in each process (workers included) and never pickled.
    """

    rectify: Rectify = field(default_factory=Rectify)
    _finder: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def tag(self) -> str:
        """The plain tag plus the rectify setting, e.g. `64px-stretch-draft-v1-rectify-classical`."""
        return f"{super().tag}-{self.rectify.tag}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_finder": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def model(self) -> Any:
        """The CornerModel of `rectify.model` (loaded once per process), or None for `classical`."""
        if self.rectify.model == "classical":
            return None
        if not self._finder:
            from chextrain.rectify import CornerModel

            self._finder.append(CornerModel.load(self.rectify.model))
        return self._finder[0]

    def quad(self, image: np.ndarray) -> Quad:
        """The radiograph's quadrilateral in a decoded photo (method `none`: the whole frame)."""
        threshold = self.rectify.min_confidence
        if self.model() is None and threshold is not None:
            return find_quad(image, None, classical_min_confidence=threshold)
        return find_quad(image, self.model(), min_confidence=threshold)

    def flatten(self, image: np.ndarray, corners: np.ndarray | None = None) -> tuple[np.ndarray, Quad]:
        """A decoded photo (uint8 H x W [x 3]) -> (its flat radiograph, the quad used). `corners`
        (TL, TR, BR, BL px) skip the finder; method `none` keeps the photo as it is."""
        if corners is not None:
            quad = Quad(np.asarray(corners, np.float32), 1.0, "given")
        else:
            quad = self.quad(image)
        if quad.method == "none":
            return image, quad
        return warp(image, quad.corners), quad

    def load(self, path: str, out: np.ndarray | None = None, photo: bool | None = None) -> np.ndarray:
        """uint8 S x S: a photo flattened then resized; anything else as the plain decoding.

        photo: the row's domain is photo (None: `photo_path(path)`, what the store knows)."""
        if not (photo_path(path) if photo is None else photo):
            return super().load(path, out)
        draft = max(DRAFT_FACTOR * self.size, MIN_DRAFT) if self.draft else None
        flat, _ = self.flatten(load_image(path, draft=draft))
        small = resize(flat, self.size, self.resize)  # S x S
        if out is None:
            return small
        out[...] = small
        return out


def make_decoding(
    size: int, preprocessing: str | Preprocessing | dict[str, Any] = "imagenet", draft: bool = True
) -> Decoding:
    """The decoding of a preprocessing at S = size: rectified when it says `rectify`, else plain."""
    spec = as_preprocessing(preprocessing)
    if spec.rectify is None:
        return Decoding(size, spec.resize, draft)
    return RectifiedDecoding(size, spec.resize, draft, rectify=spec.rectify)
