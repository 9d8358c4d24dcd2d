"""The optimiser and the learning-rate schedule of a stage."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from panacea_platform.config import OptimConfig


def total_steps(optim: OptimConfig, steps_per_epoch: int) -> int:
    if optim.max_steps is not None:
        return optim.max_steps
    epochs = optim.epochs or 1  # the schema asks for one of max_steps and epochs
    return max(1, math.ceil(epochs * steps_per_epoch))


def lr_factor(schedule: str, warmup_steps: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimiser step `step` (0-based).

    Warm-up is linear and applies to every schedule, constant included (the
    authors' code asks for warm-up with a constant schedule, which ignores it).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig, total: int):
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim.schedule, optim.warmup_steps, total))
    return optimizer, scheduler
