"""Templates, tokenisation with prompt masking, padding and the batch stream."""

from __future__ import annotations

import pytest
import torch

from panacea_platform.data import Example
from panacea_platform.data.collate import IGNORE_INDEX, BatchStream, collate, tokenize_example
from panacea_platform.data.templates import TEMPLATES, render_prompt

SPECIALS = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]


def word_tokenizer(adds_bos: bool = False):
    """A whitespace word-level tokenizer: one token per word, so counts are easy to check."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = (
        " ".join(TEMPLATES["alpaca"].replace("{instruction}", "").split())
        + " placeholder question answer one two three four five six seven eight nine ten"
    )
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in words.split():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


EXAMPLE = Example(prompt="placeholder question one two", answer="answer three four", kind="task")


def test_render_prompt() -> None:
    assert render_prompt("plain", "hi") == "hi\n"
    assert render_prompt("alpaca", "do {x}").endswith("### Instruction:\ndo {x}\n\n### Response:\n")
    assert render_prompt("Q: {instruction} A:", "{braces} are safe") == "Q: {braces} are safe A:"
    with pytest.raises(ValueError, match="instruction"):
        render_prompt("no placeholder", "x")


def test_tokenize_masks_prompt_and_keeps_answer() -> None:
    tokenizer = word_tokenizer()
    features = tokenize_example(tokenizer, "plain", EXAMPLE, max_length=64)
    prompt_ids = tokenizer("placeholder question one two", add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("answer three four", add_special_tokens=False)["input_ids"]
    assert features["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert features["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    assert features["truncated"] is False
    assert tokenizer.unk_token_id not in features["input_ids"]


def test_bos_only_when_the_tokenizer_adds_one() -> None:
    with_bos = tokenize_example(word_tokenizer(adds_bos=True), "plain", EXAMPLE, 64)
    without = tokenize_example(word_tokenizer(), "plain", EXAMPLE, 64)
    bos = word_tokenizer().bos_token_id
    assert with_bos["input_ids"] == [bos] + without["input_ids"]
    assert with_bos["labels"][0] == IGNORE_INDEX
    assert without["input_ids"][0] != bos


def test_truncation_keeps_answer_and_prompt_end() -> None:
    tokenizer = word_tokenizer()
    long_prompt = Example(prompt=" ".join(["one"] * 30 + ["two", "three"]), answer="four five", kind="task")
    features = tokenize_example(tokenizer, "plain", long_prompt, max_length=10)
    assert features["truncated"] and len(features["input_ids"]) == 10
    ids = tokenizer.convert_ids_to_tokens(features["input_ids"])
    assert ids[-5:] == ["two", "three", "four", "five", "[EOS]"]  # prompt cut from the left
    assert sum(label != IGNORE_INDEX for label in features["labels"]) == 3

    long_answer = Example(prompt="two three", answer=" ".join(["six"] * 40), kind="task")
    features = tokenize_example(tokenizer, "plain", long_answer, max_length=10)
    assert features["truncated"] and len(features["input_ids"]) == 10
    assert tokenizer.convert_ids_to_tokens(features["input_ids"][:2]) == ["two", "three"]  # whole prompt kept
    assert features["labels"][:2] == [IGNORE_INDEX] * 2 and tokenizer.eos_token_id not in features["input_ids"]

    both_long = Example(prompt=" ".join(["one"] * 40), answer=" ".join(["six"] * 40), kind="task")
    features = tokenize_example(tokenizer, "plain", both_long, max_length=10)
    assert features["labels"].count(IGNORE_INDEX) == 5  # half each


def test_collate_pads_right_with_ignored_labels() -> None:
    tokenizer = word_tokenizer()
    short = tokenize_example(tokenizer, "plain", Example("one", "two", "task"), 64)
    long = tokenize_example(tokenizer, "alpaca", EXAMPLE, 64)
    batch = collate([short, long], tokenizer.pad_token_id)
    width = len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    n = len(short["input_ids"])
    assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][1].tolist() == long["labels"]
    assert batch["input_ids"].dtype == torch.long


def test_batch_stream_epochs_are_seeded_and_complete() -> None:
    features = [{"input_ids": [i + 1] * (1 + i % 3), "labels": [i + 1] * (1 + i % 3)} for i in range(10)]
    stream = BatchStream(features, batch_size=4, seed=0, pad_token_id=0)
    assert stream.steps_per_epoch == 3
    iterator = iter(stream)
    epoch0 = [next(iterator) for _ in range(3)]
    assert stream.epoch == 0
    assert [b["input_ids"].shape[0] for b in epoch0] == [4, 4, 2]  # last partial batch kept
    seen = sorted(int(row[0]) for b in epoch0 for row in b["input_ids"])
    assert seen == list(range(1, 11))  # every example exactly once per epoch
    epoch1 = [next(iterator) for _ in range(3)]
    assert stream.epoch == 1
    order = lambda batches: [int(row[0]) for b in batches for row in b["input_ids"]]  # noqa: E731
    assert order(epoch0) != order(epoch1)  # reshuffled
    again = iter(BatchStream(features, 4, 0, 0))
    assert order([next(again) for _ in range(6)]) == order(epoch0 + epoch1)
    other = iter(BatchStream(features, 4, 1, 0))
    assert order([next(other) for _ in range(3)]) != order(epoch0)


def test_batch_stream_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        BatchStream([], 4, 0, 0)
    with pytest.raises(ValueError):
        collate([], 0)
