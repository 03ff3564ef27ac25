"""Run one stage: catalog -> loaders -> Lightning Trainer -> bundle, thresholds and evaluation.

The output folder holds config.yaml (the resolved stage), checkpoints/last.ckpt (resumable;
written atomically every N steps and at each epoch end) and checkpoints/best.ckpt (by the
stage's monitor), logs/ (TensorBoard + CSV), model.safetensors + model.json, predictions and
metrics per evaluated split, and done.json last: a folder with done.json is never trained again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from chextrain.data.catalog import read_catalog
from chextrain.data.dataset import CatalogDataset, make_loader
from chextrain.data.splits import assign_splits, sample_budget
from chextrain.data.transforms import as_preprocessing
from chextrain.evaluation.predict import (
    jsonable,
    ood_calibration,
    predict,
    router_accuracy,
    tune_head_thresholds,
    write_evaluation,
)
from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet
from chextrain.models.weights import expected_input, init_model
from chextrain.training.checkpoints import AtomicCheckpointIO, LastCheckpoint
from chextrain.training.stage import (
    REF_PREFIX,
    Stage,
    StageError,
    config_hash,
    load_stage,
    resolved_config,
)
from chextrain.training.supervised import SupervisedModule

DONE_FILE, CONFIG_FILE = "done.json", "config.yaml"
CKPT_DIR, LAST_CKPT, BEST_CKPT = "checkpoints", "last.ckpt", "best"


class RunDirError(ValueError):
    """The output folder belongs to another configuration."""


@dataclass
class StageResult:
    """What `train_stage` made. metrics: {"<split>/<group>": {slug|average: {...}}, ...}."""

    out_dir: Path
    bundle: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    duration: float = 0.0
    resumed: bool = False
    cached: bool = False  # finished before: nothing was redone
    rank: int = 0  # a DDP worker other than rank 0 returns without bundle or metrics


class StageData(L.LightningDataModule):
    """Loaders for a stage; each DDP rank draws its own shard of every epoch's order."""

    def __init__(self, stage: Stage, train_rows: pd.DataFrame, val_rows: pd.DataFrame, *,
                 num_workers: int, pin_memory: bool) -> None:
        super().__init__()
        self.stage, self.train_rows, self.val_rows = stage, train_rows, val_rows
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def _dataset(self, rows: pd.DataFrame, train: bool) -> CatalogDataset:
        s = self.stage
        return CatalogDataset(rows, image_size=s.image_size, preprocessing=s.preprocess, policy=s.policy,
                              head_names=s.heads, domain_heads=s.domain_heads,
                              augment=s.augment.build() if train else (), seed=s.seed)

    def _loader(self, rows: pd.DataFrame, train: bool) -> Any:
        return make_loader(self._dataset(rows, train), batch_size=self.stage.batch_size, shuffle=train,
                           seed=self.stage.seed, rank=self.trainer.global_rank,
                           world_size=self.trainer.world_size, num_workers=self.num_workers,
                           pin_memory=self.pin_memory)

    def train_dataloader(self) -> Any:
        return self._loader(self.train_rows, True)

    def val_dataloader(self) -> Any:
        return self._loader(self.val_rows, False)


def prepare_catalog(stage: Stage, data_root: Path | None,
                    catalog: pd.DataFrame | None = None) -> pd.DataFrame:
    """The catalog (read from data_root unless given) with the stage's train/val/test split."""
    if catalog is None:
        if data_root is None:
            raise StageError("train_stage needs data_root or a catalog")
        catalog = read_catalog(Path(data_root))
    return assign_splits(catalog, **stage.split.model_dump())


def stage_rows(stage: Stage, catalog: pd.DataFrame, split: str) -> pd.DataFrame:
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


def resolve_init(init: str, resolve_ref: Callable[[str], Path] | None) -> str:
    """`stage:NAME` -> the folder resolve_ref gives for NAME; anything else unchanged."""
    if not init.startswith(REF_PREFIX):
        return init
    if resolve_ref is None:
        raise StageError(f"init {init!r} refers to another stage: run it in a study, or give the run folder")
    return str(resolve_ref(init[len(REF_PREFIX):]))


