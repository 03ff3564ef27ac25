"""MoCo's two views of each x-ray: MoCo-CXR's augmentation, and photo-aware positive pairs.

A sample is two views of one catalog row. Each view is the MoCo-CXR recipe (a conservative random
resized crop, a rotation within 10 degrees, a horizontal flip; no colour jitter or blur, which
could change the findings) of the image. With the photo-aware option the second view starts from a
photo of the same x-ray: a real CheXphoto photo (same patient/study/image, train split) when the
catalog holds one, else a photo simulated by data/photo.py. Digital and photo features of the same
x-ray are then pulled together, which is what a model that reads both needs.

Like data.dataset.CatalogDataset, views are made at the network's size S from images decoded at
that size (or read from the prepared image store) and handed over as uint8 1 x S x S; the model
step normalises them on the device (MocoModule, transforms.to_network_input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from chextrain.data.catalog import pair_keys
from chextrain.data.dataset import DOMAIN_INDEX, DatasetError, ImageSource, check_source, read_row
from chextrain.data.packed import PackedStrings
from chextrain.data.phone_grey import simulate_photo_grey
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Decoding, Preprocessing, as_preprocessing, input_uint8, resize, to_grey
from chextrain.training.specs import MocoCxrSpec, PhotoAwareSpec
from chextrain.training.stage import MocoStage


@dataclass(frozen=True)
class MocoCxrAugment:
    """MoCo-CXR's view: random resized crop (area fraction `scale`, aspect `ratio`), rotation, flip.

    Takes and returns uint8 H x W (grey; RGB is made grey first). The crop keeps its own size:
    MocoDataset resizes every view back to the network's input size. Corners that rotation
    brings into view are black, like the border of a radiograph.
    """

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 10.0
    flip: float = 0.5

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = to_grey(image)
        h, w = image.shape
        area = h * w * rng.uniform(*self.scale)
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw = int(min(w, max(1, round(math.sqrt(area * aspect)))))
        ch = int(min(h, max(1, round(area / cw))))  # a side cut at the border: the other keeps the area
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = Image.fromarray(image).crop((x0, y0, x0 + cw, y0 + ch))
        view = view.rotate(
            rng.uniform(-self.rotation, self.rotation), resample=Image.Resampling.BILINEAR, fillcolor=0
        )
        if rng.random() < self.flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(view)


def mococxr_augment(spec: MocoCxrSpec | None) -> MocoCxrAugment | None:
    """The augmentation callable of a stage's `moco.augmentation.mococxr` (None: views unaugmented)."""
    if spec is None:
        return None
    return MocoCxrAugment(scale=spec.crop_scale, rotation=spec.rotation, flip=spec.flip)


def photo_partners(rows: pd.DataFrame, pool: pd.DataFrame) -> list[list[str]]:
    """For each row, the paths of `pool` rows showing the same x-ray in the other domain.

    A digital x-ray's partners are its CheXphoto photos; a photo's partner is its source x-ray
    (and none when the pool lacks it). Rows pair by patient/study/image (catalog.pair_keys).
    """
    if rows.empty:
        return []
    by_key: dict[tuple[str, str], list[str]] = {}
    for key, domain, path in zip(pair_keys(pool), pool["domain"], pool["path"], strict=True):
        by_key.setdefault((key, domain), []).append(str(path))
    other = {"digital": "photo", "photo": "digital"}
    return [
        sorted(set(by_key.get((key, other[domain]), [])) - {str(path)})
        for key, domain, path in zip(pair_keys(rows), rows["domain"], rows["path"], strict=True)
    ]


