"""What an objective hands the stage lifecycle (Plan) and gets back from its finish (Outcome)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L


@dataclass(frozen=True)
class LoaderSettings:
    """How a stage's loaders run on this machine (decided by the lifecycle)."""

    num_workers: int
    pin_memory: bool
    channels_last: bool  # set on CUDA


@dataclass
class Plan:
    """An objective's training set-up: the module Lightning fits and the data it reads.

    val_rows: validation rows (0: no validation loop); info: extra facts kept with the run.
    """

    module: L.LightningModule
    data: L.LightningDataModule
    val_rows: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What finishing a stage gave: metrics {"<split>/<group>": {...}} and extra done.json fields."""

    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