def apply_expected_input(stage: Stage, init: str) -> Stage:
    """The stage with the preprocessing / image size its init weights were trained on, where it sets none.

    `init` is resolved (see resolve_init); models.weights.expected_input says what the weights
    expect (a bundle's model.json, CovidPrognosis: histeq at 224 px, MoCo-CXR: its mean/std at
    320 px, imagenet: ImageNet's). A stage that sets `preprocess` (e.g. `preprocess: imagenet`, the
    paper's mismatch) or `image_size` keeps its own. Training, the bundle and prediction use the result.
    """
    expected = expected_input(init)
    update: dict[str, Any] = {}
    if "preprocess" not in stage.model_fields_set and "preprocessing" in expected:
        update["preprocess"] = as_preprocessing(expected["preprocessing"])
    if "image_size" not in stage.model_fields_set and "image_size" in expected:
        update["image_size"] = int(expected["image_size"])
    return stage.model_copy(update=update) if update else stage


def auto_workers(devices: int | str) -> int:
    """Loader worker processes per rank: the CPUs left after one per training process, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_node = devices if isinstance(devices, int) else max(1, torch.cuda.device_count())
    return max(0, min(8, cpus // per_node - 1))


def build_trainer(stage: Stage, out_dir: Path, *, progress: bool, has_val: bool,
                  steps_per_epoch: int) -> L.Trainer:
    """The Lightning Trainer for a stage (devices, precision, DDP, loggers, checkpoints)."""
    on_gpu = torch.cuda.is_available()
    precision = stage.precision
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    n_devices = stage.devices if isinstance(stage.devices, int) else max(1, torch.cuda.device_count())
    strategy: Any = "auto"
    if n_devices > 1 or stage.num_nodes > 1:
        strategy = DDPStrategy(process_group_backend=None if on_gpu else "gloo",
                               checkpoint_io=AtomicCheckpointIO())
    callbacks: list[Callback] = [LastCheckpoint(out_dir / CKPT_DIR / LAST_CKPT,
                                                stage.checkpoint_every_n_steps)]
    if has_val:
        callbacks.append(ModelCheckpoint(dirpath=out_dir / CKPT_DIR, filename=BEST_CKPT,
                                         monitor=stage.monitor, mode=stage.monitor_mode, save_top_k=1,
                                         save_last=False,
                                         auto_insert_metric_name=False, enable_version_counter=False,
                                         save_on_train_epoch_end=False))
    if progress:
        callbacks.append(RichProgressBar())
    val_every = stage.val_every_n_steps
    return L.Trainer(
        accelerator="auto",
        devices=stage.devices,
        num_nodes=stage.num_nodes,
        strategy=strategy,
        precision=precision,
        max_epochs=stage.epochs if stage.epochs is not None else -1,
        max_steps=stage.max_steps if stage.max_steps is not None else -1,
        val_check_interval=val_every if val_every else 1.0,
        check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # EpochSampler shards by rank itself (and resumes mid-epoch)
        deterministic=not on_gpu,
        benchmark=on_gpu,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()] if strategy == "auto" else None,
        logger=[TensorBoardLogger(out_dir, name="logs", version="tensorboard", default_hp_metric=False),
                CSVLogger(out_dir, name="logs", version="csv")],
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        enable_progress_bar=progress,
        enable_model_summary=progress,
        default_root_dir=out_dir,
    )


def _check_out_dir(out_dir: Path, stage: Stage, digest: str) -> dict[str, Any] | None:
    """done.json if the folder holds this config's finished run; raise if it holds another config's."""
    done = out_dir / DONE_FILE
    config = out_dir / CONFIG_FILE
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("config_hash") != digest:
            raise RunDirError(f"{out_dir} holds a finished run of another configuration (hash "
                              f"{record.get('config_hash')}, this stage {digest}); use another --out")
        return record
    if config.exists() and (out_dir / CKPT_DIR / LAST_CKPT).exists():
        try:
            old = config_hash(load_stage(config))
        except StageError:
            old = "unreadable"
        if old != digest:
            raise RunDirError(f"{out_dir} holds a checkpoint of another configuration ({config}: hash "
                              f"{old}, this stage {digest}); use another --out or delete it")
    return None


def finished_result(out_dir: Path, stage: Stage, digest: str) -> StageResult | None:
    """The result of a finished run of this config in out_dir (created if absent), else None."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = _check_out_dir(out_dir, stage, digest)
    if finished is None:
        return None
    return StageResult(out_dir, out_dir / "model.json", finished.get("metrics", {}),
                       finished.get("duration", 0.0), resumed=False, cached=True)


