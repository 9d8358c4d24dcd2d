"""RepNoise (Rosati et al., NeurIPS 2024), alignment stage: representation noising.

L = CE(x_s) + beta * mean_l MMD(m * a_l(x_h), m * N(0, I))
      - alpha * ln(1 + [CE(x_h) + sum_{k<K} CE(lm_head(norm(hs_k)))] / (K + 1))

as rep_noise_loss in domenicrosati/representation-noising@03689ff computes it, with x_s the alignment
batch (refusals and benign answers) and x_h the provider's harmful batch; a_l is layer l's MLP output
flattened per row, hs_k the input of layer k (HF hidden state k), K the number of layers, and m the
tokens counted (repnoise.mask):
- 'answer': m is x_h's answer tokens and CE(x_s) the run's loss, the original's paired design;
- 'paper': m is the tokens where x_h differs from its x_s row zero-padded or cut to x_h's width (prompt and
  padding included), CE(x_s) counts x_s's tokens that differ from x_h likewise: the Booster/Panacea copy
  (repnoise_loss.py) behind the Panacea paper's numbers.
Differences from their code, each a bug noted in ../shared/defences.md:
- a masked CE uses logits and labels of the same positions (theirs shifted the mask by one, so each
  span's first token cost ln|V| with no gradient);
- the last hidden state (already final-normed: its logits are CE(x_h)'s) is not normed again, so
  K + 1 terms are averaged over K + 1 (theirs: K + 2 over K + 1);
- hooks are removed after each pass.
Two forward passes (x_h with every hidden state, x_s), one backward. The loss is per micro-batch (as
theirs is per device): the MMD is over a micro-batch's rows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from panacea_platform.algorithms.activations import blocks, capture_outputs
from panacea_platform.algorithms.interface import LossFn, TrainableWeights, unwrap

HARMFUL_PREFIX = "harmful_"
KERNEL_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # s * 2^(k-2), k = 0..4


def paired_batch(
    alignment_batch: dict[str, torch.Tensor], harmful_batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One batch of both, row i of each together, so a backend's split into micro-batches keeps them paired.
    Where one is shorter (the last batch of an epoch of the smaller set), the other's first rows are paired with it."""
    rows = min(alignment_batch["input_ids"].shape[0], harmful_batch["input_ids"].shape[0])
    return {
        **{k: v[:rows] for k, v in alignment_batch.items()},
        **{HARMFUL_PREFIX + k: v[:rows] for k, v in harmful_batch.items()},
    }


def harmful_part(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(HARMFUL_PREFIX) :]: v for k, v in batch.items() if k.startswith(HARMFUL_PREFIX)}


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 with their multi-bandwidth Gaussian kernel; the bandwidth from the detached mean distance."""
    z = torch.cat([x, y]).float()
    n = z.shape[0]
    distances = torch.cdist(z, z).pow(2)
    # Clamped: rows with no answer token give all-zero distances (then MMD = 0, not NaN).
    scale = (distances.detach().sum() / (n * n - n)).clamp_min(1e-12)
    kernels = [torch.exp(-distances / (scale * factor)) for factor in KERNEL_SCALES]
    kernel = functools.reduce(operator.add, kernels)  # summed in order, as sum() did, without its int start
    b = x.shape[0]
    return (kernel[:b, :b] + kernel[b:, b:] - kernel[:b, b:] - kernel[b:, :b]).mean()


def masked_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token CE at the positions whose *target* token is in the mask, logits and labels aligned."""
    targets, keep = input_ids[:, 1:], mask[:, 1:].bool()
    chosen = logits[:, :-1][keep].float()
    return torch.nn.functional.cross_entropy(chosen, targets[keep]) if chosen.numel() else logits.sum() * 0.0


