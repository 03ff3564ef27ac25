"""MoCo's two views of each x-ray: MoCo-CXR's augmentation, and photo-aware positive pairs.

A sample is two views of one catalog row. Each view is the MoCo-CXR recipe (a conservative random
resized crop, a rotation within 10 degrees, a horizontal flip; no colour jitter or blur, which
could change the findings) of the image. With the photo-aware option the second view starts from a
photo of the same x-ray: a real CheXphoto photo (same patient/study/image, train split) when the
catalog holds one, else a photo simulated by data/photo.py. Digital and photo features of the same
x-ray are then pulled together, which is what a model that reads both needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

from chextrain.data.catalog import pair_keys
from chextrain.data.dataset import DatasetError
from chextrain.data.images import load_image
from chextrain.data.photo import simulate_photo
from chextrain.data.transforms import Preprocessing, preprocess, to_grey
from chextrain.training.specs import MocoCxrSpec, PhotoAwareSpec
from chextrain.training.stage import MocoStage


@dataclass(frozen=True)
class MocoCxrAugment:
    """MoCo-CXR's view: random resized crop (area fraction `scale`, aspect `ratio`), rotation, flip.

    Takes and returns uint8 H x W (grey; RGB is made grey first). The crop keeps its own size:
    `transforms.preprocess` resizes every view to the network's input afterwards. Corners that
    rotation brings into view are black, like the border of a radiograph.
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
    """Catalog rows -> {"view1": 3 x S x S, "view2": 3 x S x S, "paired": 0 / 1 / 2, "index"}.

    `paired` says what view2 started from: 0 the row's own image, 1 a simulated photo, 2 a real
    partner (another domain's image of the same x-ray). Randomness comes from a generator seeded
    by (seed, epoch, index), as in data.dataset.CatalogDataset, so a resumed run sees the same views.

    Args:
        rows: the catalog rows to train on.
        image_size / preprocessing: the network input (transforms.preprocess).
        augment: the per-view augmentation (MocoCxrAugment) or None.
        photo: the photo-aware spec or None.
        partners: per row, paths of real photos/x-rays of the same x-ray (photo_partners).
        seed: seeds the per-sample generators.
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
    ) -> None:
        rows = rows.reset_index(drop=True)
        self.paths: list[str] = rows["path"].astype(str).tolist()
        self.domains: list[str] = rows["domain"].astype(str).tolist()
        self.csv_rows: list[int] = rows["row"].astype(int).tolist() if "row" in rows else [0] * len(rows)
        self.partners = partners if partners is not None else [[] for _ in self.paths]
        if len(self.partners) != len(self.paths):
            raise DatasetError(f"partners has {len(self.partners)} entries for {len(self.paths)} rows")
        self.image_size, self.preprocessing = image_size, preprocessing
        self.augment, self.photo, self.seed = augment, photo, seed

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: str, index: int) -> np.ndarray:
        try:
            return load_image(path)
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"cannot read an image of catalog row {index} (CSV line "
                f"{self.csv_rows[index]}): {path}: {err}"
            ) from err

    def second_image(self, index: int, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The image view2 starts from, and `paired` (see the class docstring)."""
        photo = self.photo
        if photo is None or rng.random() >= photo.p:
            return image, 0
        partners = self.partners[index]
        if photo.real_pairs and partners:
            return self._load(partners[int(rng.integers(len(partners)))], index), 2
        if self.domains[index] == "digital":
            return to_grey(simulate_photo(image, photo.recipe, level=photo.level, rng=rng)), 1
        return image, 0  # a photo without its x-ray in the pool: a plain MoCo positive

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        image = self._load(self.paths[index], index)
        other, paired = self.second_image(index, image, rng)
        views = [image, other]
        if self.augment is not None:
            views = [self.augment(v, rng) for v in views]
        return {
            "view1": preprocess(views[0], self.image_size, self.preprocessing),  # 3 x S x S
            "view2": preprocess(views[1], self.image_size, self.preprocessing),  # 3 x S x S
            "paired": paired,
            "index": index,
        }


def moco_dataset(stage: MocoStage, rows: pd.DataFrame, pool: pd.DataFrame) -> MocoDataset:
    """The MoCo views of a stage's rows; `pool` is where real photo partners come from (the train
    split: never a validation or test image)."""
    aug = stage.moco.augmentation
    photo = aug.photo_aware
    partners = photo_partners(rows, pool) if photo is not None and photo.real_pairs else None
    return MocoDataset(
        rows,
        image_size=stage.image_size,
        preprocessing=stage.preprocessing,
        augment=mococxr_augment(aug.mococxr),
        photo=photo,
        partners=partners,
        seed=stage.seed,
    )
