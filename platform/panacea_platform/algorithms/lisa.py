"""Lisa (Huang et al., NeurIPS 2024), fine-tuning stage: bi-state optimisation with a proximal term.

As LisaTrainer in git-disl/Lisa@68e3659 runs it: K_a steps on alignment data, then K_f on the user's
data, alternating, alignment first. On leaving the alignment state the weights are the alignment
anchor; on leaving the fine-tuning state, the fine-tuning anchor (both start at the initial weights).
A step in state s follows grad l_s + rho * (w - anchor of the other state), the gradient of
l_s + rho/2 ||w - anchor||^2; the proximal term applies only after a warm-up of 10% of the steps
(their 0-based step > 0.1 T, so from 1-based step floor(0.1 T) + 2).
One forward-backward a step; one optimiser state and schedule for both states. The user's batches
are drawn only in fine-tuning steps (theirs drew one every step and dropped those of alignment steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from panacea_platform.algorithms.interface import Tensors, TrainableWeights

ALIGN, FINETUNE = "align", "finetune"


@dataclass
class LisaState:
    align_steps: int
    finetune_steps: int
    rho: float
    warmup_steps: float
    step: int = 0
    anchors: dict[str, Tensors] = field(default_factory=dict)

    def mode(self, step: int) -> str:
        """The state of 1-based `step`: A A ... F F F ... alternating, alignment first."""
        return ALIGN if (step - 1) % (self.align_steps + self.finetune_steps) < self.align_steps else FINETUNE


@dataclass
class LisaStepResult:
    mode: str
    loss: float
    proximal: float
    update_norm: float


def lisa_step(weights: TrainableWeights, state: LisaState, alignment_batch: Any, finetune_batch: Any) -> LisaStepResult:
    state.step += 1
    mode = state.mode(state.step)
    if not state.anchors:
        start = weights.values()
        state.anchors = {ALIGN: start, FINETUNE: [t.clone() for t in start]}
    if state.step > 1 and state.mode(state.step - 1) != mode:
        state.anchors[state.mode(state.step - 1)] = weights.values()  # leaving a state: its anchor is w now
    loss, grad = weights.loss_and_gradient(alignment_batch if mode == ALIGN else finetune_batch)
    proximal = 0.0
    # Their gate reads the trainer's 0-based global step: the proximal term starts once step - 1 > 0.1 T.
    if state.step - 1 > state.warmup_steps:
        other = state.anchors[FINETUNE if mode == ALIGN else ALIGN]
        pull = [w - a for w, a in zip(weights.values(), other)]
        grad = [g + state.rho * p.to(g.device, g.dtype) for g, p in zip(grad, pull)]
        proximal = 0.5 * state.rho * sum(float((p.double() ** 2).sum()) for p in pull)
    return LisaStepResult(mode, loss, proximal, weights.apply_update(grad))
