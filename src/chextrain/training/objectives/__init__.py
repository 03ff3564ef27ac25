"""Training objectives: what a stage optimises, plugged into the one stage lifecycle.

The lifecycle (training/lifecycle.py) resolves the init, caches by hash, resumes, seeds, builds
the Trainer, fits, and writes done.json. An objective supplies the rest, through three calls:

- `plan(stage, model, catalog, train_rows, loader)` -> Plan: the LightningModule and its data;
- `select_weights(stage, plan, out_dir)` -> "last" | "best": which weights go into the bundle;
- `finish(stage, model, plan, catalog, out_dir, meta)` -> Outcome: evaluate (or not) and write
  the bundle; `model` comes float32 and contiguous on the CPU (the lifecycle moves it once);
  `meta` holds what every bundle records (stage, config, hash, training facts).

Adding an objective = a module here with an object that has these three calls and `load_heads`
(whether an init's heads are loaded), one entry in OBJECTIVES, and its stage type in
training/stage.py's `Stage` union.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from chextrain.models.net import CXRNet
from chextrain.training.objectives.corners import CORNERS
from chextrain.training.objectives.moco import MOCO
from chextrain.training.objectives.plan import LoaderSettings, Outcome, Plan
from chextrain.training.objectives.supervised import SUPERVISED
from chextrain.training.stage import BaseStage, StageError


class Objective(Protocol):
    """What the lifecycle needs of an objective (see the module docstring)."""

    load_heads: bool

    def plan(
        self,
        stage: Any,
        model: CXRNet,
        catalog: pd.DataFrame,
        train_rows: pd.DataFrame,
        loader: LoaderSettings,
    ) -> Plan: ...

    def select_weights(self, stage: Any, plan: Plan, out_dir: Path) -> str: ...

    def finish(
        self,
        stage: Any,
        model: CXRNet,
        plan: Plan,
        catalog: pd.DataFrame,
        out_dir: Path,
        meta: dict[str, Any],
    ) -> Outcome: ...


OBJECTIVES: dict[str, Objective] = {"supervised": SUPERVISED, "moco": MOCO, "corners": CORNERS}


def objective_of(stage: BaseStage) -> Objective:
    """The objective that trains `stage` (by its `objective` field)."""
    name = str(getattr(stage, "objective", ""))
    if name not in OBJECTIVES:
        raise StageError(f"stage {stage.name!r}: objective {name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "LoaderSettings", "Objective", "Outcome", "Plan", "objective_of"]
