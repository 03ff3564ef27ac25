"""Torch Dataset over catalog rows (its sampler and loader, resumable mid-epoch: data/loader.py).

Each item is a dict: image uint8 1 x S x S (the model step makes it the float network input on
the device: transforms.to_network_input), target 5, mask 5 (policy applied), head (index of the
classifier head that serves the row), domain (0 digital / 1 photo) and index (the row's position).
Images come decoded at the size needed from the files (transforms.Decoding) or from the prepared
image store (data/store.py), the same bytes either way; augmentation runs at that size and draws
from a generator seeded by (seed, epoch, index), so an item is the same whichever worker makes
it and whenever: a resumed run sees the very same batches. A dataset holds numpy arrays and
tensors only (paths packed in one buffer), so forked workers share it without copying it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from chextrain.data.images import ImageLoadError
from chextrain.data.packed import PackedStrings
from chextrain.data.rectified import RectifiedDecoding, make_decoding, photo_path
from chextrain.data.transforms import Augment, Decoding, Preprocessing, as_preprocessing, augment, input_uint8
from chextrain.errors import ChextrainError
from chextrain.labels import Policy, apply_policy

DOMAIN_INDEX: dict[str, int] = {"digital": 0, "photo": 1}


class DatasetError(ChextrainError):
    """A row cannot become a training sample (unreadable image, unknown domain or head)."""


def head_indices(
    domains: Sequence[str],
    head_names: Sequence[str],
    domain_heads: Mapping[str, str] | None = None,
    head: str | None = None,
) -> np.ndarray:
    """Index into head_names of the head serving each row: `head` for all, else domain_heads[domain].

    With neither, a single-head model serves every row.
    """
    names = list(head_names)
    if head is not None:
        if head not in names:
            raise DatasetError(f"unknown head {head!r}; the model has heads {names}")
        return np.full(len(domains), names.index(head), dtype=np.int64)
    if domain_heads is None:
        if len(names) != 1:
            raise DatasetError(f"the model has heads {names}: give domain_heads or a head")
        return np.zeros(len(domains), dtype=np.int64)
    lookup = {}
    for domain, name in domain_heads.items():
        if name not in names:
            raise DatasetError(f"domain_heads maps {domain!r} to {name!r}, not one of the heads {names}")
        lookup[domain] = names.index(name)
    missing = sorted(set(domains) - set(lookup))
    if missing:
        raise DatasetError(f"domain_heads {dict(domain_heads)} has no head for domain(s) {missing}")
    return np.array([lookup[d] for d in domains], dtype=np.int64)


class ImageSource(Protocol):
    """Row-aligned decoded images: `source[i]` is row i's uint8 S x S (data.store.StoredImages, an array)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


def read_row(
    decoding: Decoding,
    csv_rows: np.ndarray,
    index: int,
    path: str,
    out: np.ndarray | None = None,
    photo: bool | None = None,
) -> np.ndarray:
    """`decoding.load(path, out)` for catalog row `index`; a DatasetError naming row, CSV line and file.

    photo: the row's domain is photo (a RectifiedDecoding flattens it first; ignored otherwise)."""
    try:
        if isinstance(decoding, RectifiedDecoding):
            return decoding.load(path, out, photo=photo)
        return decoding.load(path, out)
    except (OSError, ImageLoadError) as err:
        raise DatasetError(
            f"cannot read an image of catalog row {index} (CSV line {csv_rows[index]}): {path}: {err}"
        ) from err


def check_source(images: ImageSource | None, n: int, size: int) -> None:
    """Refuse an image source whose row count or image size does not fit the dataset."""
    if images is None:
        return
    if len(images) != n:
        raise DatasetError(f"images holds {len(images)} rows for {n} catalog rows")
    shape = getattr(images, "shape", None)
    if shape is not None and tuple(shape[1:]) != (size, size):
        raise DatasetError(f"images are {tuple(shape[1:])} px; the dataset needs {size} x {size} px")


def check_store_photos(rows: pd.DataFrame) -> None:
    """Refuse rows whose domain the rectified store cannot tell from the path (data/rectified.py)."""
    wrong = [
        (i, p, d)
        for i, (p, d) in enumerate(zip(rows["path"].astype(str), rows["domain"], strict=True))
        if (d == "photo") != photo_path(p)
    ]
    if wrong:
        i, path, domain = wrong[0]
        raise DatasetError(
            f"{len(wrong)} row(s) have a domain the rectified image store cannot tell from the path, "
            f"e.g. row {i} ({domain}): {path}; the store rectifies the images of CheXphoto releases "
            "only: drop `data.store` for this stage or lay the photos out as CheXphoto"
        )


