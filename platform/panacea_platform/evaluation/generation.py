"""Greedy answer generation: batched (left padding, KV cache) and one prompt at a time.

Prompts arrive already rendered with the run's prompt template and are encoded
exactly as training encodes them (data/collate.tokenize_example: no special
tokens from the tokenizer, BOS prepended only when the tokenizer's own default
adds it), so the model sees at evaluation the prompt format it was trained on.

Batched greedy decoding gives the same answers as one prompt at a time when the
padding sits on the left and is masked: every row then ends at the same
position and transformers derives position ids from the attention mask
(cumsum - 1), so a padded row's real tokens keep positions 0..n-1. Batching
changes the shapes of the matrix products and so the float rounding (~1e-7);
that never changes an argmax unless two logits are that close.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GeneratedAnswer", "encode_prompt", "eos_token_ids", "generate", "generate_one_at_a_time", "length_batches"]


@dataclass(frozen=True)
class GeneratedAnswer:
    """One greedy answer. `truncated`: the token budget ran out before EOS.
    `new_tokens`: tokens the model generated for it, its EOS included."""

    text: str
    truncated: bool
    new_tokens: int


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's EOS ids and the tokenizer's.

    Passed to generate explicitly so that where generation stops and what we
    count as "ended with EOS" are the same set (SmolLM2-Instruct stops on
    <|im_end|>, which its generation config names, not only on the tokenizer's EOS).
    """
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    return ids


def encode_prompt(tokenizer: Any, rendered_prompt: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of a rendered prompt as training encodes it; an over-long prompt keeps its end.

    The end ("### Response:") is what the answer follows, so a prompt that must
    be cut loses its beginning, as in training.
    """
    from panacea_platform.data.collate import _adds_bos

    ids = list(tokenizer(rendered_prompt, add_special_tokens=False)["input_ids"])
    if _adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id, *ids]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[len(ids) - max_prompt_tokens :]
    return ids


def _pad_token_id(tokenizer: Any, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _left_padded(rows: Sequence[list[int]], pad_id: int):
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask


def _answer_from_ids(tokenizer: Any, generated: list[int], eos_ids: list[int], budget: int) -> GeneratedAnswer:
    """Cut a row of generated ids at its first EOS (what follows in a batch is padding)."""
    end = next((i for i, token in enumerate(generated) if token in eos_ids), None)
    if end is None:
        kept = generated[:budget]
        return GeneratedAnswer(tokenizer.decode(kept, skip_special_tokens=True), truncated=True, new_tokens=len(kept))
    return GeneratedAnswer(
        tokenizer.decode(generated[:end], skip_special_tokens=True), truncated=False, new_tokens=end + 1
    )


def _generate_batch(model: Any, tokenizer: Any, rows: list[list[int]], max_new_tokens: int, eos_ids: list[int]):
    import torch

    pad_id = _pad_token_id(tokenizer, eos_ids)
    input_ids, attention_mask = _left_padded(rows, pad_id)
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            # Greedy must stay greedy whatever the checkpoint's generation config asks for.
            temperature=None,
            top_p=None,
            top_k=None,
        )
    new = output[:, input_ids.shape[1] :].tolist()
    return [_answer_from_ids(tokenizer, ids, eos_ids, max_new_tokens) for ids in new]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[GeneratedAnswer]:
    """Greedy answers to rendered prompts, at most `batch_size` at a time, in the order given.

    Prompts are grouped by token length (longest first) so a batch wastes little
    on padding, and a batch holds at most `max_batch_tokens` padded prompt tokens
    (rows x longest prompt): one 700-token prompt among 80-token ones would
    otherwise make every row of its batch pay for 700 tokens of prefill and
    attention (measured: a batch of 40 ran 7x slower than two of 20 for that
    reason). Answers are put back in the caller's order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos_ids = eos_token_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, prompt, max_prompt_tokens) for prompt in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens: nothing to answer")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[GeneratedAnswer | None] = [None] * len(encoded)
    for chunk in length_batches([len(encoded[i]) for i in order], batch_size, max_batch_tokens):
        rows = [order[position] for position in chunk]
        for index, answer in zip(rows, _generate_batch(model, tokenizer, [encoded[i] for i in rows], max_new_tokens, eos_ids)):
            answers[index] = answer
    return [answer for answer in answers if answer is not None]


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Consecutive positions of `lengths` (sorted longest first) cut into batches of at most `batch_size`
    rows whose padded size (rows x first row's length) stays within `max_batch_tokens` (a longer
    prompt than the budget goes alone)."""
    batches: list[list[int]] = []
    for position, length in enumerate(lengths):
        current = batches[-1] if batches else None
        if current is not None and len(current) < batch_size and (
            max_batch_tokens is None or (len(current) + 1) * lengths[current[0]] <= max_batch_tokens
        ):
            current.append(position)
        else:
            batches.append([position])
    return batches


def generate_one_at_a_time(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, max_prompt_tokens: int | None = None
) -> list[GeneratedAnswer]:
    """The authors' loop: one prompt per generate call (batch size 1, no padding)."""
    eos_ids = eos_token_ids(model, tokenizer)
    answers = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, max_prompt_tokens)
        if not ids:
            raise ValueError("a prompt encodes to no tokens: nothing to answer")
        answers.extend(_generate_batch(model, tokenizer, [ids], max_new_tokens, eos_ids))
    return answers
