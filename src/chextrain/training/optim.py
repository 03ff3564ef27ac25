"""The stage's optimiser and learning-rate schedule, shared by every objective."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from chextrain.training.specs import OptimizerSpec


def make_optimizer(params: list[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The stage's optimiser over exactly `params` (never inherited from the stage it starts from)."""
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def cosine(total: int) -> Callable[[int], float]:
    """The learning-rate factor of a half-cosine from 1 at step 0 to 0 at `total` (MoCo v2's --cos)."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
