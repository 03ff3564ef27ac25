"""What a stage prints while it trains: one line when training starts, one per epoch, and Lightning's
rich bar when the output is a terminal.

Lightning's own chatter (GPU/TPU availability, tips, "configured so 100% of the batches") goes to
the `lightning.pytorch` loggers at INFO level; `lightning_info_quiet` raises those loggers to
WARNING for the duration of a stage, so warnings still show. One warning is filtered there, by its
exact text: torch's FutureWarning that `isinstance(treespec, LeafSpec)` is deprecated, which
Lightning's own pytree code triggers at every fit (nothing the user can act on).
`frozen_batchnorms_quiet` hides Lightning's "Found N module(s) in eval mode" when those N modules
are exactly the frozen BatchNorm layers CXRNet keeps in eval mode on purpose (a frozen encoder's
statistics are part of what is frozen); any other module left in eval mode still shows it.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from torch import nn

from chextrain.models.net import frozen_batchnorms

# Warnings Lightning's own code triggers in torch, at every fit: (message regex, category).
LIBRARY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# Lightning's INFO loggers: rank_zero_info (device lines, tips, "fit stopped") and the CUDA device line.
LIGHTNING_INFO_LOGGERS: tuple[str, ...] = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)
SHOWN_METRICS: tuple[str, ...] = ("train/loss", "val/loss", "val/auc_mean", "train/acc1")


@contextmanager
def lightning_info_quiet(names: tuple[str, ...] = LIGHTNING_INFO_LOGGERS) -> Iterator[None]:
    """Lightning's INFO messages off (WARNING and above kept) and LIBRARY_WARNINGS ignored inside the
    block; levels and warning filters restored after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message, category in LIBRARY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextmanager
def frozen_batchnorms_quiet(module: nn.Module) -> Iterator[None]:
    """Inside the block, Lightning's warning that `module` starts training with modules in eval
    mode is hidden when they are exactly its frozen BatchNorm layers (see the module docstring)."""
    frozen = {id(m) for m in frozen_batchnorms(module)}
    in_eval = [m for m in module.modules() if not m.training]
    with warnings.catch_warnings():
        if in_eval and all(id(m) in frozen for m in in_eval):
            warnings.filterwarnings(
                "ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training"
            )
        yield


def total_steps(trainer: L.Trainer) -> int | None:
    """Optimiser steps the fit will run on this rank: max_steps, or epochs x batches per epoch."""
    per_epoch = trainer.num_training_batches
    by_epochs = trainer.max_epochs * per_epoch if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
    steps = min(trainer.max_steps if trainer.max_steps > 0 else math.inf, by_epochs)
    return int(steps) if math.isfinite(steps) else None


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


class EpochLines(Callback):
    """Prints (rank 0) what is trained and on what, then one line per epoch: step x/total and metrics."""

    def __init__(self, name: str, show: Callable[[str], None] = print) -> None:
        self.name, self.show = name, show
        self.t0 = time.time()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.time()
        if not trainer.is_global_zero:
            return
        params = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        where = f"{trainer.world_size} processes" if trainer.world_size > 1 else "1 process"
        accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        total = total_steps(trainer)
        self.show(
            f"{self.name}: {_count(params)} parameters ({_count(trainable)} trainable), {where} on "
            f"{accelerator}, {trainer.precision} precision; {trainer.num_training_batches} steps per epoch"
            + (f", {total} steps" if total else "")
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        total = total_steps(trainer)
        found = trainer.callback_metrics
        shown = [f"{k} {float(found[k]):.4g}" for k in SHOWN_METRICS if k in found]
        self.show(
            f"{self.name}: epoch {trainer.current_epoch + 1}{epochs}, step {trainer.global_step}"
            + (f"/{total}" if total else "")
            + (f", {', '.join(shown)}" if shown else "")
            + f" ({time.time() - self.t0:.0f} s)"
        )


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar with the step count a stage really runs and no logger version (v_num)."""

    @property
    def total_train_batches(self) -> int | float:
        """Batches of this epoch, capped by the steps left before max_steps (read at the epoch's start)."""
        total = super().total_train_batches
        left = self.trainer.max_steps - self.trainer.global_step if self.trainer.max_steps > 0 else math.inf
        return min(total, max(left, 0))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The logged metrics without `v_num` (the logger's version says nothing here)."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        return f"epoch {current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")