def seeded_training_rows(stage: Stage, data_root: Path | None,
                         catalog: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seed everything from the stage (explicitly), then (catalog, train rows); error if none."""
    L.seed_everything(stage.seed, workers=True, verbose=False)  # model init and Lightning's RNGs
    catalog = prepare_catalog(stage, data_root, catalog)
    train_rows = stage_rows(stage, catalog, "train")
    if train_rows.empty:
        raise StageError(f"stage {stage.name!r}: no training rows for data {stage.data.model_dump()} "
                         f"in {data_root}")
    return catalog, train_rows


def initial_model(stage: Stage, init: str, out_dir: Path, *, resumed: bool,
                  load_heads: bool) -> tuple[CXRNet, str]:
    """The stage's model and a note on its weights; a fresh run initialises it and writes config.yaml.

    A resumed run leaves the weights to the checkpoint Lightning restores.
    """
    model = CXRNet(stage.backbone, heads=stage.heads, router=stage.router)
    if resumed:
        return model, "weights from checkpoint (resumed)"
    note = init_model(model, init, load_heads=load_heads).summary()
    _write_yaml(out_dir / CONFIG_FILE, resolved_config(stage))
    return model, note


def train_stage(stage: Stage, data_root: Path | None, out_dir: Path, *,
                resolve_ref: Callable[[str], Path] | None = None, catalog: pd.DataFrame | None = None,
                progress: bool = True) -> StageResult:
    """Train one stage into out_dir (resuming from its checkpoint), then bundle and evaluate it.

    Args:
        stage: the validated stage.
        data_root: folder holding the CheXpert / CheXphoto releases (read unless `catalog`).
        out_dir: the stage's folder; a finished one (done.json of this config) is returned as is.
        resolve_ref: maps a referenced stage NAME (from `init: stage:NAME`) to its folder.
        catalog: an already-read catalog (its split column is recomputed from the stage's split).
        progress: show the rich progress bar and model summary.
    """
    if stage.objective == "moco":  # imported here: training.moco builds on this module
        from chextrain.training.moco import train_moco_stage
        return train_moco_stage(stage, data_root, out_dir, resolve_ref=resolve_ref, catalog=catalog,
                                progress=progress)
    t0 = time.time()
    out_dir = Path(out_dir)
    digest = config_hash(stage)
    cached = finished_result(out_dir, stage, digest)
    if cached is not None:
        return cached
    last = out_dir / CKPT_DIR / LAST_CKPT
    resumed = last.exists()
    catalog, train_rows = seeded_training_rows(stage, data_root, catalog)
    val_rows = stage_rows(stage, catalog, "val")
    init = resolve_init(stage.init, resolve_ref)
    model, init_note = initial_model(stage, init, out_dir, resumed=resumed, load_heads=True)
    stage = apply_expected_input(stage, init)
    on_gpu = torch.cuda.is_available()
    module = SupervisedModule(model, optimizer=stage.optimizer, freeze=stage.freeze,
                              train_heads=stage.train_heads, channels_last=on_gpu)
    workers = auto_workers(stage.devices) if stage.num_workers == "auto" else stage.num_workers
    data = StageData(stage, train_rows, val_rows, num_workers=workers, pin_memory=on_gpu)
    steps = -(-len(train_rows) // stage.batch_size)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = build_trainer(stage, out_dir, progress=progress, has_val=not val_rows.empty,
                                steps_per_epoch=steps)
        trainer.fit(module, datamodule=data, ckpt_path=last if resumed else None, weights_only=True)
    finally:  # Trainer(deterministic=True) switches a process-wide flag: give it back
        torch.use_deterministic_algorithms(was_deterministic)
    if trainer.global_rank != 0:
        return StageResult(out_dir, out_dir / "model.json", rank=trainer.global_rank, resumed=resumed)
    selected = _select_weights(stage, module, out_dir)
    train_info = {"global_step": trainer.global_step, "epochs": trainer.current_epoch,
                  "world_size": trainer.world_size, "samples_seen_per_rank": module.samples_per_rank,
                  "lr": [g["lr"] for g in trainer.optimizers[0].param_groups], "weights": selected,
                  "train_rows": len(train_rows), "val_rows": len(val_rows), "init": init_note}
    metrics = finish_stage(stage, model, catalog, out_dir, train_info=train_info, digest=digest)
    duration = time.time() - t0
    record = {"config_hash": digest, "stage": stage.name, "label": stage.title, "duration": duration,
              "resumed": resumed, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **train_info,
              "metrics": metrics}
    _write_json(out_dir / DONE_FILE, record)
    return StageResult(out_dir, out_dir / "model.json", metrics, duration, resumed=resumed)


def _select_weights(stage: Stage, module: SupervisedModule, out_dir: Path) -> str:
    """Load best.ckpt's weights into the module when the stage selects `best` and one exists."""
    best = out_dir / CKPT_DIR / f"{BEST_CKPT}.ckpt"
    if stage.select == "last" or not best.exists():
        return "last"
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return "best"


def finish_stage(stage: Stage, model: CXRNet, catalog: pd.DataFrame, out_dir: Path, *,
                 train_info: dict[str, Any], digest: str) -> dict[str, Any]:
    """Tune thresholds on val (per head, on the rows it serves), evaluate, write the bundle.

    Evaluation covers every dataset of the split (not only the training data), so a digital-only
    stage is also scored on photos. Returns {"<split>/<group>": metrics at 0.5}.
    """
    model = model.float().to(memory_format=torch.contiguous_format).cpu()
    kwargs = {"domain_heads": stage.domain_heads, "image_size": stage.image_size,
              "preprocessing": stage.preprocess, "batch_size": max(stage.batch_size, 32),
              "policy": stage.policy}
    tables: dict[str, pd.DataFrame] = {}
    for split in ("val", "test"):
        rows = catalog.loc[catalog["split"] == split].reset_index(drop=True)
        if not rows.empty and (split == "val" or split in stage.evaluate):
            tables[split] = predict(model, rows, **kwargs)
    thresholds = tune_head_thresholds(tables["val"]) if "val" in tables else {}
    metrics: dict[str, Any] = {}
    for split, table in tables.items():
        if split in stage.evaluate:
            document = write_evaluation(table, out_dir, split, None, thresholds)
            for group, entry in document["groups"].items():
                metrics[f"{split}/{group}"] = entry["at_0.5"]
    meta = {"image_size": stage.image_size, "preprocessing": stage.preprocess.model_dump(mode="json"),
            "thresholds": thresholds, "domain_heads": stage.domain_heads, "stage": stage.name,
            "label": stage.title, "metrics": metrics, "config": resolved_config(stage), "config_hash": digest,
            "policy": stage.policy, "training": train_info}
    if "val" in tables:
        router = router_accuracy(tables["val"])
        if router is not None:
            meta["router"] = metrics["val/router"] = router
        val_rows = catalog.loc[catalog["split"] == "val"]
        meta["ood"] = ood_calibration(model, val_rows, image_size=stage.image_size,
                                      preprocessing=stage.preprocess, batch_size=max(stage.batch_size, 32))
    save_bundle(model, out_dir, meta)
    return metrics


def _write_yaml(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, default=str, allow_nan=False))
    os.replace(tmp, path)
