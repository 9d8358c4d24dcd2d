"""The Panacea step (Wang et al., NeurIPS 2025), as ../shared/panacea-method.md states it.

minimise over w:  g(w) - lambda * (h(w + eps) - h(w)),  eps = rho * grad h / ||grad h||.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from panacea_platform.algorithms.interface import Objective, Tensors, TrainableWeights, global_norm

# Added to ||H|| so a zero harmful gradient gives eps = 0 rather than NaN.
NORM_EPSILON = 1e-7


@dataclass
class HarmfulDirection:
    """h(w), its gradient H and eps = rho H / ||H|| at one w: what an amortised step keeps between refreshes."""

    loss: float
    grad: Tensors
    eps: Tensors


@dataclass
class PanaceaStepResult:
    task_loss: float
    harmful_loss: float
    harmful_loss_perturbed: float
    eps: Tensors
    eps_norm: float
    update_norm: float
    harmful: HarmfulDirection | None = None


def harmful_direction(
    weights: TrainableWeights, harmful_batch: Any, rho: float, harmful_objective: Objective | None = None
) -> HarmfulDirection:
    loss, grad = weights.loss_and_gradient(harmful_batch, objective=harmful_objective)
    scale = rho / (global_norm(grad).item() + NORM_EPSILON)
    return HarmfulDirection(loss, grad, [scale * h for h in grad])


def panacea_step(
    weights: TrainableWeights,
    finetune_batch: Any,
    harmful_batch: Any,
    rho: float,
    lam: float,
    harmful_loss_clamp: float = 5.0,
    harmful_objective: Objective | None = None,
    kept: HarmfulDirection | None = None,
) -> PanaceaStepResult:
    """One step; `harmful_objective` replaces the run's loss in both harmful passes (h at w and at w + eps).
    With `kept` (an amortised step between refreshes) H and eps are those of an earlier w, and the pass
    that would compute them is skipped."""
    task_loss, task_grad = weights.loss_and_gradient(finetune_batch)
    harmful = kept if kept is not None else harmful_direction(weights, harmful_batch, rho, harmful_objective)
    harmful_loss, harmful_grad, eps = harmful.loss, harmful.grad, harmful.eps

    # A harmful loss above the clamp contributes no gradient: once the perturbed
    # model is bad enough at harmful answers, stop pushing.
    with weights.perturbed(eps):
        harmful_loss_perturbed, perturbed_grad = weights.loss_and_gradient(
            harmful_batch, clamp_max=harmful_loss_clamp, objective=harmful_objective
        )

    direction = [g - lam * (hp - h) for g, hp, h in zip(task_grad, perturbed_grad, harmful_grad)]
    update_norm = weights.apply_update(direction)
    return PanaceaStepResult(
        task_loss=task_loss,
        harmful_loss=harmful_loss,
        harmful_loss_perturbed=harmful_loss_perturbed,
        eps=eps,
        eps_norm=global_norm(eps).item(),
        update_norm=update_norm,
        harmful=harmful,
    )
