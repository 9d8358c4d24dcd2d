"""Vaccine (Huang et al., NeurIPS 2024), alignment stage: perturbation-aware alignment on hidden states.

As VaccineTrainer in git-disl/Vaccine@8937f68 computes it, one step on one alignment batch, twice:
1. forward and backward of l_A(w); keep g_l = dl/dh_l for each attention block's output h_l
   (after o_proj, before the residual add); the weight gradients of this pass are not used;
2. e_l = rho * g_l / (||g|| + 1e-7), ||g|| one L2 norm over all layers, tokens and rows;
3. forward with h_l + e_l at every layer at once (e constant) and backward: that gradient is the update.
The hidden-state gradient is read with a tensor hook (their module backward hook was right only by
accident), e is added by returning a new output (not by writing .data), and no layer list can be
empty (activations.blocks raises).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from panacea_platform.algorithms.activations import add_to_outputs, blocks, capture_outputs
from panacea_platform.algorithms.interface import LossFn, TrainableWeights
from panacea_platform.training.microbatch import answer_token_count

NORM_EPSILON = 1e-7


@dataclass
class _CaptureGradients:
    """Pass 1: the run's loss, keeping each micro-batch's attention-output gradients in order."""

    kind: str = "attention"
    gradients: list[list[torch.Tensor]] = field(default_factory=list)
    _pending: list[torch.Tensor] | None = None

    def loss(self, model: Any, batch: Any, lm_loss: LossFn) -> torch.Tensor:
        self.collect()
        with capture_outputs(blocks(model, self.kind), keep_gradients=True) as hidden:
            loss = lm_loss(model, batch)
        self._pending = hidden
        return loss

    def collect(self) -> None:
        """Read the last micro-batch's gradients (its backward has run by the next call or the end)."""
        if self._pending is not None:
            self.gradients.append(
                [
                    h.grad.detach().float() if h.grad is not None else torch.zeros_like(h, dtype=torch.float32)
                    for h in self._pending
                ]
            )
            self._pending = None

    def count(self, batch: Any) -> int:
        return answer_token_count(batch)


@dataclass
class _AddPerturbation:
    """Pass 2: the run's loss with each micro-batch's e_l added to the attention outputs, in pass 1's order."""

    kind: str
    perturbations: list[list[torch.Tensor]]
    _next: int = 0

    def loss(self, model: Any, batch: Any, lm_loss: LossFn) -> torch.Tensor:
        deltas = self.perturbations[self._next]
        self._next += 1
        with add_to_outputs(blocks(model, self.kind), deltas):
            return lm_loss(model, batch)

    def count(self, batch: Any) -> int:
        return answer_token_count(batch)


@dataclass
class VaccineStepResult:
    alignment_loss: float
    perturbed_loss: float
    hidden_perturbation_norm: float
    update_norm: float


def vaccine_step(weights: TrainableWeights, alignment_batch: Any, rho: float) -> VaccineStepResult:
    capture = _CaptureGradients()
    alignment_loss, _ = weights.loss_and_gradient(alignment_batch, objective=capture)
    capture.collect()
    squares = sum((g.double() ** 2).sum() for grads in capture.gradients for g in grads)
    (total,) = weights.sum_over_ranks([torch.as_tensor(squares, dtype=torch.float64).reshape(1)])
    scale = rho / (total.sqrt().item() + NORM_EPSILON)
    perturbations = [[scale * g for g in grads] for grads in capture.gradients]
    perturbed_loss, grad = weights.loss_and_gradient(
        alignment_batch, objective=_AddPerturbation("attention", perturbations)
    )
    norm = scale * total.sqrt().item()
    return VaccineStepResult(alignment_loss, perturbed_loss, norm, weights.apply_update(grad))
