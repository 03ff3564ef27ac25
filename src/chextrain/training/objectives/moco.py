"""The `moco` objective: MoCo v2 pre-training of an encoder, plugged into the stage lifecycle.

The maths (encoders, queue, InfoNCE, DDP key gathering, shuffle-BN) is training/moco.py; the
views are training/moco_data.py. The output bundle holds the query encoder (heads untrained,
meta `objective: moco`); nothing is evaluated and there is no validation loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet
from chextrain.training.loaders import TrainData, stage_store
from chextrain.training.moco import MocoModule
from chextrain.training.moco_data import moco_dataset
from chextrain.training.objectives.plan import LoaderSettings, Outcome, Plan
from chextrain.training.stage import MocoStage


class Moco:
    """The `moco` objective for the stage lifecycle (see training/objectives/__init__.py)."""

    load_heads = False  # only the encoder matters; a bundle's heads are not loaded

    def plan(
        self,
        stage: MocoStage,
        model: CXRNet,
        catalog: pd.DataFrame,
        train_rows: pd.DataFrame,
        loader: LoaderSettings,
    ) -> Plan:
        """MocoModule over the encoder; views of the train rows, real partners from the train split
        (read from the stage's image store when it has one)."""
        module = MocoModule(
            model.encoder,
            model.num_features,
            spec=stage.moco,
            optimizer=stage.optimizer,
            seed=stage.seed,
            preprocessing=stage.preprocessing,
            stage_name=stage.name,
        )
        pool = catalog.loc[catalog["split"] == "train"].reset_index(drop=True)  # real photo partners
        data = TrainData(
            moco_dataset(stage, train_rows, pool, stage_store(stage)),
            batch_size=stage.batch_size,
            seed=stage.seed,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        return Plan(module, data)

    def select_weights(self, stage: MocoStage, plan: Plan, out_dir: Path) -> str:
        """MoCo keeps the last weights (there is no validation to pick a best one)."""
        return "last"

    def finish(
        self,
        stage: MocoStage,
        model: CXRNet,
        plan: Plan,
        catalog: pd.DataFrame,
        out_dir: Path,
        meta: dict[str, Any],
    ) -> Outcome:
        """Write the encoder's bundle with the final MoCo loss and accuracy; no evaluation."""
        module = plan.module
        assert isinstance(module, MocoModule)
        moco = {
            "final_loss": module.last.get("loss"),
            "final_acc1": module.last.get("acc1"),
            "queue_size": stage.moco.queue_size,
        }
        bundle = {
            "objective": "moco",
            "image_size": meta["image_size"],
            "preprocessing": meta["preprocessing"],
            "domain_heads": dict.fromkeys(("digital", "photo"), model.head_names[0]),
            "stage": meta["stage"],
            "label": meta["label"],
            "metrics": {},
            "config": meta["config"],
            "config_hash": meta["config_hash"],
            "training": meta["training"],
            "moco": moco,
        }
        save_bundle(model, out_dir, bundle)
        return Outcome({}, {"moco": moco})


MOCO = Moco()
