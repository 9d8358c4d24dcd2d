"""Booster (Huang et al., ICLR 2025), alignment stage: attenuate the harmful perturbation.

min_w l_A(w) + lambda * [l_H(w) - l_H(w - alpha * grad l_H / ||grad l_H||)], first order (the direction
held constant), as BoosterAlignmentTrainer.training_step computes it in git-disl/Booster@6421918:
three forward-backward passes, the second and third on the same harmful batch. The weights are
restored from a copy after the simulated harmful step (their code added alpha * G_h / n back, which
drifts by rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from panacea_platform.algorithms.interface import TrainableWeights, global_norm

NORM_EPSILON = 1e-7


@dataclass
class BoosterStepResult:
    alignment_loss: float
    harmful_loss: float
    harmful_loss_after_step: float
    update_norm: float


def booster_step(
    weights: TrainableWeights, alignment_batch: Any, harmful_batch: Any, lam: float, alpha: float
) -> BoosterStepResult:
    harmful_loss, harmful_grad = weights.loss_and_gradient(harmful_batch)
    scale = -alpha / (global_norm(harmful_grad).item() + NORM_EPSILON)
    # One normalised harmful-gradient step down, as a fine-tuning attacker would take.
    with weights.perturbed([scale * g for g in harmful_grad]):
        harmful_loss_after, grad_after = weights.loss_and_gradient(harmful_batch)
    alignment_loss, alignment_grad = weights.loss_and_gradient(alignment_batch)
    direction = [g + lam * (h - h_after) for g, h, h_after in zip(alignment_grad, harmful_grad, grad_after)]
    return BoosterStepResult(alignment_loss, harmful_loss, harmful_loss_after, weights.apply_update(direction))
