"""Whether a training value stopped being finite on any DDP rank (the stage then stops on every rank).

Used by the supervised and MoCo modules before an optimiser step; stage_errors.py words the error.
"""

from __future__ import annotations

import lightning as L
import torch


def not_finite_on_any_rank(module: L.LightningModule, value: torch.Tensor) -> bool:
    """True when `value` holds NaN / inf here or on another rank: every rank gets the same answer,
    so all of them stop together and none waits for the others at the next collective."""
    bad = not bool(torch.isfinite(value.detach()).all())
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
    return bad
