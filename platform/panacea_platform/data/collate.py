"""Tokenisation with prompt masking, padding, and an endless seeded batch stream.

The loss is taken on answer tokens only (labels -100 on the prompt): the model
should learn to answer, not to reproduce the prompt, and the harmful loss h(w)
of Panacea must measure how readily the model produces harmful answers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, TypedDict

import torch

from panacea_platform.data.examples import Example
from panacea_platform.data.templates import render_prompt

__all__ = ["IGNORE_INDEX", "BatchStream", "TokenizedExample", "collate", "tokenize_example"]

# The index torch's cross-entropy (and transformers' causal-LM loss) skips.
IGNORE_INDEX = -100


class TokenizedExample(TypedDict):
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own default encoding starts with BOS.

    Probing beats trusting `bos_token_id` alone: Llama adds <s> and its model
    expects it, while SmolLM2 defines a BOS token but never adds it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)


def tokenize_example(tokenizer: Any, template: str, example: Example, max_length: int) -> TokenizedExample:
    """Token ids of rendered prompt + answer + EOS, with labels only on the answer.

    Prompt and answer are encoded separately so the mask boundary is exact (a
    joint encoding can merge the last prompt token with the first answer token).

    Truncation to `max_length`: the answer keeps what fits after the whole
    prompt, but never less than half of `max_length`; the prompt is then cut
    from the left, because its end ("### Response:") is what the answer follows
    and the template's preamble is the least informative part. An answer longer
    than its share loses its tail (EOS included).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt and one answer token), got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: the model could not learn where an answer ends")
    prompt_ids = list(tokenizer(render_prompt(template, example.prompt), add_special_tokens=False)["input_ids"])
    if _adds_bos(tokenizer):
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    answer_ids = [*tokenizer(example.answer, add_special_tokens=False)["input_ids"], eos]

    truncated = len(prompt_ids) + len(answer_ids) > max_length
    if truncated:
        answer_keep = min(len(answer_ids), max(max_length - len(prompt_ids), max_length // 2))
        prompt_keep = min(len(prompt_ids), max_length - answer_keep)
        answer_ids = answer_ids[:answer_keep]
        prompt_ids = prompt_ids[len(prompt_ids) - prompt_keep :]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "truncated": truncated,
    }


def collate(
    features: Sequence[dict[str, Any]], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenised examples into input_ids, attention_mask and labels tensors.

    `pad_to` sets a minimum width (benchmarks pad every batch to one shape).
    """
    if not features:
        raise ValueError("cannot collate an empty list of examples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set the tokenizer's pad token (e.g. to its EOS token)")
    width = max(max(len(f["input_ids"]) for f in features), pad_to or 0)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    # Padding is masked in labels too, so a pad id equal to EOS is never trained on.
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchStream:
    """Collated batches forever, reshuffled each epoch.

    The order of epoch e depends only on (seed, e), so a run is reproducible and
    two streams with the same seed agree batch for batch. The last batch of an
    epoch may be smaller: dropping it would silently discard samples (with
    n = 10 and batch 8, a fifth of the poison).
    """

    def __init__(self, features: Sequence[dict[str, Any]], batch_size: int, seed: int, pad_token_id: int) -> None:
        if not features:
            raise ValueError("BatchStream needs at least one example; the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.features = list(features)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.epoch = 0
        self.steps_per_epoch = math.ceil(len(self.features) / batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of example indices used in `epoch`."""
        # sha256 of both numbers: seed * K + epoch would collide across (seed, epoch) pairs.
        digest = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
        return torch.randperm(len(self.features), generator=generator).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """The stream from its `start`-th batch on (0-based): what `iter(self)` yields after skipping `start`.

        Fast-forwarding is arithmetic (epoch = start // steps_per_epoch), so a run
        resumed at step k draws the batches k+1, k+2, ... of an uninterrupted run
        without collating (or shuffling) the batches it skips.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        epoch, offset = divmod(start, self.steps_per_epoch)
        while True:
            self.epoch = epoch
            order = self.epoch_order(epoch)
            for begin in range(offset * self.batch_size, len(order), self.batch_size):
                batch = [self.features[i] for i in order[begin : begin + self.batch_size]]
                yield collate(batch, self.pad_token_id)
            offset = 0
            epoch += 1
