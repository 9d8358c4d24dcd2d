"""What a sweep's driver, its trials and its Tune callbacks share: the plan every trial receives, the score,
the final-report key and the progress lines. A leaf of search/: sweep.py and callbacks.py both import it,
never each other."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from panacea_platform.console import clock
from panacea_platform.search.report import TRIAL_TAG
from panacea_platform.search.space import SearchSpace

FINAL_KEY = "sweep_final"  # in a trial's last report: it ran to the end (not stopped early)


# -- score --------------------------------------------------------------------------------------


def compute_score(metrics: dict[str, Any], weights: dict[str, float]) -> float | None:
    """sum(weight * metric) when every weighted metric is present and finite, else None."""
    total = 0.0
    for name, weight in weights.items():
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return None
        total += weight * float(value)
    return total


# -- the plan every trial receives -----------------------------------------------------------------


@dataclass
class SweepPlan:
    """Everything a trial needs, picklable (passed with tune.with_parameters)."""

    name: str
    sweep_dir: str
    storage: str  # the sweep's state: Tune's experiment and each trial's Ray Train checkpoints (folder or URI)
    base: dict[str, Any]  # the resolved base RunConfig (aligned adapter set)
    space: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str

    def search_space(self) -> SearchSpace:
        return SearchSpace.model_validate(self.space)


def find_child_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    """The child run of `parent_run_id` tagged with this Tune trial id, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=10,
    )
    return runs[0] if runs else None


def time_left(ended_here: int, remaining: int, elapsed_s: float) -> str:
    """E.g. "ETA 4m10s": the trials left at the rate trials have ended in this process, as tqdm estimates a
    bar's (a resumed sweep's earlier trials do not count); "" before the first ends and after the last."""
    if ended_here <= 0 or remaining <= 0:
        return ""
    return f"ETA {clock(elapsed_s / ended_here * remaining)}"


def progress_line(
    plan: SweepPlan,
    trials: list,
    elapsed_s: float,
    event: str = "",
    ending: Any = None,
    ending_as: str = "",
    ended_here: int = 0,
) -> str:
    """`[sweep NAME] EVENT | 2/4 done, 1 running, 1 pending, 0 failed | best score=... (trial) | 63s, ETA 1m03s`.

    `ending` is a trial Tune is ending (its callbacks run before its status changes): counted as `ending_as`.
    `ended_here` trials ended since this process started, over `elapsed_s`: the rate of the time left.
    """
    space = plan.search_space()
    counts = {"TERMINATED": 0, "RUNNING": 0, "PENDING": 0, "ERROR": 0, "PAUSED": 0}
    for trial in trials:
        status = ending_as if ending is not None and trial is ending else trial.status
        counts[status] = counts.get(status, 0) + 1
    # Tune creates trials lazily (max_concurrent_trials): count the ones not created yet as pending.
    not_created = max(0, expected_trials(space) - len(trials))
    best = None
    for trial in trials:
        value = (trial.last_result or {}).get(space.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if best is None or (value < best[0] if space.mode == "min" else value > best[0]):
                best = (value, trial)
    shown = "no result yet"
    if best is not None:
        searched = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in (best[1].config or {}).get("params", {}).items()
        )
        shown = f"best {space.metric}={best[0]:.4g} ({best[1].trial_id}: {searched})"
    total = len(trials) + not_created
    eta = time_left(ended_here, total - counts["TERMINATED"] - counts["ERROR"], elapsed_s)
    return (
        f"[sweep {plan.name}] {event + ' | ' if event else ''}{counts['TERMINATED']}/{total} done, "
        f"{counts['RUNNING']} running, "
        f"{counts['PENDING'] + counts['PAUSED'] + not_created} pending, {counts['ERROR']} failed | {shown} | "
        f"{elapsed_s:.0f}s{', ' + eta if eta else ''}"
    )


def summary_line(name: str, trials: list[Any], status: str, wall_s: float) -> str:
    """`[sweep NAME] finished in 95s: 4/4 done (3 finished, 1 stopped early, 0 failed)`."""
    finished = sum(t.status == "FINISHED" for t in trials)
    stopped = sum(t.status == "KILLED" for t in trials)
    failed = sum(t.status == "FAILED" for t in trials)
    return (
        f"[sweep {name}] {status.lower()} in {wall_s:.0f}s: {finished + stopped + failed}/{len(trials)} done "
        f"({finished} finished, {stopped} stopped early, {failed} failed)"
    )


def expected_trials(space: SearchSpace) -> int:
    """Trials the sweep will run: num_samples times the product of the grid sizes."""
    count = space.num_samples
    for distribution in space.parameters.values():
        if distribution.kind == "grid":
            count *= len(distribution.values)
    return count
