"""A stage's rows, its image store and loaders: the catalog split the stage's way, the prepared image
store of `data.store`, and resumable per-rank loaders."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import Dataset

from chextrain.data.catalog import read_catalog, select_releases
from chextrain.data.loader import make_loader, worker_init
from chextrain.data.rectified import make_decoding
from chextrain.data.splits import assign_splits, sample_budget
from chextrain.data.store import ImageStore
from chextrain.training.stage import BaseStage, StageError


def prepare_catalog(
    stage: BaseStage, data_root: Path | None, catalog: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The catalog (read from data_root unless given) with the stage's train/val/test split.

    Read with the stage's `data.releases` (the release to use of a dataset found twice).
    """
    if catalog is None:
        if data_root is None:
            raise StageError("train_stage needs data_root or a catalog")
        catalog = read_catalog(Path(data_root), releases=stage.data.releases)
    elif stage.data.releases and "release" in catalog.columns:
        catalog = select_releases(catalog, stage.data.releases)
    return assign_splits(catalog, **stage.split.model_dump())


def stage_rows(stage: BaseStage, catalog: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of a split that the stage's data spec selects (budget: train split only)."""
    rows = catalog.loc[catalog["dataset"].isin(stage.data.train)]
    if stage.data.kinds is not None:
        rows = rows.loc[rows["kind"].isin(stage.data.kinds)]
    rows = rows.loc[rows["split"] == split]
    budget = stage.data.budget
    if budget is not None and split == "train":
        seed = stage.seed if budget.seed is None else budget.seed
        rows = sample_budget(rows, budget.total, budget.digital, seed)
    return rows.reset_index(drop=True)


def seeded_worker_init(worker_id: int, rank: int) -> None:
    """loader.worker_init, then Lightning's worker seeding (which a set worker_init_fn replaces)."""
    worker_init(worker_id)
    pl_worker_init_function(worker_id, rank=rank)


def stage_store(stage: BaseStage, progress: bool = True) -> ImageStore | None:
    """The prepared image store of the stage's `data.store` at its image size and resize mode (None
    without one). Every stage and DDP rank naming the same folder shares it: images are decoded
    once per size and decoding (rectify included: data/rectified.py); a build is serialised by a
    file lock."""
    if stage.data.store is None:
        return None
    return ImageStore(
        stage.data.store, make_decoding(stage.image_size, stage.preprocessing), progress=progress
    )


class TrainData(L.LightningDataModule):
    """A training loader over `train`; each DDP rank draws its own shard of every epoch's order.

    The loader is data.loader.make_loader's: it resumes mid-epoch from a checkpoint.
    """

    def __init__(
        self, train: Dataset, *, batch_size: int, seed: int, num_workers: int, pin_memory: bool
    ) -> None:
        super().__init__()
        self.train = train
        self.batch_size, self.seed = batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def loader(self, dataset: Dataset, shuffle: bool) -> Any:
        """A resumable loader over `dataset`, sharded by this trainer's rank."""
        return make_loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=partial(seeded_worker_init, rank=self.trainer.global_rank),
        )

    def train_dataloader(self) -> Any:
        return self.loader(self.train, True)


class TrainValData(TrainData):
    """TrainData plus a validation loader over `val` (in order, sharded and padded by rank)."""

    def __init__(self, train: Dataset, val: Dataset, **kwargs: Any) -> None:
        super().__init__(train, **kwargs)
        self.val = val

    def val_dataloader(self) -> Any:
        return self.loader(self.val, False)
