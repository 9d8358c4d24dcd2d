"""What a reader of the MLflow UI needs beside the numbers: each run's description, the headline
metrics under short names that sort together, and the answers as a table.

In the UI (`tracking.runs_page` gives the link): the runs page lists the main job's parent run with
its methods as children; Columns, type "headline", tick the group, and HS, FA, capability,
over-refusal and answered stand side by side for every method; a run's page shows its description,
and its artifacts hold eval/<folder>/answers.json, which the UI shows as a table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig

HEADLINE_PREFIX = "headline."
# The columns of a row of the answers table, in the order a reader scans them.
ANSWER_COLUMNS = ("suite", "prompt", "answer", "flagged", "refused", "empty", "correct", "judge", "score", "new_tokens")


def training_note(config: RunConfig, stage: str) -> str:
    """A training run's description: what stage and defence, on what data, with which settings."""
    from panacea_platform.algorithms.convention import describe
    from panacea_platform.algorithms.defences import stage_defence

    defence = stage_defence(config, stage)
    data = config.data
    section = getattr(config, defence.name, None)  # each defence's settings: its section of the config
    values = section.model_dump(by_alias=True, exclude={"fine_tuning"}) if section is not None else {}
    settings = ", ".join(f"{key} {value}" for key, value in values.items()) or "none"
    if stage == "align":
        what = f"Alignment by {defence.name} on {data.alignment_size} refusal and helpful pairs"
    else:
        what = (
            f"Fine-tuning under {defence.name} on {data.n} user samples of {data.task}, "
            f"harmful ratio p = {data.harmful_ratio:g} ({data.harmful_source})"
        )
    lines = [f"**{what}**, seed {config.seed}, model {config.model.name}.", f"- defence settings: {settings}"]
    if stage == "finetune":
        lines.append(f"- fine-tuning: {describe(config)}")
    return "\n".join(lines)


def headline_metrics(columns: dict[str, tuple[str, str] | None], evaluation: dict[str, float]) -> dict[str, float]:
    """`headline.HS`, `headline.FA`, ... from an evaluation's eval/SUITE/RATE metrics: `columns` maps a
    short name to its (suite, rate); one the job does not evaluate is left out."""
    found = {}
    for name, where in columns.items():
        value = evaluation.get(f"eval/{where[0]}/{where[1]}") if where else None
        if value is not None:
            found[HEADLINE_PREFIX + name] = value
    return found


def answers_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation's samples cut to the columns a reader scans (the full rows stay in samples.jsonl)."""
    return [{key: record.get(key) for key in ANSWER_COLUMNS} for record in records]
