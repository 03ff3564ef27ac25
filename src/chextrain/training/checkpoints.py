"""Checkpoint files of a stage: paths, atomic writes, and a `last.ckpt` kept current for resuming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from chextrain.fileio import atomic_write

CKPT_DIR, LAST_CKPT, BEST_CKPT = "checkpoints", "last.ckpt", "best"  # best: ModelCheckpoint adds .ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, fsyncs, then renames it into place.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the
    system temp dir; moving it across file systems is a copy, which a kill can leave half done.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class LastCheckpoint(Callback):
    """Keeps `last.ckpt` (the resume point) current: every N optimiser steps and at epoch end."""

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every = Path(path), every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
