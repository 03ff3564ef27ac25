"""Torch Dataset over catalog rows, and a sampler/loader pair that makes training resumable mid-epoch.

Each item is a dict: image 3 x S x S float32, target 5, mask 5 (policy applied), head (index of
the classifier head that serves the row), domain (0 digital / 1 photo) and index (the row's
position). Augmentation draws from a generator seeded by (seed, epoch, index), so an item is
the same whichever worker makes it and whenever: a resumed run sees the very same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from chextrain.data.images import load_image
from chextrain.data.transforms import Augment, Preprocessing, augment, preprocess, resize
from chextrain.fileio import atomic_write
from chextrain.labels import Policy, apply_policy

DOMAIN_INDEX: dict[str, int] = {"digital": 0, "photo": 1}


class DatasetError(ValueError):
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


class CatalogDataset(Dataset):
    """Catalog rows -> training/evaluation samples.

    Args:
        rows: catalog rows (schema in docs/architecture.md); their order defines `index`.
        image_size: side S of the square network input.
        preprocessing: a Preprocessing, its name or its dict (see transforms.preprocess).
        policy: uncertainty policy for targets and mask (labels.apply_policy).
        head_names / domain_heads / head: how each row picks its head (see head_indices).
        augment: augmentation callables applied before preprocessing (training only).
        seed: seeds the per-sample augmentation generator together with (epoch, index).
        cache: optional N x S x S uint8 array (e.g. a np.load(mmap_mode="r") of pre-resized
            images, row-aligned with `rows`) read instead of decoding the files.
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
        cache: np.ndarray | None = None,
    ) -> None:
        rows = rows.reset_index(drop=True)
        unknown = sorted(set(rows["domain"]) - set(DOMAIN_INDEX))
        if unknown:
            raise DatasetError(f"unknown domain(s) {unknown}; expected {list(DOMAIN_INDEX)}")
        if cache is not None and cache.shape[0] != len(rows):
            raise DatasetError(f"cache holds {cache.shape[0]} images for {len(rows)} rows")
        self.paths: list[str] = rows["path"].astype(str).tolist()
        self.csv_rows: list[int] = rows["row"].astype(int).tolist() if "row" in rows else [0] * len(rows)
        targets, mask = apply_policy(rows, policy)  # N x 5 each
        self.targets = torch.from_numpy(targets)
        self.mask = torch.from_numpy(mask)
        self.domains = torch.from_numpy(rows["domain"].map(DOMAIN_INDEX).to_numpy(dtype=np.int64).copy())
        self.heads = torch.from_numpy(head_indices(rows["domain"].tolist(), head_names, domain_heads, head))
        self.image_size = image_size
        self.preprocessing = preprocessing
        self.augment = tuple(augment)
        self.seed = seed
        self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """The decoded uint8 image of row `index` (from the cache when there is one)."""
        if self.cache is not None:
            return np.asarray(self.cache[index])
        try:
            return load_image(self.paths[index])
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"cannot read the image of catalog row {index} (CSV line {self.csv_rows[index]}): "
                f"{self.paths[index]}: {err}"
            ) from err

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self.load(index)
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            image = augment(image, self.augment, rng)
        return {
            "image": preprocess(image, self.image_size, self.preprocessing),  # 3 x S x S
            "target": self.targets[index],  # 5
            "mask": self.mask[index],  # 5
            "head": self.heads[index],
            "domain": self.domains[index],
            "index": index,
        }


def build_cache(
    rows: pd.DataFrame, size: int, path: Path | None = None, resize_mode: str = "stretch"
) -> np.ndarray:
    """Decode and resize every row's image once: N x size x size uint8, row-aligned (the `cache`).

    With `path`, the array is written there atomically as .npy and returned memory-mapped
    read-only, so loader workers share it through the page cache instead of each holding a copy.
    """
    dataset = CatalogDataset(rows, image_size=size)
    shape = (len(dataset), size, size)

    def fill(out: np.ndarray) -> np.ndarray:
        for i in range(len(dataset)):
            out[i] = resize(dataset.load(i), size, resize_mode)
        return out

    if path is None:
        return fill(np.empty(shape, dtype=np.uint8))

    def write(tmp: Path) -> None:
        out = fill(np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape))
        out.flush()
        del out

    atomic_write(path, write)  # a killed build leaves no half-filled cache behind
    return np.load(Path(path), mmap_mode="r")


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
) -> ResumableLoader:
    """The loader used for training (shuffle=True) and validation (shuffle=False, padded shards)."""
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return ResumableLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=False,
    )
