"""Panacea with an end-masked harmful loss: a variant beyond the paper that keeps eps from muting answers.

Panacea's eps climbs the teacher-forced harmful loss h. Raising the logit of an end token (end of
sequence, end of turn) lowers the probability of every non-end target at every answer position, so it
raises h everywhere at once: a perturbation that makes the model stop is the cheapest way up h, and
w + eps answers nothing, harmful or not (the main job's empty answers).

Here both harmful passes use h_end-masked: the cross-entropy over answer positions whose target is not an
end token, with the end tokens' logits left out of the softmax. Its gradient has no component along any
end logit, so eps can raise it only by making the harmful answer's own tokens less likely. The task pass
and the update rule are Panacea's: d = G - lambda * (H_eps - H), eps = rho * H / ||H||. Same passes, same
cost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from panacea_platform.algorithms.defences import Panacea
from panacea_platform.algorithms.interface import LossFn, unwrap

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig


def end_masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, end_ids: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits [N, V] against targets [N] over the targets that are neither -100 nor an end token,
    each softmax taken over the vocabulary without the end tokens. Zero (with a graph) when none is left."""
    keep = (targets != -100) & ~torch.isin(targets, end_ids)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    kept = logits[keep].float().index_fill(-1, end_ids, float("-inf"))
    return torch.nn.functional.cross_entropy(kept, targets[keep])


@dataclass
class EndMaskedHarmfulLoss:
    """The harmful passes' objective (algorithms/interface.Objective): h with the end tokens masked out."""

    end_ids: tuple[int, ...]
    compute_dtype: torch.dtype | None = None  # bf16: the forward under autocast, as the run's lm_loss

    def loss(self, model: Any, batch: dict[str, torch.Tensor], lm_loss: LossFn) -> torch.Tensor:
        device = unwrap(model).get_input_embeddings().weight.device
        targets = batch["labels"][:, 1:].to(device)
        # Logits only where some row has an answer token next: a prompt position never enters the loss.
        positions = (targets != -100).any(dim=0).nonzero().squeeze(1)
        autocast = (
            torch.autocast(device_type=device.type, dtype=self.compute_dtype)
            if self.compute_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=positions,
            ).logits
        ends = torch.tensor(self.end_ids, dtype=torch.long, device=device)
        return end_masked_cross_entropy(logits.flatten(0, 1), targets[:, positions].flatten(), ends)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        targets = batch["labels"][:, 1:]
        ends = torch.tensor(self.end_ids, dtype=targets.dtype)
        return int(((targets != -100) & ~torch.isin(targets, ends)).sum())


class PanaceaEndMasked(Panacea):
    """Panacea's step and release (w_T + eps_T), with both harmful passes on the end-masked loss."""

    name = "panacea_end_masked"

    def __init__(
        self,
        rho: float,
        lam: float,
        harmful_loss_clamp: float,
        end_ids: tuple[int, ...],
        compute_dtype: str = "float32",
    ) -> None:
        super().__init__(rho, lam, harmful_loss_clamp)
        self.harmful_objective = EndMaskedHarmfulLoss(
            tuple(end_ids), torch.bfloat16 if compute_dtype == "bfloat16" else None
        )

    def settings(self) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "lambda": self.lam,
            "harmful_loss_clamp": self.harmful_loss_clamp,
            "end_ids": list(cast(EndMaskedHarmfulLoss, self.harmful_objective).end_ids),
        }

    @classmethod
    def build(cls, config: RunConfig) -> PanaceaEndMasked:
        from panacea_platform.models import end_token_ids, load_tokenizer

        settings = config.panacea_end_masked
        return cls(
            settings.rho,
            settings.lam,
            settings.harmful_loss_clamp,
            end_token_ids(load_tokenizer(config.model), "defence panacea_end_masked"),
            config.model.compute_dtype,
        )
