"""The stage lifecycle: one stage, whatever its objective, from its config to done.json.

`train_stage` returns a finished run of the same config hash as it is; otherwise it first checks
everything it can refuse (loggers installed, the resume point loadable, the catalog, the init's
file) before it creates or changes the output folder, then resolves the init, resumes an
interrupted run from checkpoints/last.ckpt, seeds, builds the Lightning Trainer
(training/trainer.py), fits, and (on rank 0) has the objective write the bundle before done.json
is written. What a stage optimises comes from its objective (training/objectives/: supervised,
moco).

The output folder holds config.yaml (the resolved stage), checkpoints/last.ckpt (resumable;
written atomically every N steps and at each epoch end) and checkpoints/best.ckpt (by the
stage's monitor, when the bundle takes the best weights or the stage keeps it), logs/ (the
stage's loggers, training/loggers.py), model.safetensors + model.json + README.md (the model
card, with bootstrap CIs from the test predictions), the objective's outputs (predictions and
metrics per evaluated split) and done.json: a folder with done.json is never trained again, and
keeps only the checkpoints its `keep_checkpoints` says (training/checkpoints.py).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
import yaml

from chextrain.data.transforms import as_preprocessing
from chextrain.errors import ChextrainError
from chextrain.fileio import atomic_write_text, write_json
from chextrain.models.bundle import write_model_card
from chextrain.models.net import CXRNet
from chextrain.models.weights import expected_input, init_model
from chextrain.training.checkpoints import (
    CKPT_DIR,
    LAST_CKPT,
    check_resumable,
    prune_checkpoints,
)
from chextrain.training.loaders import prepare_catalog, stage_rows
from chextrain.training.loggers import check_loggers, log_outcome
from chextrain.training.objectives import LoaderSettings, objective_of
from chextrain.training.progress import frozen_batchnorms_quiet, lightning_info_quiet
from chextrain.training.stage import (
    REF_PREFIX,
    BaseStage,
    Stage,
    StageError,
    config_hash,
    load_stage,
    resolved_config,
)
from chextrain.training.trainer import auto_workers, build_trainer

DONE_FILE, CONFIG_FILE = "done.json", "config.yaml"


class RunDirError(ChextrainError):
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


def resolve_init(init: str, resolve_ref: Callable[[str], Path] | None) -> str:
    """`stage:NAME` -> the folder resolve_ref gives for NAME; anything else unchanged."""
    if not init.startswith(REF_PREFIX):
        return init
    if resolve_ref is None:
        raise StageError(f"init {init!r} refers to another stage: run it in a study, or give the run folder")
    return str(resolve_ref(init[len(REF_PREFIX) :]))


INIT_WEIGHTS, STAGE_SET, DEFAULT = "init weights", "stage", "default"  # where an input setting came from


def apply_expected_input(stage: BaseStage, init: str) -> Any:
    """The stage with the preprocessing / image size its init weights were trained on, where it sets none.

    `init` is resolved (see resolve_init); models.weights.expected_input says what the weights
    expect (a bundle's model.json, CovidPrognosis: histeq at 224 px, MoCo-CXR: its mean/std at
    320 px, imagenet: ImageNet's). A stage that sets `preprocessing` (e.g. `preprocessing: imagenet`, the
    paper's mismatch) or `image_size` keeps its own. Training, the bundle and prediction use the result.
    """
    return fit_expected_input(stage, expected_input(init))[0]


def fit_expected_input(stage: BaseStage, expected: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """apply_expected_input from what the init expects, and where each input setting came from.

    Returns (stage, {"image_size": src, "preprocessing": src}) with src INIT_WEIGHTS (the init
    changed it), STAGE_SET (the stage, or a study default or profile, set it) or DEFAULT (the stage
    type's default, which the init may share: ImageNet weights and ImageNet normalisation).
    """
    update: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in ("image_size", "preprocessing"):
        sources[key] = STAGE_SET if key in stage.model_fields_set else DEFAULT
        if key in stage.model_fields_set or key not in expected:
            continue
        value = int(expected[key]) if key == "image_size" else as_preprocessing(expected[key])
        if value != getattr(stage, key):
            update[key], sources[key] = value, INIT_WEIGHTS
    return (stage.model_copy(update=update) if update else stage), sources


def _check_out_dir(out_dir: Path, stage: BaseStage, digest: str) -> dict[str, Any] | None:
    """done.json if the folder holds this config's finished run; raise if it holds another config's."""
    done = out_dir / DONE_FILE
    config = out_dir / CONFIG_FILE
    if done.exists():
        try:
            record = json.loads(done.read_text())
        except (OSError, ValueError) as err:
            raise RunDirError(
                f"{done} is not readable JSON ({err}); delete the folder to train again"
            ) from None
        if not isinstance(record, dict) or record.get("config_hash") != digest:
            raise RunDirError(
                f"{out_dir} holds a finished run of another configuration (hash "
                f"{record.get('config_hash') if isinstance(record, dict) else None}, this stage "
                f"{digest}); use another --out"
            )
        return record
    if config.exists() and (out_dir / CKPT_DIR / LAST_CKPT).exists():
        try:
            old = config_hash(load_stage(config))
        except StageError:
            old = "unreadable"
        if old != digest:
            raise RunDirError(
                f"{out_dir} holds a checkpoint of another configuration ({config}: hash "
                f"{old}, this stage {digest}); use another --out or delete it"
            )
    return None


def finished_result(out_dir: Path, stage: BaseStage, digest: str) -> StageResult | None:
    """The result of a finished run of this config in out_dir, else None (the folder is not created).

    A finished run keeps only the checkpoints its `keep_checkpoints` says (pruned again here).
    """
    finished = _check_out_dir(out_dir, stage, digest)
    if finished is None:
        return None
    prune_checkpoints(out_dir, stage.keep_checkpoints)
    return StageResult(
        out_dir,
        out_dir / "model.json",
        finished.get("metrics", {}),
        finished.get("duration", 0.0),
        resumed=False,
        cached=True,
    )


def initial_model(
    stage: BaseStage, init: str, out_dir: Path, *, resumed: bool, load_heads: bool
) -> tuple[CXRNet, str]:
    """The stage's model and a note on its weights; a fresh run initialises it and writes config.yaml.

    A resumed run leaves the weights to the checkpoint Lightning restores.
    """
    model = CXRNet(
        stage.backbone, heads=getattr(stage, "heads", ("shared",)), router=getattr(stage, "router", False)
    )
    if resumed:
        return model, "weights from checkpoint (resumed)"
    note = init_model(model, init, load_heads=load_heads).summary()
    atomic_write_text(out_dir / CONFIG_FILE, yaml.safe_dump(resolved_config(stage), sort_keys=False))
    return model, note


def train_stage(
    stage: Stage,
    data_root: Path | None,
    out_dir: Path,
    *,
    resolve_ref: Callable[[str], Path] | None = None,
    catalog: pd.DataFrame | None = None,
    progress: bool = True,
) -> StageResult:
    """Train one stage into out_dir (resuming from its checkpoint); its objective bundles (and evaluates) it.

    Args:
        stage: the validated stage (its `objective` picks the code that trains it).
        data_root: folder holding the CheXpert / CheXphoto releases (read unless `catalog`).
        out_dir: the stage's folder; a finished one (done.json of this config) is returned as is.
        resolve_ref: maps a referenced stage NAME (from `init: stage:NAME`) to its folder.
        catalog: an already-read catalog (its split column is recomputed from the stage's split).
        progress: print a line per epoch (and Lightning's rich bar when stdout is a terminal).
    """
    objective = objective_of(stage)
    t0 = time.time()
    out_dir = Path(out_dir)
    digest = config_hash(stage)
    cached = finished_result(out_dir, stage, digest)
    if cached is not None:
        return cached
    # Everything that can be refused is checked before out_dir is created or changed.
    check_loggers(stage.logger)
    last = out_dir / CKPT_DIR / LAST_CKPT
    resumed = last.exists()
    if resumed:
        check_resumable(last)
    L.seed_everything(stage.seed, workers=True, verbose=False)  # model init and Lightning's RNGs
    catalog = prepare_catalog(stage, data_root, catalog)
    train_rows = stage_rows(stage, catalog, "train")
    if train_rows.empty:
        raise StageError(
            f"stage {stage.name!r}: no training rows for data {stage.data.model_dump()} in {data_root}"
        )
    init = resolve_init(stage.init, resolve_ref)
    # reads the init file: a pickle or a bad file stops here
    fitted, input_from = fit_expected_input(stage, expected_input(init))
    out_dir.mkdir(parents=True, exist_ok=True)
    model, init_note = initial_model(stage, init, out_dir, resumed=resumed, load_heads=objective.load_heads)
    stage = fitted
    on_gpu = torch.cuda.is_available()
    workers = auto_workers(stage.devices) if stage.num_workers == "auto" else stage.num_workers
    plan = objective.plan(
        stage,
        model,
        catalog,
        train_rows,
        LoaderSettings(num_workers=workers, pin_memory=on_gpu, channels_last=on_gpu),
    )
    steps = -(-len(train_rows) // stage.batch_size)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with lightning_info_quiet():
        try:
            trainer = build_trainer(
                stage, out_dir, progress=progress, has_val=plan.val_rows > 0, steps_per_epoch=steps
            )
            for lg in trainer.loggers:
                lg.log_hyperparams({**resolved_config(stage), "config_hash": digest})
            sigint = signal.getsignal(signal.SIGINT)
            try:
                with frozen_batchnorms_quiet(plan.module):
                    trainer.fit(
                        plan.module,
                        datamodule=plan.data,
                        ckpt_path=last if resumed else None,
                        weights_only=True,
                    )
            except SystemExit:
                if trainer.interrupted:  # Lightning ends a Ctrl-C'd fit with sys.exit(1): say what it was
                    _restore_sigint(sigint)
                    raise KeyboardInterrupt from None
                raise
        finally:  # Trainer(deterministic=True) switches a process-wide flag: give it back
            torch.use_deterministic_algorithms(was_deterministic)
    if trainer.global_rank != 0:
        return StageResult(out_dir, out_dir / "model.json", rank=trainer.global_rank, resumed=resumed)
    weights = objective.select_weights(stage, plan, out_dir)
    train_info = {
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "world_size": trainer.world_size,
        "samples_seen_per_rank": getattr(plan.module, "samples_per_rank", []),
        "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
        "weights": weights,
        "train_rows": len(train_rows),
        "val_rows": plan.val_rows,
        "init": init_note,
        "input_from": input_from,  # image_size / preprocessing: init weights, stage or default
    }
    meta = {
        "image_size": stage.image_size,
        "preprocessing": stage.preprocessing.model_dump(mode="json"),
        "stage": stage.name,
        "label": stage.title,
        "config": resolved_config(stage),
        "config_hash": digest,
        "training": train_info,
    }
    model = model.float().to(memory_format=torch.contiguous_format).cpu()  # every objective finishes here
    outcome = objective.finish(stage, model, plan, catalog, out_dir, meta)
    duration = time.time() - t0
    record = {
        "config_hash": digest,
        "stage": stage.name,
        "label": stage.title,
        "objective": stage.objective,
        "duration": duration,
        "resumed": resumed,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **train_info,
        **outcome.record,
        "metrics": outcome.metrics,
    }
    from chextrain.evaluation.tables import card_evaluation  # the report's engine, when it is needed

    write_model_card(out_dir, card_evaluation(out_dir, stage.title))
    write_json(out_dir / DONE_FILE, record)
    prune_checkpoints(out_dir, stage.keep_checkpoints)  # done.json first: a finished stage needs none
    log_outcome(trainer.loggers, outcome.metrics, out_dir / "model.json", trainer.global_step)
    return StageResult(out_dir, out_dir / "model.json", outcome.metrics, duration, resumed=resumed)


def _restore_sigint(handler: Any) -> None:
    """Give SIGINT its handler back: Lightning ignores it from a Ctrl-C on, so that pressing
    again does not cut its shutdown short, and leaves it so. A caller that catches the interrupt
    and carries on (a notebook, a study slot) would otherwise never see another Ctrl-C. Only the
    main thread may set a handler; a handler not set from Python (None) is left as it is."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
