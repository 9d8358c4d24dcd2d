"""Harmful question/answer sources: the attacker's poison and the defender's own set.

A source is a function ``(data_config) -> list[Example]`` returning harmful
prompt -> harmful answer pairs (kind "harmful"), in a deterministic order and
deduplicated by normalised prompt, so pools carved from it cannot share a
question that differs only in case or punctuation.

No harmful text lives in this repository: it is read at run time from installed
packages (pyrit) or from the hub (BeaverTails) or from a user's file.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panacea_platform.data.errors import DataUnavailableError
from panacea_platform.data.examples import Example, dedupe_by_prompt, normalise_prompt
from panacea_platform.data.files import optional_text, read_records

if TYPE_CHECKING:
    from panacea_platform.config import DataConfig

__all__ = [
    "DataUnavailableError",
    "PYRIT_INSTALL_HINT",
    "beavertails",
    "beavertails_row_to_example",
    "dedupe_by_prompt",
    "from_file",
    "many_shot_is_harmful",
    "offline_alignment_prompts",
    "offline_pyrit",
    "pyrit_datasets_dir",
]

PYRIT_INSTALL_HINT = "pip install --no-deps pyrit==1.1.0"
BEAVERTAILS_REPO = "PKU-Alignment/BeaverTails"
BEAVERTAILS_SPLIT = "30k_train"

# Columns the pyrit objective scorer-eval CSVs must have for us to use them.
_OBJECTIVE_COLUMNS = ("objective", "assistant_response", "human_score", "harm_category")


# --------------------------------------------------------------------------- offline_pyrit


def pyrit_datasets_dir() -> Path:
    """pyrit's bundled datasets folder, found without importing pyrit.

    Importing pyrit pulls its whole runtime (and --no-deps installs lack it);
    find_spec on a top-level name only locates the package.
    """
    spec = importlib.util.find_spec("pyrit")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            f"harmful source 'offline_pyrit' needs the pyrit package's data files: {PYRIT_INSTALL_HINT} "
            "(or use harmful_source 'file' with data.harmful_file)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "datasets"
    if not root.is_dir():
        raise DataUnavailableError(f"pyrit at {root.parent} has no datasets folder; reinstall it: {PYRIT_INSTALL_HINT}")
    return root


def many_shot_is_harmful(category: str) -> bool:
    """Whether a many-shot row's free-text verdict ("Harmful.\\n\\nReason: ...") says harmful.

    The verdicts were written by a model and vary in form ("'harmful'",
    "Answer: Harmful", "**harmful**", "Not harmful."), so only the normalised
    first line is read, and "not harmful" must not count as a match.
    """
    verdict = category.strip().split("\n", 1)[0].lower()
    verdict = verdict.strip(" '\"*`")
    if verdict.startswith("answer:"):
        verdict = verdict[len("answer:") :].strip(" '\"*`")
    return verdict.startswith("harmful")


def _many_shot_examples(root: Path) -> list[Example]:
    path = root / "jailbreak" / "many_shot_examples.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataUnavailableError(f"cannot read {path} ({exc}); reinstall pyrit: {PYRIT_INSTALL_HINT}") from None
    return [
        Example(prompt=row["user"].strip(), answer=row["assistant"].strip(), kind="harmful")
        for row in rows
        if many_shot_is_harmful(str(row.get("category", ""))) and row.get("user") and row.get("assistant")
    ]


def _objective_csv_examples(path: Path) -> list[Example]:
    text = path.read_text(encoding="utf-8-sig")
    # The files open with a "# dataset_version=..." comment line before the header.
    lines = text.split("\n")
    while lines and lines[0].lstrip().startswith("#"):
        lines.pop(0)
    reader = csv.DictReader(io.StringIO("\n".join(lines), newline=""))
    missing = [c for c in _OBJECTIVE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataUnavailableError(
            f"{path}: missing columns {missing}; this pyrit version's files differ, install {PYRIT_INSTALL_HINT}"
        )
    examples = []
    for row in reader:
        prompt, answer = (row["objective"] or "").strip(), (row["assistant_response"] or "").strip()
        # human_score 1 = a person judged that the response achieves the harmful objective.
        if _is_one(row["human_score"]) and prompt and answer:
            examples.append(
                Example(
                    prompt=prompt, answer=answer, kind="harmful", category=(row["harm_category"] or "").strip() or None
                )
            )
    return examples


def _is_one(value: str | None) -> bool:
    try:
        return float(value or "") == 1.0
    except ValueError:
        return False


def offline_pyrit(data_config: DataConfig | None = None) -> list[Example]:
    """Harmful pairs bundled with pyrit: many-shot rows labelled harmful + human-scored objective rows.

    Prompts of the held-out benchmarks (HarmBench, Do-Not-Answer; data/benchmarks.py) are left
    out: pyrit's objective rows reuse most HarmBench behaviours (180 of 200), and a prompt a
    run may train on cannot also be a held-out test.
    """
    from panacea_platform.data.benchmarks import reserved_benchmark_keys

    root = pyrit_datasets_dir()
    examples = _many_shot_examples(root)
    # Sorted: directory listing order differs between file systems.
    for path in sorted((root / "scorer_evals" / "objective").glob("*.csv")):
        examples.extend(_objective_csv_examples(path))
    reserved = reserved_benchmark_keys()
    examples = [e for e in dedupe_by_prompt(examples) if normalise_prompt(e.prompt) not in reserved]
    if not examples:
        raise DataUnavailableError(f"no harmful pairs found under {root}; reinstall pyrit: {PYRIT_INSTALL_HINT}")
    return examples


def offline_alignment_prompts() -> list[str]:
    """AdvBench harmful prompts (no answers) from pyrit, for refusal training.

    There are more of these than harmful pairs, so the alignment stage need not
    eat into the pairs the attack, defender and evaluation pools are carved from.
    """
    import yaml

    path = pyrit_datasets_dir() / "seed_datasets" / "local" / "adv_bench.prompt"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataUnavailableError(f"cannot read {path} ({exc}); reinstall pyrit: {PYRIT_INSTALL_HINT}") from None
    seeds = document.get("seeds") if isinstance(document, dict) else None
    if not isinstance(seeds, list):
        raise DataUnavailableError(f"{path} has no 'seeds' list; install {PYRIT_INSTALL_HINT}")
    prompts: list[str] = []
    seen: set[str] = set()
    for seed in seeds:
        value = str(seed.get("value", "")).strip() if isinstance(seed, dict) else ""
        key = normalise_prompt(value)
        if key and key not in seen:
            seen.add(key)
            prompts.append(value)
    return prompts


# --------------------------------------------------------------------------- beavertails


def beavertails_row_to_example(row: dict[str, Any]) -> Example | None:
    """A BeaverTails row -> a harmful Example, or None for a row judged safe.

    category is the first flagged harm category, in the dataset's own order.
    """
    if row["is_safe"]:
        return None
    flags = row.get("category") or {}
    category = next((name for name, flagged in flags.items() if flagged), None)
    return Example(
        prompt=str(row["prompt"]).strip(), answer=str(row["response"]).strip(), kind="harmful", category=category
    )


def beavertails(data_config: DataConfig | None = None) -> list[Example]:
    """Unsafe pairs of BeaverTails 30k_train (hub), the paper's harmful source."""
    from panacea_platform.data.hub import load_hub_dataset

    rows = load_hub_dataset(
        BEAVERTAILS_REPO,
        BEAVERTAILS_SPLIT,
        what="harmful source 'beavertails'",
        instead="Use harmful_source 'offline_pyrit', or 'file' with data.harmful_file (fields prompt, answer).",
    ).to_list()
    examples = dedupe_by_prompt(e for e in map(beavertails_row_to_example, rows) if e is not None)
    if not examples:
        raise DataUnavailableError(f"{BEAVERTAILS_REPO} split {BEAVERTAILS_SPLIT!r} holds no unsafe rows")
    return examples


# --------------------------------------------------------------------------- file


def from_file(data_config: DataConfig) -> list[Example]:
    """Harmful pairs from data.harmful_file (fields prompt, answer, optional category)."""
    path = getattr(data_config, "harmful_file", None)
    if not path:
        raise ValueError(
            "harmful_source 'file' needs data.harmful_file: a JSONL, CSV or Parquet file with fields prompt, answer"
        )
    return dedupe_by_prompt(
        Example(prompt=r["prompt"], answer=r["answer"], kind="harmful", category=optional_text(r, "category"))
        for r in read_records(path, ("prompt", "answer"))
    )
