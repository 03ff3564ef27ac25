"""The supervised objective: masked BCE through per-sample heads (every strategy of the paper's Table 1).

Every paper strategy is this module with other settings: which parameters train (apply_freeze),
which head each sample goes through (the batch's `head` indices), and whether the domain router
learns. The optimiser is built from the STAGE's spec over the trainable parameters only; an
`init` from another stage brings weights, never its optimiser or learning rate.

After training, `finish` tunes thresholds on validation (per head, on the rows it serves),
evaluates every dataset of each evaluated split (a digital-only stage is scored on photos too),
calibrates OOD and fits a temperature per head on validation, and writes the bundle. A model whose
router picks between two heads is scored through its router, as deployed; its oracle routing (each
image's head from its known domain) is saved beside (predictions_<split>_oracle.parquet).
Validation predictions are always saved, evaluated or not.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from chextrain.data.dataset import CatalogDataset
from chextrain.data.transforms import Preprocessing, as_preprocessing, to_network_input
from chextrain.evaluation.calibration import head_temperatures
from chextrain.evaluation.metrics import UndefinedAUCWarning, pathology_metrics
from chextrain.evaluation.predict import (
    ORACLE,
    Predictions,
    calibrate_ood_or_none,
    deployed_head,
    predict_rows,
    router_accuracy,
    tune_head_thresholds,
    write_evaluation,
    write_predictions,
)
from chextrain.labels import SLUGS
from chextrain.models.bundle import save_bundle
from chextrain.models.net import ROUTER, CXRNet, apply_freeze
from chextrain.training.checkpoints import BEST_CKPT, CKPT_DIR
from chextrain.training.finite import not_finite_on_any_rank
from chextrain.training.loaders import TrainValData, stage_rows, stage_store
from chextrain.training.objectives.plan import LoaderSettings, Outcome, Plan
from chextrain.training.optim import make_optimizer
from chextrain.training.specs import OptimizerSpec
from chextrain.training.stage import SupervisedStage
from chextrain.training.stage_errors import NonFiniteError, non_finite_message


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits per element, averaged over the unmasked elements (mask 0 = policy ignores).

    logits, target, mask: B x 5. With every mask 1 this is BCEWithLogitsLoss' mean.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")  # B x 5
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


class SupervisedModule(L.LightningModule):
    """Trains a CXRNet on batches from data.dataset (image, target, mask, head, domain, index).

    Images arrive uint8 B x 1 x S x S and become the network input here, on the device
    (transforms.to_network_input with the stage's preprocessing); float B x 3 x S x S is used as is.

    Args:
        model: the network, already initialised (weights only).
        optimizer: the stage's optimiser spec.
        freeze: none | encoder | last-block.
        train_heads: heads that learn (plus "router" to train the domain router).
        channels_last: use the channels-last memory format (set on CUDA).
        preprocessing: how uint8 images become the network input (the stage's).
        name, init: the stage's name and init, for the error a non-finite loss raises.
    """

    def __init__(
        self,
        model: CXRNet,
        *,
        optimizer: OptimizerSpec,
        freeze: str = "none",
        train_heads: list[str] | tuple[str, ...] = ("shared",),
        channels_last: bool = False,
        preprocessing: str | Preprocessing = "imagenet",
        name: str = "stage",
        init: str = "",
    ) -> None:
        super().__init__()
        self.model = model
        self.stage_name, self.init = name, init
        self.started_finite = True  # the weights training started from (init or checkpoint) were finite
        self.preprocessing = as_preprocessing(preprocessing)
        self.optimizer_spec = optimizer
        self.trainable = apply_freeze(model, freeze, list(train_heads))
        self.train_router = model.router is not None and ROUTER in train_heads
        self.channels_last = channels_last
        self.samples_seen = 0  # training samples this rank has seen (checkpointed)
        self.samples_per_rank: list[int] = []  # filled at the end of training
        self._val: list[tuple[torch.Tensor, ...]] = []

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]  # uint8 B x 1 x S x S (or float B x 3 x S x S)
        if x.dtype == torch.uint8:
            x = to_network_input(x, self.preprocessing)  # B x 3 x S x S, on the device
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.started_finite = all_finite(self.model)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = self._images(batch)
        out = self.model.forward_all(images)
        rows = torch.arange(out["logits"].shape[0], device=self.device)
        logits = out["logits"][rows, batch["head"]]  # B x 5, each sample through its head
        loss = masked_bce(logits, batch["target"], batch["mask"])
        self._stop_if_not_finite(loss, images, batch)
        self.log("train/bce", loss, on_step=True, prog_bar=False, batch_size=len(rows))
        if self.train_router:
            router = F.binary_cross_entropy_with_logits(out["router"].float(), batch["domain"].float())
            self.log("train/router_bce", router, on_step=True, batch_size=len(rows))
            loss = loss + router
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(rows))
        self.samples_seen += len(rows)
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor, images: torch.Tensor, batch: dict[str, Any]) -> None:
        """Raise NonFiniteError when the loss is NaN / inf (on any DDP rank), before the weights see it."""
        if not not_finite_on_any_rank(self, loss):
            return
        files = self._train_files(batch["index"]) if not bool(torch.isfinite(images).all()) else []
        hint = self.hint(files)
        raise NonFiniteError(
            non_finite_message(
                self.stage_name,
                f"the training loss is {float(loss.detach())}",
                f"at training step {self.global_step + 1} (epoch {self.current_epoch})",
                hint,
            )
        )

    def hint(self, files: list[str]) -> str:
        """What most likely made a value non-finite: the starting weights, an input file, else the lr."""
        if not self.started_finite:
            where = f"init {self.init!r}" if self.init else "the init"
            return (
                f"the weights it started from hold NaN or inf values: check the init weights ({where}), "
                "or the checkpoint it resumed from"
            )
        if files:
            return f"the network input is not finite: check the input file(s) {', '.join(files[:3])}"
        return (
            f"the weights diverged: lower the learning rate (optimizer.lr = {self.optimizer_spec.lr:g}), "
            "or check the input files and the init weights"
        )

    def _train_files(self, index: torch.Tensor) -> list[str]:
        """The image files of some training-set indices (row numbers when the dataset is not at hand)."""
        trainer = self._trainer
        dataset = getattr(getattr(trainer, "datamodule", None), "train", None)
        if not hasattr(dataset, "path"):
            return [f"training row {int(i)}" for i in index.tolist()]
        return [dataset.path(int(i)) for i in index.tolist()]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model.forward_all(self._images(batch))
        rows = torch.arange(out["logits"].shape[0], device=self.device)
        probs = torch.sigmoid(out["logits"][rows, batch["head"]].float())  # B x 5
        router = torch.sigmoid(out["router"].float()) if "router" in out else torch.zeros_like(probs[:, 0])
        self._val.append((batch["index"], probs, batch["target"], batch["mask"], batch["domain"], router))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        index, probs, target, mask, domain, router = (torch.cat(t) for t in zip(*self._val, strict=True))
        self._val.clear()
        if self._trainer is not None and self.trainer.world_size > 1:  # padded shards: gather, drop repeats
            index, probs, target, mask, domain, router = (
                self.all_gather(t).flatten(0, 1) for t in (index, probs, target, mask, domain, router)
            )
        keep = np.unique(index.cpu().numpy(), return_index=True)[1]
        probs, target, mask = (t[keep].cpu().double() for t in (probs, target, mask))
        if not bool(torch.isfinite(probs).all()):  # every rank gathered the same: all stop
            n = int((~torch.isfinite(probs)).any(dim=1).sum())
            what = f"{n} validation image(s) got NaN / inf probabilities"
            where = f"at the validation after step {self.global_step}"
            raise NonFiniteError(non_finite_message(self.stage_name, what, where, self.hint([])))
        logs = validation_metrics(target.numpy(), probs.numpy(), mask.numpy())
        if self.model.router is not None:
            d, r = domain[keep].cpu().float(), router[keep].cpu().float()
            logs["val/router_accuracy"] = float(((r > 0.5).float() == d).float().mean())
        for key, value in logs.items():
            self.log(key, value, sync_dist=False, rank_zero_only=False)

    def on_train_end(self) -> None:
        seen = torch.tensor([self.samples_seen], device=self.device)
        self.samples_per_rank = [int(v) for v in self.all_gather(seen).flatten().tolist()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.trainable, self.optimizer_spec)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["samples_seen"] = self.samples_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))


def all_finite(model: torch.nn.Module) -> bool:
    """Every parameter and floating-point buffer of the model is finite."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def check_finite_predictions(table: pd.DataFrame, stage: str, split: str, step: int) -> None:
    """Raise NonFiniteError when a predictions table holds NaN / inf probabilities (named by file)."""
    probs = table[[f"prob_{s}" for s in SLUGS]].to_numpy(dtype=np.float64)  # N x 5
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        files = ", ".join(table.loc[bad, "path"].astype(str).head(3))
        what = f"{int(bad.sum())} {split} image(s) got NaN / inf probabilities after training (e.g. {files})"
        hint = "the trained weights are not finite: lower the learning rate, or check the init weights"
        raise NonFiniteError(non_finite_message(stage, what, f"(training ended at step {step})", hint))


def validation_metrics(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """val/loss, val/auc_<slug> and val/auc_mean (NaN-aware) from N x 5 arrays.

    A pathology with one class in validation logs a NaN AUC without a warning: this runs at every
    validation, and the stage's evaluation after training warns once about the same labels.
    """
    eps = 1e-7
    p = np.clip(probs, eps, 1 - eps)
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    logs = {"val/loss": float((bce * mask).sum() / max(mask.sum(), 1.0))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedAUCWarning)
        per = pathology_metrics(targets, probs, mask, dict.fromkeys(SLUGS, 0.5))
    aucs = [float(per[s]["auc"]) for s in SLUGS]
    for slug, auc in zip(SLUGS, aucs, strict=True):
        logs[f"val/auc_{slug}"] = auc
    finite = [a for a in aucs if np.isfinite(a)]
    logs["val/auc_mean"] = float(np.mean(finite)) if finite else float("nan")
    return logs


def save_split(
    predictions: Predictions,
    out_dir: Path,
    split: str,
    thresholds: dict[str, dict[str, float]],
    evaluated: bool,
) -> dict[str, Any]:
    """Write a scored split's predictions and metrics (and a routed model's oracle routing beside them).

    A split the stage does not evaluate (validation of an `evaluate: [test]` stage) still saves its
    predictions tables, which the report tunes thresholds on, but no metrics file and no metrics;
    an evaluated one returns {"<split>/<group>": at_0.5} for done.json and the bundle.
    """
    if not evaluated:
        write_predictions(predictions.table, out_dir, split)
        if predictions.oracle is not None:
            write_predictions(predictions.oracle, out_dir, f"{split}_{ORACLE}")
        return {}
    if predictions.oracle is not None:
        write_evaluation(predictions.oracle, out_dir, split, None, thresholds, routing=ORACLE)
    document = write_evaluation(predictions.table, out_dir, split, None, thresholds)
    return {f"{split}/{group}": entry["at_0.5"] for group, entry in document["groups"].items()}


class Supervised:
    """The `supervised` objective for the stage lifecycle (see training/objectives/__init__.py)."""

    load_heads = True  # an init's heads start the heads of the same name

    def plan(
        self,
        stage: SupervisedStage,
        model: CXRNet,
        catalog: pd.DataFrame,
        train_rows: pd.DataFrame,
        loader: LoaderSettings,
    ) -> Plan:
        """SupervisedModule over the stage's train rows, validated on its val rows.

        With a `data.store`, every image the stage reads (train, val and the evaluated splits) is
        prepared first, and the datasets read the store.
        """
        val_rows = stage_rows(stage, catalog, "val")
        module = SupervisedModule(
            model,
            optimizer=stage.optimizer,
            freeze=stage.freeze,
            train_heads=stage.train_heads,
            channels_last=loader.channels_last,
            preprocessing=stage.preprocessing,
            name=stage.name,
            init=stage.init,
        )
        store = stage_store(stage)
        if store is not None:
            evaluated = catalog.loc[catalog["split"].isin(["val", *stage.evaluate])]
            store.prepare([*train_rows["path"], *val_rows["path"], *evaluated["path"]])

        def dataset(rows: pd.DataFrame, train: bool) -> CatalogDataset:
            return CatalogDataset(
                rows,
                image_size=stage.image_size,
                preprocessing=stage.preprocessing,
                policy=stage.policy,
                head_names=stage.heads,
                domain_heads=stage.domain_heads,
                augment=stage.augment.build() if train else (),
                seed=stage.seed,
                images=None if store is None else store.images(rows["path"].astype(str).tolist()),
            )

        data = TrainValData(
            dataset(train_rows, True),
            dataset(val_rows, False),
            batch_size=stage.batch_size,
            seed=stage.seed,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        return Plan(module, data, val_rows=len(val_rows))

    def select_weights(self, stage: SupervisedStage, plan: Plan, out_dir: Path) -> str:
        """Load best.ckpt's weights into the module when the stage selects `best` and one exists."""
        best = out_dir / CKPT_DIR / f"{BEST_CKPT}.ckpt"
        if stage.select == "last" or not best.exists():
            return "last"
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        plan.module.load_state_dict(state)
        return "best"

    def finish(
        self,
        stage: SupervisedStage,
        model: CXRNet,
        plan: Plan,
        catalog: pd.DataFrame,
        out_dir: Path,
        meta: dict[str, Any],
    ) -> Outcome:
        """Tune thresholds on val, evaluate, calibrate OOD, write the bundle; metrics at 0.5."""
        kwargs = {
            "domain_heads": stage.domain_heads,
            "image_size": stage.image_size,
            "preprocessing": stage.preprocessing,
            "batch_size": max(stage.batch_size, 32),
            "policy": stage.policy,
            "store": stage_store(stage),
            "head": deployed_head(model, stage.domain_heads),  # a routed model: through its router
        }
        scored: dict[str, Predictions] = {}
        for split in ("val", "test", "holdout"):
            rows = catalog.loc[catalog["split"] == split].reset_index(drop=True)
            if not rows.empty and (split == "val" or split in stage.evaluate):
                # one pass: the validation pass also yields the OOD features for calibration
                scored[split] = predict_rows(model, rows, ood_features=split == "val", **kwargs)
                check_finite_predictions(
                    scored[split].table, stage.name, split, meta["training"]["global_step"]
                )
        thresholds = tune_head_thresholds(scored["val"].table) if "val" in scored else {}
        metrics: dict[str, Any] = {}
        for split, predictions in scored.items():
            metrics.update(save_split(predictions, out_dir, split, thresholds, split in stage.evaluate))
        bundle = {
            "image_size": meta["image_size"],
            "preprocessing": meta["preprocessing"],
            "thresholds": thresholds,
            "domain_heads": stage.domain_heads,
            "stage": meta["stage"],
            "label": meta["label"],
            "metrics": metrics,
            "config": meta["config"],
            "config_hash": meta["config_hash"],
            "policy": stage.policy,
            "training": meta["training"],
        }
        if "val" in scored:
            router = router_accuracy(scored["val"].table)
            if router is not None:
                bundle["router"] = metrics["val/router"] = router
            bundle["ood"] = calibrate_ood_or_none(model, scored["val"].features)
            bundle["temperature"] = head_temperatures(scored["val"].table)  # calibration, per head
        save_bundle(model, out_dir, bundle)
        return Outcome(metrics)


SUPERVISED = Supervised()
