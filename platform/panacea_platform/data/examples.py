"""The one record type every data source produces, and prompt normalisation."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

EXAMPLE_KINDS = ("task", "harmful", "refusal", "benign")


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair.

    `label` is kept apart from `answer` because accuracy is exact match on a short
    target ("42", "positive", "Sports") while the answer the model is trained on
    may be a whole sentence of reasoning.
    """

    prompt: str
    answer: str
    kind: str  # "task" | "harmful" | "refusal" | "benign"
    label: str | None = None  # exact-match target for accuracy (e.g. "42", "positive", "Sports")
    category: str | None = None

    def __post_init__(self) -> None:
        # Pools and metrics count examples by kind; a misspelt kind would be
        # silently left out of those counts instead of failing here.
        if self.kind not in EXAMPLE_KINDS:
            raise ValueError(f"Example.kind must be one of {EXAMPLE_KINDS}, got {self.kind!r}")


_WHITESPACE = re.compile(r"\s+")
# Quotes count as end punctuation: a source that quotes its prompts must still
# match the same prompt unquoted when pools are checked for overlap.
_END_PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u2026"


def normalise_prompt(text: str) -> str:
    """Lowercase, collapse whitespace and strip punctuation at both ends.

    Two prompts that differ only in case, spacing or a trailing "?" are the same
    question; treating them as different would let one leak across pools.
    """
    return _WHITESPACE.sub(" ", text.lower()).strip().strip(_END_PUNCTUATION).strip()


def dedupe_by_prompt(examples: Iterable[Example]) -> list[Example]:
    """First occurrence of each normalised prompt, in input order."""
    seen: set[str] = set()
    kept = []
    for example in examples:
        key = normalise_prompt(example.prompt)
        if key and key not in seen:
            seen.add(key)
            kept.append(example)
    return kept
