"""A study's spec: which of a sweep's grid parameters are the rows and columns of one of the paper's tables.

A study is a sweep (search/sweep.py) whose space declares `study:`, e.g. defence x data.harmful_ratio
(the Panacea paper's Table 1) or defence x data.n (Table 2); recipes/study.py prints its tables.
This is the spec, checked with the space before any trial, and the record the sweep leaves on its parent run.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

STUDY_TAG = "sweep.study"


class StudyHeadline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(..., description="The block's title, e.g. 'HS %'.")
    suite: str = Field(..., description="An evaluation suite of the job, e.g. harmful or task.")
    rate: str = Field(..., description="The suite's rate, e.g. harmful_score or accuracy.")


def default_headlines() -> list[StudyHeadline]:
    return [
        StudyHeadline(title="HS %", suite="harmful", rate="harmful_score"),
        StudyHeadline(title="FA %", suite="task", rate="accuracy"),
    ]


class StudySpec(BaseModel):
    """The table a study prints; its axes are grid parameters of the same space."""

    model_config = ConfigDict(extra="forbid")

    rows: str = Field(..., description="The searched field whose values are the table's rows, e.g. defence.")
    columns: str = Field(..., description="The searched field whose values are its columns, e.g. data.harmful_ratio.")
    reference: Any = Field(None, description="The row value every other row is paired against (e.g. sft); null: none.")
    headlines: list[StudyHeadline] = Field(default_factory=default_headlines, min_length=1)
    max_trials: int = Field(
        ...,
        ge=1,
        description="The budget: the grid (x num_samples) may hold at most this many "
        "trials, so a typo in a grid cannot start a study ten times the size intended.",
    )


def study_problem(study: StudySpec, parameters: dict[str, Any], num_samples: int, evaluate: bool) -> str | None:
    """Why a space's study cannot run (None if it can); `parameters` maps a path to its Distribution."""
    for axis in ("rows", "columns"):
        path = getattr(study, axis)
        if path not in parameters or parameters[path].kind != "grid":
            return f"study.{axis} = {path!r}: expected one of the space's grid parameters ({', '.join(parameters)})"
    if study.rows == study.columns:
        return f"study.columns = {study.columns!r}: the same field as study.rows; pick two axes"
    if study.reference is not None and study.reference not in parameters[study.rows].values:
        return (
            f"study.reference = {study.reference!r}: expected one of {study.rows}'s values "
            f"{parameters[study.rows].values}"
        )
    if not evaluate:
        return "study: its table reads the evaluation's per-prompt outcomes; set evaluate: true"
    trials = num_samples
    for distribution in parameters.values():
        trials *= len(distribution.values) if distribution.kind == "grid" else 1
    if trials > study.max_trials:
        return (
            f"study.max_trials = {study.max_trials}: the grid makes {trials} trials (num_samples {num_samples} x "
            f"{' x '.join(str(len(d.values)) for d in parameters.values() if d.kind == 'grid')}); shrink the grid "
            "or raise max_trials"
        )
    return None


def study_tag(space: Any) -> str:
    """The parent run's record of the study: its spec and the grid order of its rows and columns."""
    study = space.study
    return json.dumps(
        {
            "spec": study.model_dump(mode="json"),
            "rows": space.parameters[study.rows].values,
            "columns": space.parameters[study.columns].values,
        }
    )
