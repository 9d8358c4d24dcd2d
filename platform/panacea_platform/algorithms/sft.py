"""Plain fine-tuning: one forward/backward, the gradient straight to the optimiser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from panacea_platform.algorithms.interface import TrainableWeights


@dataclass
class SftStepResult:
    task_loss: float
    update_norm: float


def sft_step(weights: TrainableWeights, finetune_batch: Any) -> SftStepResult:
    task_loss, task_grad = weights.loss_and_gradient(finetune_batch)
    return SftStepResult(task_loss=task_loss, update_norm=weights.apply_update(task_grad))
