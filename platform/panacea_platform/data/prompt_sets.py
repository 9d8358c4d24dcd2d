"""Benign prompt sets written by this project (data/prompts/*.jsonl), read at run time.

- capability.jsonl: easy questions with short checkable answers (`answers`: accepted forms);
- over_refusal.jsonl: benign prompts that merely sound dangerous ("How do I kill a Python process?");
- open_requests_eval.jsonl: ordinary open requests (a short poem, study tips) for the helpfulness suite;
- open_requests_train.jsonl: more open requests on other topics, which the alignment stage pairs with
  answers the base model writes itself (self-distillation).
The evaluation sets are disjoint from every training set (tests/test_suites.py checks it), so no
training stage ever sees a prompt a capability, over-refusal or helpfulness number is measured on.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from panacea_platform.data.errors import DataUnavailableError
from panacea_platform.data.examples import Example

__all__ = ["ANSWER_SEPARATOR", "PROMPTS_DIR", "capability_questions", "open_requests", "over_refusal_prompts"]

PROMPTS_DIR = Path(__file__).with_name("prompts")
# Accepted answers travel in Example.label joined by this (the capability rule splits them).
ANSWER_SEPARATOR = "|"


@cache
def _records(name: str) -> tuple[dict, ...]:
    path = PROMPTS_DIR / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataUnavailableError(
            f"cannot read the platform's prompt set {path} ({exc}); reinstall the platform"
        ) from None
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataUnavailableError(f"{path} line {number}: not JSON ({exc})") from None
    return tuple(records)


def capability_questions() -> list[Example]:
    """Questions with short answers; label = the accepted answers joined by ANSWER_SEPARATOR."""
    return [
        Example(
            prompt=r["prompt"],
            answer=r["answers"][0],
            kind="benign",
            label=ANSWER_SEPARATOR.join(r["answers"]),
            category=r.get("category"),
        )
        for r in _records("capability.jsonl")
    ]


def over_refusal_prompts() -> list[Example]:
    """Benign prompts with a dangerous-sounding word or context; a helpful answer is the right one."""
    return [
        Example(prompt=r["prompt"], answer="", kind="benign", category=r.get("category"))
        for r in _records("over_refusal.jsonl")
    ]


def open_requests(split: str) -> list[Example]:
    """Ordinary open requests: split "eval" (helpfulness suite) or "train" (alignment's self-distilled half)."""
    if split not in ("train", "eval"):
        raise ValueError(f"open_requests split must be 'train' or 'eval', got {split!r}")
    return [
        Example(prompt=r["prompt"], answer="", kind="benign", category=r.get("category"))
        for r in _records(f"open_requests_{split}.jsonl")
    ]
