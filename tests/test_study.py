"""A study's table (recipes/study.py) from trials recorded in a real MLflow store: each cell is the rate of the
trial at its (row, column), with its interval; the average is the row's mean; each paired difference is the one
its trials' samples give. The grid run end to end on the tiny model is in test_sweep.py."""

import json
import re
from dataclasses import dataclass, field

import pytest

from panacea_platform.evaluation.stats import clustered_rate, paired_difference
from panacea_platform.recipes.study import study_table
from panacea_platform.search.study_config import STUDY_TAG, StudySpec


@dataclass
class Trial:  # what search.report.collect_trials gives: params of the study's axes, status, tags
    trial_id: str
    run_id: str
    params: dict
    status: str = "FINISHED"
    tags: dict = field(default_factory=lambda: {"sweep_final": "true"})


def _samples(path, harmful, task):
    # The fields samples.jsonl records per answer (evaluation/results.py reads a rate's outcome from them).
    rows = [{"suite": "harmful", "prompt": f"h{i}", "flagged": flag} for i, flag in enumerate(harmful)]
    rows += [{"suite": "task", "prompt": f"t{i}", "correct": flag} for i, flag in enumerate(task)]
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


# Each cell's outcomes differ, so a cell read from the wrong trial changes the table.
OUTCOMES = {
    ("sft", 0.0): ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1] * 10),
    ("sft", 0.2): ([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1] * 9 + [0]),
    ("panacea", 0.0): ([0] * 10, [1] * 8 + [0, 0]),
    ("panacea", 0.2): ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], [1] * 7 + [0] * 3),
}


@pytest.fixture
def recorded(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("study")
    spec = StudySpec(rows="defence", columns="data.harmful_ratio", reference="sft", max_trials=4)
    parent = client.create_run(experiment).info.run_id
    client.set_tag(
        parent,
        STUDY_TAG,
        json.dumps({"spec": spec.model_dump(mode="json"), "rows": ["sft", "panacea"], "columns": [0.0, 0.2]}),
    )
    trials = []
    for index, ((defence, p), (harmful, task)) in enumerate(OUTCOMES.items()):
        run = client.create_run(experiment).info.run_id
        client.log_param(run, "output_dir", str(tmp_path / "trials"))
        client.log_param(run, "run_name", f"t{index}")
        _samples(
            tmp_path / "trials" / f"t{index}" / "eval" / "samples.jsonl",
            [bool(x) for x in harmful],
            [bool(x) for x in task],
        )
        trials.append(Trial(f"t{index}", run, {"defence": defence, "data.harmful_ratio": p}))
    # A trial stopped early has no place in the table.
    stopped = client.create_run(experiment).info.run_id
    trials.append(Trial("t9", stopped, {"defence": "sft", "data.harmful_ratio": 0.0}, status="KILLED", tags={}))
    return client, parent, trials


def _flags(cell, headline):
    return [bool(x) for x in OUTCOMES[cell][0 if headline == "HS" else 1]]


def test_every_cell_average_and_paired_difference_is_the_one_its_trials_give(recorded):
    client, parent, trials = recorded
    table = study_table(client, parent, trials)
    hs, fa = table.split("FA % by data.harmful_ratio")
    for block, headline in ((hs, "HS"), (fa, "FA")):
        for defence in ("sft", "panacea"):
            row = next(line for line in block.splitlines() if line.startswith(defence))
            rates = [clustered_rate([_flags((defence, p), headline)]) for p in (0.0, 0.2)]
            assert row.split()[0] == defence and all(rate.text() in row for rate in rates), row
            assert row.rstrip().endswith(f"{(rates[0].percent + rates[1].percent) / 2:.1f}"), row
        paired = block.split(f"Δ{headline} vs sft (pp)")[1]
        line = next(line for line in paired.splitlines() if line.startswith("panacea"))
        for p in (0.0, 0.2):
            assert paired_difference([_flags(("panacea", p), headline)], [_flags(("sft", p), headline)]).text() in line
    assert "4 of 4 cells finished; Wilson's 95% interval" in table
    # Columns in the grid's order, rows in the grid's order.
    header = next(line for line in hs.splitlines() if line.startswith("HS % by"))
    assert header.split()[-3:] == ["0.0", "0.2", "average"]
    # Each column as wide as its widest cell: no cell runs into the next, and the columns line up.
    for block in table.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not set(line) <= {"-"}][:3]
        if len(lines) > 1 and "cells finished" not in block:
            assert len({len(line) for line in lines}) == 1, lines
            ends = [sorted(m.end() for m in re.finditer(r"\S(?=  |$)", line)) for line in lines]
            assert all(set(ends[0][1:]) <= set(row) for row in ends[1:]), lines  # columns end where headers do


def test_a_missing_cell_is_a_dash_and_a_plain_sweep_has_no_table(recorded):
    client, parent, trials = recorded
    table = study_table(
        client, parent, [t for t in trials if t.params != {"defence": "panacea", "data.harmful_ratio": 0.2}]
    )
    row = next(line for line in table.splitlines() if line.startswith("panacea"))
    assert row.split()[-2:] == ["-", "-"]  # the missing cell, and no average over a partial row
    assert "3 of 4 cells finished" in table
    plain = client.create_run(client.get_run(parent).info.experiment_id).info.run_id
    assert study_table(client, plain, trials) is None
