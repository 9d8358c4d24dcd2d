"""Antidote (Huang et al., ICML 2025), after fine-tuning: one-shot pruning of harmful weights.

As prune_wanda_outlier in git-disl/Antidote@26e2ade scores it: for each LoRA factor W (lora_A, whose
input is x; lora_B, whose input is A x) of the fine-tuned model,
1. a no-grad forward over calibration samples C (from the provider's harmful set):
   n_j^2 = mean over samples of the sum over tokens of x_j^2;
2. S_ij = |W_ij| * n_j;
3. in each row, every entry outside the floor(cols * (1 - delta)) lowest scores is set to 0.
delta is the fraction removed (their --dense_ratio, named the other way round in their code). Padding
tokens are left out of n_j (their calibration passed no attention mask). The pruning is returned as the
perturbation -W on the pruned entries, so the release is w_T + perturbation, as for every defence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from panacea_platform.algorithms.activations import input_square_sums
from panacea_platform.algorithms.interface import LossFn, Tensors, TrainableWeights, unwrap
from panacea_platform.training.microbatch import batch_rows

FACTORS = (".lora_A.", ".lora_B.")


def prune_mask(weight: torch.Tensor, input_norm: torch.Tensor, delta: float) -> torch.Tensor:
    """True where an entry of `weight` is removed: per row, all but the floor(cols * (1 - delta)) lowest scores."""
    scores = weight.abs().float() * input_norm.float().to(weight.device).unsqueeze(0)
    keep = math.floor(weight.shape[1] * (1 - delta))
    order = torch.argsort(scores, dim=1, stable=True)
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def factor_modules(model: Any, names: list[str]) -> dict[str, torch.nn.Module]:
    """Each trainable LoRA factor's module (the Linear whose weight it is), keyed by its weight's name."""
    modules = dict(unwrap(model).named_modules())
    found = {}
    for name in names:
        if any(marker in name for marker in FACTORS) and name.endswith(".weight"):
            found[name] = modules[name[: -len(".weight")]]
    if not found:
        raise ValueError("antidote prunes LoRA factors, and this model has none among its trainable weights")
    return found


@dataclass
class InputNorms:
    """The calibration objective: the run's loss, and per factor the sum of squared inputs over answer and
    prompt tokens (not padding), and the number of samples seen."""

    names: list[str]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0

    def loss(self, model: Any, batch: Any, lm_loss: LossFn) -> torch.Tensor:
        mask = batch["attention_mask"]
        with input_square_sums(factor_modules(model, self.names), mask) as sums:
            loss = lm_loss(model, batch)
        for name, value in sums.items():
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.samples += batch_rows(batch)
        return loss

    def count(self, batch: Any) -> int:
        return batch_rows(batch)


def antidote_perturbation(weights: TrainableWeights, calibration_batches: list[Any], delta: float) -> Tensors:
    """-W on the entries Antidote removes, zero elsewhere (and on weights that are not LoRA factors)."""
    names = weights.weight_names()
    norms = InputNorms(names)
    for batch in calibration_batches:
        weights.forward(batch, norms)
    factor_names = sorted(norms.sums)
    totals = weights.sum_over_ranks(
        [norms.sums[n] for n in factor_names] + [torch.tensor([float(norms.samples)], dtype=torch.float32)]
    )
    samples, sums = totals[-1].item(), dict(zip(factor_names, totals[:-1]))
    perturbation = []
    for name, value in zip(names, weights.values()):
        if name not in sums:
            perturbation.append(torch.zeros_like(value))
            continue
        norm = (sums[name] / max(samples, 1.0)).sqrt()
        perturbation.append(torch.where(prune_mask(value, norm, delta), -value, torch.zeros_like(value)))
    return perturbation