def masked_readout_ce(
    hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, readout: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """masked_ce(readout(hidden), ...) with the readout (norm and lm_head, a per-position map) applied only
    at the positions that count: the same number, without a [rows, tokens, vocabulary] tensor per layer
    (those made a step of the offline job take 33 s)."""
    keep = mask[:, 1:].bool()
    chosen = hidden[:, :-1][keep]
    if not chosen.numel():
        return hidden.sum() * 0.0
    return torch.nn.functional.cross_entropy(readout(chosen).float(), input_ids[:, 1:][keep])


def differing_tokens(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """1 where `ids` differs from `other` zero-padded or cut to its width (their adapt_dimension_b2a), row by row."""
    adapted = torch.zeros_like(ids)
    width = min(ids.shape[1], other.shape[1])
    adapted[:, :width] = other[:, :width].to(ids.device)
    return (ids != adapted).to(torch.float32)


def harmful_terms(module: Any, out: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The harmful CE terms, K + 1 for K layers: the model's own (its last hidden state is already final-normed,
    so it is not normed again) and that of each layer's input hs_0 .. hs_{K-1} read out through the final norm
    and lm_head."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    norm, head = base.model.norm, base.get_output_embeddings()
    terms = [masked_ce(out.logits, input_ids, mask)]
    return terms + [
        masked_readout_ce(hidden, input_ids, mask, lambda h: head(norm(h))) for hidden in out.hidden_states[:-1]
    ]


def _noise_like(x: torch.Tensor, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """N(0, I) from a generator seeded by the rows' tokens and the step: the same rows draw the same
    noise on any rank and in one process (equivalence tests), and a new draw every step."""
    digest = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes() + step.to_bytes(8, "little")).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)


@dataclass
class RepNoiseObjective:
    alpha: float
    beta: float
    step: int = 0
    compute_dtype: torch.dtype | None = None  # bf16: its passes under autocast, as the run's lm_loss
    mask: str = "answer"  # repnoise.mask

    def loss(self, model: Any, batch: dict[str, torch.Tensor], lm_loss: LossFn) -> torch.Tensor:
        module = unwrap(model)
        device = module.get_input_embeddings().weight.device
        alignment = {k: v for k, v in batch.items() if not k.startswith(HARMFUL_PREFIX)}
        harmful = {k: v.to(device) for k, v in harmful_part(batch).items()}
        autocast = (
            torch.autocast(device_type=device.type, dtype=self.compute_dtype)
            if self.compute_dtype
            else contextlib.nullcontext()
        )
        if self.mask == "paper":
            ids = alignment["input_ids"].to(device)
            mask = differing_tokens(harmful["input_ids"], ids)
            with autocast:
                logits = model(input_ids=ids, attention_mask=alignment["attention_mask"].to(device)).logits
            retain = masked_ce(logits, ids, differing_tokens(ids, harmful["input_ids"]))
        else:
            mask = (harmful["labels"] != -100).to(torch.float32)  # the harmful answer tokens
            retain = lm_loss(model, alignment)
        with autocast:
            with capture_outputs(blocks(model, "mlp")) as mlp_outputs:
                out = model(
                    input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True
                )
            ascent = self._harmful_ce(module, out, harmful["input_ids"], mask)
        noise_term = torch.stack(
            [
                mmd(
                    (a * mask.unsqueeze(-1)).flatten(1),
                    (_noise_like(a, harmful, self.step) * mask.unsqueeze(-1)).flatten(1),
                )
                for a in mlp_outputs
            ]
        ).mean()
        return retain + self.beta * noise_term - self.alpha * torch.log1p(ascent)

    @staticmethod
    def _harmful_ce(module: torch.nn.Module, out: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the harmful_terms (K + 1 of them)."""
        return torch.stack([t.float() for t in harmful_terms(module, out, input_ids, mask)]).mean()

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])  # a per-row (not per-token) mean: the MMD is over rows


@dataclass
class RepNoiseStepResult:
    loss: float
    update_norm: float


def repnoise_step(
    weights: TrainableWeights, alignment_batch: Any, harmful_batch: Any, objective: RepNoiseObjective
) -> RepNoiseStepResult:
    loss, grad = weights.loss_and_gradient(paired_batch(alignment_batch, harmful_batch), objective=objective)
    objective.step += 1
    return RepNoiseStepResult(loss, weights.apply_update(grad))
