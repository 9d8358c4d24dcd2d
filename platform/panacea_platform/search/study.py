"""A study: one of the paper's tables as a grid of runs, printed in the paper's layout.

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

from pydantic import BaseModel, ConfigDict, Field

STUDY_TAG = "sweep.study"


class StudyHeadline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(..., description="The block's title, e.g. 'HS %'.")
    suite: str = Field(..., description="An evaluation suite of the job, e.g. harmful or task.")
    rate: str = Field(..., description="The suite's rate, e.g. harmful_score or accuracy.")


def default_headlines() -> list[StudyHeadline]:
    return [StudyHeadline(title="HS %", suite="harmful", rate="harmful_score"),
            StudyHeadline(title="FA %", suite="task", rate="accuracy")]


class StudySpec(BaseModel):
    """The table a study prints; its axes are grid parameters of the same space."""

    model_config = ConfigDict(extra="forbid")

    rows: str = Field(..., description="The searched field whose values are the table's rows, e.g. defence.")
    columns: str = Field(..., description="The searched field whose values are its columns, e.g. data.harmful_ratio.")
    reference: Any = Field(None, description="The row value every other row is paired against (e.g. sft); null: none.")
    headlines: list[StudyHeadline] = Field(default_factory=default_headlines, min_length=1)
    max_trials: int = Field(..., ge=1, description="The budget: the grid (x num_samples) may hold at most this many "
                            "trials, so a typo in a grid cannot start a study ten times the size intended.")


def study_problem(study: StudySpec, parameters: dict[str, Any], num_samples: int, evaluate: bool) -> str | None:
    """Why a space's study cannot run (None if it can); `parameters` maps a path to its Distribution."""
    for axis in ("rows", "columns"):
        path = getattr(study, axis)
        if path not in parameters or parameters[path].kind != "grid":
            return f"study.{axis} = {path!r}: expected one of the space's grid parameters ({', '.join(parameters)})"
    if study.rows == study.columns:
        return f"study.columns = {study.columns!r}: the same field as study.rows; pick two axes"
    if study.reference is not None and study.reference not in parameters[study.rows].values:
        return (f"study.reference = {study.reference!r}: expected one of {study.rows}'s values "
                f"{parameters[study.rows].values}")
    if not evaluate:
        return "study: its table reads the evaluation's per-prompt outcomes; set evaluate: true"
    trials = num_samples
    for distribution in parameters.values():
        trials *= len(distribution.values) if distribution.kind == "grid" else 1
    if trials > study.max_trials:
        return (f"study.max_trials = {study.max_trials}: the grid makes {trials} trials (num_samples {num_samples} x "
                f"{' x '.join(str(len(d.values)) for d in parameters.values() if d.kind == 'grid')}); shrink the grid "
                "or raise max_trials")
    return None


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


def format_block(study: StudySpec, headline: StudyHeadline, cells: dict[tuple, Cell], rows: list[Any],
                 columns: list[Any]) -> str:
    """One headline's table, then each row's paired differences to the reference, in the paper's layout."""
    from panacea_platform.evaluation.stats import clustered_rate, paired_difference

    width = 22
    header = f"{headline.title + ' by ' + study.columns:<28}" + "".join(f"{str(c):>{width}}" for c in columns)
    lines = [header + f"{'average':>10}", "-" * (len(header) + 10)]
    for row in rows:
        texts, means = [], []
        for column in columns:
            cell = cells.get((row, column))
            if cell is None:
                texts.append(f"{'-':>{width}}")
                continue
            rate = clustered_rate(cell.outcomes)
            means.append(rate.percent)
            texts.append(rate.text().rjust(width))
        average = f"{statistics.fmean(means):.1f}" if len(means) == len(columns) else "-"
        lines.append(f"{str(row):<28}" + "".join(texts) + f"{average:>10}")
    if study.reference is None:
        return "\n".join(lines)
    width = 36  # a difference, its interval and McNemar's p (one seed)
    lines += ["", f"{'Δ' + headline.title.split()[0] + ' vs ' + str(study.reference) + ' (pp)':<28}"
              + "".join(f"{str(c):>{width}}" for c in columns)]
    for row in (r for r in rows if r != study.reference):
        texts = []
        for column in columns:
            mine, theirs = cells.get((row, column)), cells.get((study.reference, column))
            if mine is None or theirs is None or len(mine.outcomes) != len(theirs.outcomes):
                texts.append(f"{'-':>{width}}")
                continue
            difference = paired_difference(mine.outcomes, theirs.outcomes)
            texts.append(difference.text().rjust(width))
        lines.append(f"{str(row):<28}" + "".join(texts))
    return "\n".join(lines)


def study_tag(space: Any) -> str:
    """The parent run's record of the study: its spec and the grid order of its rows and columns."""
    study = space.study
    return json.dumps({"spec": study.model_dump(mode="json"), "rows": space.parameters[study.rows].values,
                       "columns": space.parameters[study.columns].values})


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
    return StudyCells(spec, data["rows"], data["columns"],
                      [collect_cells(client, trials, spec, headline) for headline in spec.headlines])


def format_study(study: StudyCells) -> str:
    """Every headline's table, then what the intervals are."""
    blocks = [format_block(study.spec, headline, cells, study.rows, study.columns)
              for headline, cells in zip(study.spec.headlines, study.cells)]
    per_cell = max((len(c.outcomes) for cells in study.cells for c in cells.values()), default=0)
    interval = ("Wilson's 95% interval" if per_cell <= 1
                else "95% interval: bootstrap over prompts, each prompt's trials kept together")
    note = (f"{len(study.cells[0])} of {len(study.rows) * len(study.columns)} cells finished; {interval}; Δ: paired "
            "on the same prompts, 95% percentile bootstrap; average: the mean of a row's cells, as the paper's tables "
            "give it.")
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
            points = [(x, clustered_rate(cells[(row, c)].outcomes)) for x, c in zip(positions, study.columns)
                      if (row, c) in cells]
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