class MocoDataset(Dataset):
    """Catalog rows -> {"view1": uint8 1 x S x S, "view2": uint8 1 x S x S, "paired": 0 / 1 / 2, "index"}.

    `paired` says what view2 started from: 0 the row's own image, 1 a simulated photo, 2 a real
    partner (another domain's image of the same x-ray). Randomness comes from a generator seeded
    by (seed, epoch, index), as in data.dataset.CatalogDataset, so a resumed run sees the same views.

    Args:
        rows: the catalog rows to train on.
        image_size / preprocessing: the network input (resize mode and histeq apply here).
        augment: the per-view augmentation (MocoCxrAugment) or None.
        photo: the photo-aware spec or None.
        partners: per row, paths of real photos/x-rays of the same x-ray (photo_partners).
        seed: seeds the per-sample generators.
        images / partner_images: optional row-aligned S x S sources (the store's readers) of the
            rows and of the partners flattened in order, read instead of decoding the files.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        *,
        image_size: int,
        preprocessing: str | Preprocessing | Mapping[str, Any] = "imagenet",
        augment: MocoCxrAugment | None = None,
        photo: PhotoAwareSpec | None = None,
        partners: list[list[str]] | None = None,
        seed: int = 0,
        images: ImageSource | None = None,
        partner_images: ImageSource | None = None,
    ) -> None:
        rows = rows.reset_index(drop=True)
        n = len(rows)
        partners = partners if partners is not None else [[] for _ in range(n)]
        if len(partners) != n:
            raise DatasetError(f"partners has {len(partners)} entries for {n} rows")
        self.paths = PackedStrings(rows["path"].astype(str).tolist())
        self.digital = rows["domain"].map(DOMAIN_INDEX).to_numpy(dtype=np.int64) == DOMAIN_INDEX["digital"]
        self.csv_rows = rows["row"].to_numpy(dtype=np.int64) if "row" in rows else np.zeros(n, np.int64)
        self.partner_paths = PackedStrings(p for group in partners for p in group)  # flattened
        self.partner_start = np.zeros(n + 1, dtype=np.int64)  # row i: partner_start[i]:[i + 1]
        np.cumsum([len(group) for group in partners], out=self.partner_start[1:])
        check_source(images, n, image_size)
        check_source(partner_images, len(self.partner_paths), image_size)
        self.images, self.partner_images = images, partner_images
        self.spec = as_preprocessing(preprocessing)
        self.decoding = Decoding(image_size, self.spec.resize)
        self.augment, self.photo, self.seed = augment, photo, seed

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> np.ndarray:
        if self.images is not None:
            return np.asarray(self.images[index])
        return read_row(self.decoding, self.csv_rows, index, self.paths[index])

    def _partner(self, index: int, k: int) -> np.ndarray:
        """The k-th flattened partner image (a partner of row `index`)."""
        if self.partner_images is not None:
            return np.asarray(self.partner_images[k])
        return read_row(self.decoding, self.csv_rows, index, self.partner_paths[k])

    def second_image(self, index: int, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The image view2 starts from, and `paired` (see the class docstring)."""
        photo = self.photo
        if photo is None or rng.random() >= photo.p:
            return image, 0
        start, stop = int(self.partner_start[index]), int(self.partner_start[index + 1])
        if photo.real_pairs and stop > start:
            return self._partner(index, start + int(rng.integers(stop - start))), 2
        if self.digital[index]:
            return simulate_photo_grey(image, photo.recipe, photo.level, rng), 1
        return image, 0  # a photo without its x-ray in the pool: a plain MoCo positive

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        image = self._image(index)  # S x S
        other, paired = self.second_image(index, image, rng)
        views = [image, other]
        if self.augment is not None:  # crops come back to S x S
            views = [resize(self.augment(v, rng), self.decoding.size, self.decoding.resize) for v in views]
        view1, view2 = (input_uint8(v, self.spec) for v in views)
        return {
            "view1": torch.from_numpy(np.array(view1))[None],  # 1 x S x S uint8
            "view2": torch.from_numpy(np.array(view2))[None],  # 1 x S x S uint8
            "paired": paired,
            "index": index,
        }


def moco_dataset(
    stage: MocoStage, rows: pd.DataFrame, pool: pd.DataFrame, store: ImageStore | None = None
) -> MocoDataset:
    """The MoCo views of a stage's rows; `pool` is where real photo partners come from (the train
    split: never a validation or test image). With `store`, rows and partners are read from it
    (built here when missing)."""
    aug = stage.moco.augmentation
    photo = aug.photo_aware
    partners = photo_partners(rows, pool) if photo is not None and photo.real_pairs else None
    images = partner_images = None
    if store is not None:
        flat = [p for group in partners or [] for p in group]
        store.prepare([*rows["path"].astype(str), *flat])
        images = store.images(rows["path"].astype(str).tolist())
        partner_images = store.images(flat) if partners is not None else None
    return MocoDataset(
        rows,
        image_size=stage.image_size,
        preprocessing=stage.preprocessing,
        augment=mococxr_augment(aug.mococxr),
        photo=photo,
        partners=partners,
        seed=stage.seed,
        images=images,
        partner_images=partner_images,
    )