class CatalogDataset(Dataset):
    """Catalog rows -> training/evaluation samples (see the module docstring).

    Args:
        rows: catalog rows (schema in docs/architecture.md); their order defines `index`.
        image_size: side S of the square network input.
        preprocessing: a Preprocessing, its name or its dict (its resize mode and histeq apply here,
            its scaling on the device: transforms.to_network_input).
        policy: uncertainty policy for targets and mask (labels.apply_policy).
        head_names / domain_heads / head: how each row picks its head (see head_indices).
        augment: augmentation callables applied to the S x S image (training only).
        seed: seeds the per-sample augmentation generator together with (epoch, index).
        images: optional row-aligned S x S uint8 images (the prepared store's reader, an array)
            read instead of decoding the files.
        draft: decode large JPEGs at the scale needed (transforms.Decoding); False: full size.

    With `rectify` in the preprocessing, rows whose domain is photo are flattened before the resize
    (data/rectified.py); a store's rows must then come from a rectified store, which tells photos by
    their path (a CheXphoto release): a photo row elsewhere is refused with the store.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        *,
        image_size: int,
        preprocessing: str | Preprocessing | Mapping[str, Any] = "imagenet",
        policy: Policy = "ones",
        head_names: Sequence[str] = ("shared",),
        domain_heads: Mapping[str, str] | None = None,
        head: str | None = None,
        augment: Sequence[Augment] = (),
        seed: int = 0,
        images: ImageSource | None = None,
        draft: bool = True,
    ) -> None:
        rows = rows.reset_index(drop=True)
        unknown = sorted(set(rows["domain"]) - set(DOMAIN_INDEX))
        if unknown:
            raise DatasetError(f"unknown domain(s) {unknown}; expected {list(DOMAIN_INDEX)}")
        check_source(images, len(rows), image_size)
        self.paths = PackedStrings(rows["path"].astype(str).tolist())
        self.csv_rows = (
            rows["row"].to_numpy(dtype=np.int64) if "row" in rows else np.zeros(len(rows), np.int64)
        )
        targets, mask = apply_policy(rows, policy)  # N x 5 each
        self.targets = torch.from_numpy(targets)
        self.mask = torch.from_numpy(mask)
        self.domains = torch.from_numpy(rows["domain"].map(DOMAIN_INDEX).to_numpy(dtype=np.int64).copy())
        self.photo = self.domains.numpy() == DOMAIN_INDEX["photo"]  # numpy: read per item, cheaply
        self.heads = torch.from_numpy(head_indices(rows["domain"].tolist(), head_names, domain_heads, head))
        self.image_size = image_size
        self.spec = as_preprocessing(preprocessing)
        self.decoding = make_decoding(image_size, self.spec, draft)
        if images is not None and self.spec.rectify is not None:
            check_store_photos(rows)
        self.augment = tuple(augment)
        self.seed = seed
        self.images = images

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        """The image file of row `index`."""
        return self.paths[index]

    def load(self, index: int) -> np.ndarray:
        """Row `index`'s image, uint8 S x S: from `images` when given, else decoded from its file."""
        if self.images is not None:
            return np.asarray(self.images[index])
        return read_row(self.decoding, self.csv_rows, index, self.paths[index], photo=self.is_photo(index))

    def is_photo(self, index: int) -> bool:
        """Whether row `index`'s domain is photo."""
        return bool(self.photo[index])

    def hand_over(self, index: int, epoch: int = 0) -> np.ndarray:
        """What a worker hands over for row `index` in `epoch`: uint8 S x S, augmented (seeded by
        (seed, epoch, index)) and histogram-equalised for histeq. May be read-only."""
        image = self.load(index)  # S x S
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            image = augment(image, self.augment, rng)
        return input_uint8(image, self.spec)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self.hand_over(index, epoch)
        image = torch.from_numpy(image if image.flags.writeable else image.copy())[None]  # 1 x S x S
        return {
            "image": image,
            "target": self.targets[index],  # 5
            "mask": self.mask[index],  # 5
            "head": self.heads[index],
            "domain": self.domains[index],
            "index": index,
        }

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> Batch:
        """A batch of keys read whole (what a DataLoader asks a worker for): the same tensors as
        collating `self[key]` one by one, with one copy per image into the batch.

        Images go straight into one B x 1 x S x S tensor, in shared memory inside a worker (the
        main process receives it without a copy); images read unchanged from the store (no
        augmentation, no histeq) are copied there from its memory map directly. `collate` hands
        the Batch on as it is.
        """
        pairs = [k if isinstance(k, tuple) else (int(k), 0) for k in keys]
        index = [i for i, _ in pairs]
        n, size = len(index), self.image_size
        shared = get_worker_info() is not None
        storage = (
            torch.UntypedStorage._new_shared(n * size * size)
            if shared
            else torch.UntypedStorage(n * size * size)
        )
        images = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n, 1, size, size))
        out = images.numpy()[:, 0]  # B x S x S
        read_into = getattr(self.images, "read_into", None)
        plain = not self.augment and self.spec.name != "histeq"  # the images as decoded
        if plain and read_into is not None:
            read_into(index, out)
        elif plain and self.images is None:
            for j, i in enumerate(index):
                read_row(self.decoding, self.csv_rows, i, self.paths[i], out[j], self.is_photo(i))
        else:
            for j, (i, epoch) in enumerate(pairs):
                out[j] = self.hand_over(i, epoch)
        rows = torch.tensor(index, dtype=torch.int64)
        return Batch(
            {
                "image": images,  # B x 1 x S x S
                "target": self.targets[rows],  # B x 5
                "mask": self.mask[rows],  # B x 5
                "head": self.heads[rows],  # B
                "domain": self.domains[rows],  # B
                "index": rows,  # B
            }
        )


class Batch(Sequence[dict[str, Any]]):
    """A batch read whole (CatalogDataset.__getitems__): the collated dict, and its samples on demand
    (so torch's default_collate, given one, still builds the same batch)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["index"])

    def __getitem__(self, j: int) -> dict[str, Any]:  # type: ignore[override]
        return {k: (int(v[j]) if k == "index" else v[j]) for k, v in self.batch.items()}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """torch's default_collate, except that a Batch read whole is handed on as it is (no second copy)."""
    return samples.batch if isinstance(samples, Batch) else default_collate(list(samples))
