"""Torch Dataset over catalog rows, and a sampler/loader pair that makes training resumable mid-epoch.

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

import gc
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
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


def worker_init(worker_id: int) -> None:
    """A loader worker's start: freeze the garbage collector's view of what the worker inherited.

    A forked worker shares the parent's memory copy-on-write, and the first full collection would
    write into every inherited container object (tens of MB of copied pages per worker); frozen,
    they are never traversed. Objects the worker makes itself are collected as usual.
    """
    gc.freeze()


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """torch's default_collate, except that a Batch read whole is handed on as it is (no second copy)."""
    return samples.batch if isinstance(samples, Batch) else default_collate(list(samples))


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (index, epoch) in an order fixed by (seed, epoch), this rank's shard only.

    Like DistributedSampler, each rank takes every world_size-th index of the epoch's order,
    padded by repetition so all ranks have the same length. `resume(epoch, skip)` makes the
    next pass over that epoch start after its first `skip` indices (a mid-epoch restart).
    """

    def __init__(
        self, n: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, indices to skip)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's indices for an epoch."""
        idx = np.arange(self.n)
        if self.shuffle:
            idx = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        if self.world_size > 1 and self.n:
            idx = np.resize(idx, len(self) * self.world_size)  # pad by repeating from the start
        return idx[self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        """Start the next pass over `epoch` after its first `skip` indices."""
        self.epoch = epoch
        self._skip = (epoch, skip)

    def pending_skip(self) -> int:
        """How many indices the next pass skips (only if it is the resumed epoch)."""
        return self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) if self.n else 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.pending_skip()
        self._skip = None
        for i in self.order(epoch)[skip:]:
            yield int(i), epoch


class ResumableLoader(DataLoader):
    """A DataLoader over an EpochSampler whose position in the epoch is saved in checkpoints.

    Lightning stores `state_dict()` in every checkpoint and, when it resumes mid-epoch, calls
    `load_state_dict()` before iterating; the next pass then skips the batches already trained
    on, without loading them. The real iterator is created on the first `next()`, after Lightning
    has called `set_epoch`, so worker processes always draw the current epoch's order.
    """

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.epoch_sampler = sampler
        self.batches_done = 0  # batches yielded so far in the current epoch (skipped ones included)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing here runs before the first next(), i.e. after Lightning's set_epoch.
        self.batches_done = self.epoch_sampler.pending_skip() // (self.batch_size or 1)
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_sampler.epoch, "batches": self.batches_done}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch_sampler.resume(int(state["epoch"]), int(state["batches"]) * (self.batch_size or 1))


def make_loader(
    dataset: CatalogDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    worker_init_fn: Callable[[int], None] = worker_init,
) -> ResumableLoader:
    """The loader used for training (shuffle=True) and validation (shuffle=False, padded shards).

    Batches come from `collate`; workers start with `worker_init_fn` (which should call
    `worker_init`)."""
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    if num_workers > 0:
        # OpenCV (photo simulation) on one thread in each worker, as torch is there. Set here, before
        # the workers fork: a forked worker that changes OpenCV's thread count hangs when this
        # process had started OpenCV's thread pool.
        import cv2

        cv2.setNumThreads(1)
    return ResumableLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=False,
        collate_fn=collate,
        worker_init_fn=worker_init_fn,
    )
