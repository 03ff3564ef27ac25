"""The order and the workers of training and validation: a sampler whose epoch order is fixed by
(seed, epoch) and sharded by rank, and a DataLoader over it whose position is saved in checkpoints,
so a run killed mid-epoch resumes on the very same batches (make_loader builds them)."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from chextrain.data.dataset import CatalogDataset, collate


def worker_init(worker_id: int) -> None:
    """A loader worker's start: freeze the garbage collector's view of what the worker inherited.

    A forked worker shares the parent's memory copy-on-write, and the first full collection would
    write into every inherited container object (tens of MB of copied pages per worker); frozen,
    they are never traversed. Objects the worker makes itself are collected as usual.
    """
    gc.freeze()


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
