"""A study's tables: one of the paper's tables from a sweep's grid of runs, in the paper's layout.

A study is a sweep (search/sweep.py) whose space declares `study:` and whose grid parameters are the
table's axes, e.g. defence x data.harmful_ratio (the Panacea paper's Table 1) or defence x data.n
(Table 2). It runs as one Ray Tune experiment under one MLflow parent run, and a rerun resumes it.
When its trials have finished it prints, for each headline (HS on a harm suite, FA on the task), a row
per value of `rows`, a column per value of `columns` and the paper's average over them; each cell is a
rate with its 95% interval (Wilson's for one seed; over seeds, a bootstrap over prompts with each
prompt's seeds kept together), and each row's paired difference to the `reference` row in the same
column, on the same prompts (percentile bootstrap).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from panacea_platform.search.study_config import STUDY_TAG, StudyHeadline, StudySpec


@dataclass
class Cell:
    """The outcomes of every finished trial at one (row, column): one list of per-prompt outcomes per trial."""

    outcomes: list[list[bool]]


def _samples_path(params: dict[str, str]) -> Path:
    # The trial's evaluation (search/sweep.py, _final_evaluation) writes into <run folder>/eval.
    return Path(params["output_dir"]) / params["run_name"] / "eval" / "samples.jsonl"


def collect_cells(client: Any, trials: list[Any], study: StudySpec, headline: StudyHeadline) -> dict[tuple, Cell]:
    """(row value, column value) -> the finished trials' outcomes on the headline's suite and rate."""
    from panacea_platform.evaluation.results import read_outcomes

    cells: dict[tuple, Cell] = {}
    for trial in trials:
        if trial.status != "FINISHED" or trial.tags.get("sweep_final") != "true":
            continue
        params = client.get_run(trial.run_id).data.params
        samples = _samples_path(params)
        if not samples.is_file():
            continue
        key = (trial.params[study.rows], trial.params[study.columns])
        cells.setdefault(key, Cell([])).outcomes.append(read_outcomes(samples, headline.suite, headline.rate))
    return cells


def format_block(
    study: StudySpec, headline: StudyHeadline, cells: dict[tuple, Cell], rows: list[Any], columns: list[Any]
) -> str:
    """One headline's table, then each row's paired differences to the reference, in the paper's layout."""
    from panacea_platform.evaluation.stats import clustered_rate, paired_difference

    rates, averages = [], []
    for row in rows:
        measured = [clustered_rate(cell.outcomes) if cell else None for cell in (cells.get((row, c)) for c in columns)]
        rates.append((str(row), [rate.text() if rate else "-" for rate in measured]))
        known = [rate.percent for rate in measured if rate]
        averages.append(f"{statistics.fmean(known):.1f}" if len(known) == len(columns) else "-")
    lines = aligned(f"{headline.title} by {study.columns}", columns, rates, ("average", averages))
    lines.insert(1, "-" * len(lines[0]))
    if study.reference is None:
        return "\n".join(lines)
    differences = []
    for row in (r for r in rows if r != study.reference):
        texts = []
        for column in columns:
            mine, theirs = cells.get((row, column)), cells.get((study.reference, column))
            if mine is None or theirs is None or len(mine.outcomes) != len(theirs.outcomes):
                texts.append("-")
            else:
                texts.append(paired_difference(mine.outcomes, theirs.outcomes).text())
        differences.append((str(row), texts))
    title = f"Δ{headline.title.split()[0]} vs {study.reference} (pp)"
    return "\n".join([*lines, "", *aligned(title, columns, differences)])


def aligned(
    title: str, columns: list[Any], rows: list[tuple[str, list[str]]], last: tuple[str, list[str]] | None = None
) -> list[str]:
    """A header and a line per row: the labels left-aligned, each column right-aligned as wide as its widest
    text and two spaces from the next, so that no cell runs into its neighbour."""
    headers = [str(column) for column in columns] + ([last[0]] if last else [])
    cells = [texts + ([last[1][i]] if last else []) for i, (_, texts) in enumerate(rows)]
    widths = [max([len(header)] + [len(texts[j]) for texts in cells]) for j, header in enumerate(headers)]
    label = max([len(title)] + [len(name) for name, _ in rows])
    lines = [title.ljust(label) + "".join(f"  {header:>{w}}" for header, w in zip(headers, widths))]
    for (name, _), texts in zip(rows, cells):
        lines.append(name.ljust(label) + "".join(f"  {text:>{w}}" for text, w in zip(texts, widths)))
    return lines


@dataclass
class StudyCells:
    """A study's spec, its grid order, and each headline's cells, read once from MLflow and the trials' samples."""

    spec: StudySpec
    rows: list[Any]
    columns: list[Any]
    cells: list[dict[tuple, Cell]]  # one per headline, in spec.headlines' order


def read_study(client: Any, parent_run_id: str, trials: list[Any]) -> StudyCells | None:
    """The study recorded on the sweep's parent run with its finished trials' outcomes; None for a plain sweep."""
    raw = client.get_run(parent_run_id).data.tags.get(STUDY_TAG)
    if not raw:
        return None
    data = json.loads(raw)
    spec = StudySpec.model_validate(data["spec"])
    return StudyCells(
        spec,
        data["rows"],
        data["columns"],
        [collect_cells(client, trials, spec, headline) for headline in spec.headlines],
    )


def format_study(study: StudyCells) -> str:
    """Every headline's table, then what the intervals are."""
    blocks = [
        format_block(study.spec, headline, cells, study.rows, study.columns)
        for headline, cells in zip(study.spec.headlines, study.cells)
    ]
    per_cell = max((len(c.outcomes) for cells in study.cells for c in cells.values()), default=0)
    interval = (
        "Wilson's 95% interval"
        if per_cell <= 1
        else "95% interval: bootstrap over prompts, each prompt's trials kept together"
    )
    note = (
        f"{len(study.cells[0])} of {len(study.rows) * len(study.columns)} cells finished; {interval}; Δ: paired "
        "on the same prompts, 95% percentile bootstrap; average: the mean of a row's cells, as the paper's tables "
        "give it."
    )
    return "\n\n".join([*blocks, note])


def study_table(client: Any, parent_run_id: str, trials: list[Any]) -> str | None:
    """The study's tables from its finished trials, or None when the sweep is not a study."""
    study = read_study(client, parent_run_id, trials)
    return None if study is None else format_study(study)


def plot_study(study: StudyCells, path: Path) -> Path:
    """One panel per headline: each row's rate against the columns, with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from panacea_platform.evaluation.stats import clustered_rate

    headlines = study.spec.headlines
    figure, axes = plt.subplots(1, len(headlines), figsize=(5.5 * len(headlines), 4), squeeze=False)
    positions = list(range(len(study.columns)))
    for axis, headline, cells in zip(axes[0], headlines, study.cells):
        for row in study.rows:
            points = [
                (x, clustered_rate(cells[(row, c)].outcomes))
                for x, c in zip(positions, study.columns)
                if (row, c) in cells
            ]
            if not points:
                continue
            xs, rates = [x for x, _ in points], [r for _, r in points]
            errors = [[r.percent - r.ci_low for r in rates], [r.ci_high - r.percent for r in rates]]
            axis.errorbar(xs, [r.percent for r in rates], yerr=errors, marker="o", capsize=3, label=str(row))
        axis.set_xticks(positions, [str(c) for c in study.columns])
        axis.set_xlabel(study.spec.columns)
        axis.set_ylabel(headline.title)
        axis.set_title(f"{headline.title} ({headline.suite}), 95% intervals")
    axes[0][0].legend(title=study.spec.rows, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
