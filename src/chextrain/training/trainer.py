"""The Lightning Trainer a stage fits with: devices, precision, DDP, loggers, checkpoints, progress.

`build_trainer` turns a stage's settings into an `L.Trainer` (the CPU/GPU choices, the atomic
checkpoint writer, last.ckpt every N steps, best.ckpt by the stage's monitor when it is wanted,
the stage's loggers, one line per epoch); `auto_workers` is how many loader workers a rank
starts when a stage says `num_workers: auto`. training/lifecycle.py calls both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from chextrain.training.checkpoints import BEST_CKPT, CKPT_DIR, LAST_CKPT, AtomicCheckpointIO, LastCheckpoint
from chextrain.training.loggers import RememberRuns, build_loggers
from chextrain.training.progress import EpochLines, StageProgressBar
from chextrain.training.stage import BaseStage


def auto_workers(devices: int | str) -> int:
    """Loader worker processes per rank: the CPUs left after one per training process, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_node = devices if isinstance(devices, int) else max(1, torch.cuda.device_count())
    return max(0, min(8, cpus // per_node - 1))


def build_trainer(
    stage: BaseStage, out_dir: Path, *, progress: bool, has_val: bool, steps_per_epoch: int
) -> L.Trainer:
    """The Lightning Trainer for a stage (devices, precision, DDP, loggers, checkpoints, progress).

    progress: one line per epoch (EpochLines), plus Lightning's rich bar when stdout is a terminal;
    no model summary (its FLOPs column is empty for our models).
    """
    on_gpu = torch.cuda.is_available()
    precision = stage.precision
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    n_devices = stage.devices if isinstance(stage.devices, int) else max(1, torch.cuda.device_count())
    strategy: Any = "auto"
    if n_devices > 1 or stage.num_nodes > 1:
        strategy = DDPStrategy(
            process_group_backend=None if on_gpu else "gloo", checkpoint_io=AtomicCheckpointIO()
        )
    callbacks: list[Callback] = [
        LastCheckpoint(out_dir / CKPT_DIR / LAST_CKPT, stage.checkpoint_every_n_steps),
        RememberRuns(out_dir),
    ]
    # best.ckpt: for a bundle of the best weights, or when the finished stage keeps it
    wants_best = getattr(stage, "select", "last") == "best" or stage.keep_checkpoints in ("best", "all")
    if has_val and wants_best:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out_dir / CKPT_DIR,
                filename=BEST_CKPT,
                monitor=getattr(stage, "monitor", None),
                mode=getattr(stage, "monitor_mode", "max"),
                save_top_k=1,
                save_last=False,
                auto_insert_metric_name=False,
                enable_version_counter=False,
                save_on_train_epoch_end=False,
            )
        )
    bar = progress and sys.stdout.isatty()
    if progress:
        callbacks.append(EpochLines(stage.name))
    if bar:
        callbacks.append(StageProgressBar())
    val_every = getattr(stage, "val_every_n_steps", None) if has_val else None
    loggers = build_loggers(stage.logger, out_dir, stage.name)
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
        # no default ModelCheckpoint (it would write logs/*/checkpoints/epoch=*.ckpt): ours only
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        plugins=[AtomicCheckpointIO()] if strategy == "auto" else None,
        logger=loggers or False,
        log_every_n_steps=max(1, min(50, steps_per_epoch, stage.max_steps or steps_per_epoch)),
        enable_progress_bar=bar,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
