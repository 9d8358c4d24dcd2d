"""The language-model loss, and the held-out losses, each rank computing its shard of them."""

from __future__ import annotations

import functools
import inspect
import statistics
from collections.abc import Callable
from typing import Any

import torch

from panacea_platform.algorithms.defences import Defence
from panacea_platform.algorithms.interface import TrainableWeights
from panacea_platform.config import RunConfig
from panacea_platform.data.collate import collate
from panacea_platform.training.microbatch import shard_bounds


def training_loss(config: RunConfig) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """lm_loss with the run's compute dtype: under bf16 the forward (and so the backward) matrix products
    run in bf16 through torch.autocast, while the fp32 LoRA weights get fp32 gradients."""
    if config.model.compute_dtype == "float32":
        return lm_loss

    def autocast_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = model.get_input_embeddings().weight.device
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return lm_loss(model, batch)

    return autocast_lm_loss


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over answer tokens (prompt and padding carry label -100).

    The vocabulary projection runs only at the positions whose next token is an answer token in
    some row of the batch (`logits_to_keep`): a prompt position's logits never enter the loss,
    and with a 49k-token vocabulary they cost 10-20% of a step when answers are short (a label).
    The loss is the one HF computes from every logit (tested to 1e-6, gradients too).
    """
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    targets = labels[:, 1:]
    positions = (targets != -100).any(dim=0).nonzero().squeeze(1)
    if positions.numel() == 0 or not _takes_logits_to_keep(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=-100
    )


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under a DeepSpeed engine and a PEFT wrapper accepts `logits_to_keep`."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    model_class: Any = type(base)  # mypy reads type[Any] as unhashable; a class is hashable
    return _forward_takes_logits_to_keep(model_class)


@functools.cache
def _forward_takes_logits_to_keep(model_class: Any) -> bool:
    # Read once per model class: lm_loss runs on every pass of every step.
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@torch.no_grad()
def mean_loss(
    model: Any, features: list[dict], batch_size: int, pad_token_id: int, strategy: Any | None = None
) -> float:
    """Token-weighted mean loss over a held-out set (forward only), each rank scoring its shard.

    The set's batches are dealt out to the ranks in contiguous runs, and the ranks' (loss sum, token
    count) pairs are summed. Where a forward pass is collective (ZeRO-3 gathers the weights in it),
    every rank runs the same number of passes: a rank whose share is shorter repeats a batch with
    weight zero.
    """
    rank, world = (strategy.rank, strategy.world_size) if strategy is not None else (0, 1)
    batches = [features[start : start + batch_size] for start in range(0, len(features), batch_size)]
    mine = batches[slice(*shard_bounds(len(batches), rank, world))]
    rounds = -(-len(batches) // world) if getattr(strategy, "forward_is_collective", False) else len(mine)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for index in range(rounds):
        padding = index >= len(mine)
        batch = collate(mine[index] if not padding else batches[0], pad_token_id)
        count = int((batch["labels"][:, 1:] != -100).sum())
        if count:
            loss = lm_loss(model, batch).item()
            if not padding:
                total += loss * count
                tokens += count
    model.train(was_training)
    if world > 1 and strategy is not None:  # more than one rank means a strategy that reduces
        total, tokens = strategy.all_reduce_sum([total, float(tokens)])
    return total / max(tokens, 1)


def heldout_signals(
    model: torch.nn.Module,
    weights: TrainableWeights,
    defence: Defence,
    eval_task: list[dict],
    eval_harmful: list[dict],
    batch_size: int,
    pad_token_id: int,
    strategy: Any | None = None,
    probe: tuple[list[list[int]], tuple[int, ...]] | None = None,
) -> dict[str, float]:
    """Mid-training held-out losses: task and harmful at w, and both as released (w + eps); with `probe`
    (encoded prompts, end ids), the mean P(first new token is an end token) on them at w and as released.

    eps is what the defence would add were training to stop now: Panacea's last
    eps, the random baseline's noise (drawn from a generator of its own, so no
    RNG state of the run is consumed), none for SFT. Forward passes only; the
    weights are w again, bit for bit, afterwards. Every rank takes part, each
    scoring its shard.
    """

    def score(features: list[dict]) -> float:
        return mean_loss(model, features, batch_size, pad_token_id, strategy)

    def first_end() -> dict[str, float]:
        # Every rank scores every probe prompt: the same forwards on each, as ZeRO-3's gathers need.
        if probe is None:
            return {}
        from panacea_platform.evaluation.first_token import end_probabilities_of_rows

        rows, end_ids = probe
        return {
            "heldout_first_end_prob": statistics.fmean(end_probabilities_of_rows(model, rows, end_ids, pad_token_id))
        }

    signals = {"heldout_task_loss": score(eval_task), "heldout_harmful_loss": score(eval_harmful), **first_end()}
    eps = defence.final_perturbation(weights)
    if eps is None:
        signals["released_heldout_harmful_loss"] = signals["heldout_harmful_loss"]
        signals["released_heldout_task_loss"] = signals["heldout_task_loss"]
        if probe is not None:
            signals["released_heldout_first_end_prob"] = signals["heldout_first_end_prob"]
        return signals
    with weights.perturbed(eps):
        signals["released_heldout_harmful_loss"] = score(eval_harmful)
        signals["released_heldout_task_loss"] = score(eval_task)
        signals.update({f"released_{k}": v for k, v in first_end().items()})
    return signals
