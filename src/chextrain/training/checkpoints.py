"""Checkpoint files of a stage: paths, atomic writes, a `last.ckpt` kept current for resuming, the
check that a resume point is a checkpoint we may load, and what a finished stage keeps of them.

`keep_checkpoints` (a stage key) says what a FINISHED stage keeps besides its bundle: `last`
(checkpoints/last.ckpt, the default), `best` (checkpoints/best.ckpt, else last.ckpt), `all`, or
`none`. An unfinished stage keeps last.ckpt whatever the setting: it is the resume point.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from chextrain.errors import ChextrainError
from chextrain.fileio import atomic_write

CKPT_DIR, LAST_CKPT, BEST_CKPT = "checkpoints", "last.ckpt", "best"  # best: ModelCheckpoint adds .ckpt


class CheckpointError(ChextrainError):
    """A checkpoint in a run folder that cannot be resumed from; the message names the file and why."""


def check_resumable(path: Path) -> None:
    """`path` loads with torch.load(weights_only=True) (memory-mapped: tensors are not read).

    A checkpoint holding Python objects beyond tensors and plain containers is refused (loading it
    could run arbitrary code), and so is a file that is not a checkpoint or is cut short.
    """
    path = Path(path)
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) torch file
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"e.g. {found.group(1)}" if found else "not allowed by weights_only=True"
        raise CheckpointError(
            f"{path}: refusing to resume from it: it holds Python objects beyond tensors ({what}); "
            "delete it to start the stage again, or use another --out"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {str(err)[:160]}); "
            "delete it to start the stage again"
        ) from None


def prune_checkpoints(out_dir: Path, keep: str) -> list[Path]:
    """Delete the checkpoints a finished stage does not keep (`keep`: last | best | all | none).

    Returns the files removed. Called only once done.json is written, so a stage killed here is
    already finished and never needs them.
    """
    folder = Path(out_dir) / CKPT_DIR
    if keep == "all" or not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    best = folder / f"{BEST_CKPT}.ckpt"
    kept = {"last": folder / LAST_CKPT, "best": best if best.exists() else folder / LAST_CKPT}.get(keep)
    removed = [p for p in files if p != kept]
    for p in removed:
        p.unlink(missing_ok=True)
    if kept is None:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


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
