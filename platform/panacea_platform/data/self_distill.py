"""The alignment's open benign requests, answered by the base model itself (self-distillation).

Trained on refusals beside short factual answers only, the aligned model learnt to decline
ordinary open requests too (a short poem, study tips). A provider without a stronger model
pairs such requests with what the base model, before alignment, answers itself: the stage
then teaches "refuse harmful requests" without teaching "refuse anything open-ended", and
the model's own style stays its own.

The alignment's requests are the first of data/prompts/open_requests_train.jsonl (160, disjoint
from the helpfulness suite's), the user's (data.task_self_distill: a user's ordinary instruction
data beside the task) the last: each a quarter more than the pairs asked for, plus 8, so that
dropped answers leave enough. Answers are greedy, `SELF_DISTILL_TOKENS` new tokens, cut back to their last
finished sentence; an answer that is empty, refuses, repeats itself or has no finished
sentence is dropped. They are cached under cache_dir()/self-distilled/, keyed by the base
model, the template, the requests and the budget: made once per model, on the driver
(prepare_data runs there before any worker), then reused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from panacea_platform.data.examples import Example

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig

__all__ = [
    "SELF_DISTILL_TOKENS",
    "check_request_ranges",
    "finished_sentences",
    "request_ranges",
    "self_distilled_examples",
    "user_self_distilled_examples",
]

SELF_DISTILL_TOKENS = 48
RECIPE_VERSION = 2  # 2: a quarter more requests than pairs, not all 160
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def finished_sentences(text: str, truncated: bool) -> str:
    """The answer up to its last finished sentence when the budget cut it, else the whole answer."""
    text = text.strip()
    if not truncated:
        return text
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else ""


def _usable(answer: str) -> bool:
    from panacea_platform.evaluation.judges.refusal import is_refusal
    from panacea_platform.evaluation.metrics import has_content, is_incoherent

    return has_content(answer) and not is_refusal(answer) and not is_incoherent(answer)


def _cache_file(config: RunConfig, prompts: list[str]) -> Path:
    from panacea_platform.models import cache_dir, resolve_model_path

    recipe = json.dumps(
        {
            "model": resolve_model_path(config.model.name),
            "template": config.data.prompt_template,
            "prompts": prompts,
            "tokens": SELF_DISTILL_TOKENS,
            "version": RECIPE_VERSION,
        },
        sort_keys=True,
    )
    return cache_dir() / "self-distilled" / f"{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.jsonl"


def _generate(config: RunConfig, prompts: list[str], out: Callable[[str], None]) -> list[dict]:
    import torch

    from panacea_platform.data.templates import render_prompt
    from panacea_platform.evaluation.generation import generate
    from panacea_platform.evaluation.pipeline import load_eval_model
    from panacea_platform.models import load_tokenizer

    out(
        f"[self-distill] the base model answers {len(prompts)} open requests "
        f"({SELF_DISTILL_TOKENS} new tokens each; once per model, then cached)"
    )
    tokenizer, model = load_tokenizer(config.model), load_eval_model(config.model, None)
    rendered = [render_prompt(config.data.prompt_template, p) for p in prompts]
    with torch.inference_mode():
        answers = generate(model, tokenizer, rendered, SELF_DISTILL_TOKENS, batch_size=32)
    return [
        {"prompt": p, "answer": finished_sentences(a.text, a.truncated), "raw": a.text, "truncated": a.truncated}
        for p, a in zip(prompts, answers)
    ]


def _request_count(wanted: int) -> int:
    # A quarter more requests than pairs wanted, plus 8 for small sets: about one answer in sixteen
    # is dropped (measured on SmolLM2: 150 of 160 usable), and generating all 160 would double the
    # wait for the rest.
    return wanted + wanted // 4 + 8 if wanted else 0


def request_ranges(alignment_pairs: int, user_pairs: int) -> tuple[slice, slice]:
    """Which of open_requests("train") each set asks: the alignment's from the front, the user's from the back,
    so neither moves when the other's size changes. Overlap is checked by `check_request_ranges`."""
    from panacea_platform.data.prompt_sets import open_requests

    available = len(open_requests("train"))
    return slice(0, _request_count(alignment_pairs)), slice(max(0, available - _request_count(user_pairs)), available)


def check_request_ranges(alignment_pairs: int, user_pairs: int) -> str | None:
    """Why the two self-distilled sets cannot both be cut from the 160 train requests (None if they can)."""
    from panacea_platform.data.prompt_sets import open_requests

    if not alignment_pairs or not user_pairs:
        return None  # one set alone may ask them all (and finds out then whether enough answers are usable)
    available = len(open_requests("train"))
    asked = _request_count(alignment_pairs) + _request_count(user_pairs)
    if asked > available:
        return (
            f"the alignment's {alignment_pairs} and the user's {user_pairs} self-distilled pairs ask "
            f"{asked} of the {available} open training requests (each asks a quarter more plus 8, for "
            "the answers that are dropped); lower data.task_self_distill or data.alignment_self_distill"
        )
    return None


def self_distilled_examples(config: RunConfig, out: Callable[[str], None] = print) -> list[Example]:
    """The alignment's first data.alignment_self_distill usable (request, base model's answer) pairs, kind "benign"."""
    wanted = config.data.alignment_self_distill
    return _self_distilled(config, request_ranges(wanted, 0)[0], wanted, "data.alignment_self_distill", out)


def user_self_distilled_examples(config: RunConfig, out: Callable[[str], None] = print) -> list[Example]:
    """The user's data.task_self_distill (request, base model's answer) pairs, kind "benign": a user's
    ordinary instruction data, in the model's own words, disjoint from the alignment's requests."""
    wanted = config.data.task_self_distill
    return _self_distilled(config, request_ranges(0, wanted)[1], wanted, "data.task_self_distill", out)


def _self_distilled(
    config: RunConfig, requests_range: slice, wanted: int, field: str, out: Callable[[str], None]
) -> list[Example]:
    from panacea_platform.data.errors import NotEnoughDataError
    from panacea_platform.data.prompt_sets import open_requests

    if wanted == 0:
        return []
    requests = open_requests("train")[requests_range]
    prompts = [e.prompt for e in requests]
    path = _cache_file(config, prompts)
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        records = _generate(config, prompts, out)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records))
        partial.replace(path)  # whole or absent: a killed run leaves no half-written cache
        out(f"[self-distill] cached in {path}")
    categories = {e.prompt: e.category for e in requests}
    usable = [
        Example(prompt=r["prompt"], answer=r["answer"], kind="benign", category=categories.get(r["prompt"]))
        for r in records
        if _usable(r["answer"])
    ]
    if len(usable) < wanted:
        raise NotEnoughDataError(
            f"{field} = {wanted}: the base model gave {len(usable)} usable answers to the "
            f"{len(prompts)} open requests asked (the others were empty, refusals or unfinished); lower the field"
        )
    return usable[:wanted]
