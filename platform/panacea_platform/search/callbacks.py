"""Ray callbacks of a sweep: scored Train-to-Tune reports (in each trial) and, in the driver,
truthful MLflow statuses for every trial and readable progress lines.

This module imports Ray at the top: only sweep.py imports it, inside functions.
Tune pickles its callbacks with the experiment state (Tuner.restore brings them
back), so they hold plain data only and rebuild their MLflow client lazily.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from panacea_platform.search.plan import (
    FINAL_KEY,
    SweepPlan,
    compute_score,
    expected_trials,
    find_child_run,
    progress_line,
    time_left,
)
from panacea_platform.search.space import SearchSpace


class ScoredTuneReportCallback(TuneReportCallback):
    """Forwards each Ray Train report to Tune, adding `score` whenever all its terms are present."""

    def __init__(self, score_weights: dict[str, float]) -> None:
        super().__init__()
        self.score_weights = dict(score_weights)

    def after_report(self, run_context, metrics, checkpoint):
        scored = []
        for worker_metrics in metrics:
            worker_metrics = dict(worker_metrics)
            # "done" is Tune's own key: a Train report carrying it would end the trial
            # before its final evaluation and report.
            if "done" in worker_metrics:
                worker_metrics["train_done"] = worker_metrics.pop("done")
            score = compute_score(worker_metrics, self.score_weights)
            if score is not None:
                worker_metrics["score"] = score
            scored.append(worker_metrics)
        super().after_report(run_context, scored, checkpoint)


def _is_print(function: Any) -> bool:
    # An earlier builtins.print (a default argument bound before a library patched it) included.
    return getattr(function, "__name__", "") == "print" and getattr(function, "__module__", "") == "builtins"


def _print(line: str) -> None:
    print(line, flush=True)


def trial_error_text(trial) -> str:
    """The last line of the trial's error file (the exception), or a pointer to Tune's folder."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text().strip().splitlines() if line.strip()]
        return (lines[-1] if lines else "unknown error")[:5000]
    return "the trial raised an error (see its folder under the sweep's tune/)"


class TrialStatusCallback(tune.Callback):
    """Ends each trial's child run truthfully from the driver (a stopped trial's own process is killed).

    Complete with the final report -> FINISHED; complete without it -> stopped by
    the scheduler: KILLED with tags stopped_by and stopped_at_step; error -> FAILED
    with the error as a tag.
    """

    def __init__(self, plan: SweepPlan, scheduler_name: str) -> None:
        self.plan = plan
        self.scheduler_name = scheduler_name
        self._client = None
        self._experiment_id = None

    def __getstate__(self) -> dict[str, Any]:
        return {"plan": self.plan, "scheduler_name": self.scheduler_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        TrialStatusCallback.__init__(self, state["plan"], state["scheduler_name"])

    def _child_run(self, trial):
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.plan.tracking_uri)
            self._experiment_id = self._client.get_run(self.plan.parent_run_id).info.experiment_id
        return find_child_run(self._client, self._experiment_id, self.plan.parent_run_id, trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run = self._child_run(trial)
        if run is None:
            return
        last = trial.last_result or {}
        if last.get(FINAL_KEY):
            if run.info.status == "RUNNING":
                self._client.set_terminated(run.info.run_id, status="FINISHED")
            return
        release_placement_group(run.data.tags)
        self._client.set_tag(run.info.run_id, "stopped_by", self.scheduler_name)
        if last.get("step") is not None:
            self._client.set_tag(run.info.run_id, "stopped_at_step", str(last["step"]))
        self._client.set_terminated(run.info.run_id, status="KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run = self._child_run(trial)
        if run is None:
            return
        release_placement_group(run.data.tags)
        if "error" not in run.data.tags:
            self._client.set_tag(run.info.run_id, "error", trial_error_text(trial))
        self._client.set_terminated(run.info.run_id, status="FAILED")


def release_placement_group(tags: dict[str, str]) -> bool:
    """Remove the placement group of a stopped or failed trial's fit at once; True if one was removed.

    Tune frees the trial's own CPUs, but the fit's workers were placed by Ray Train in a group of their
    own, which outlives the trial: Ray Train's cleaner removes it only when Ray's state API (the
    dashboard) answers, and else it held its CPUs until the sweep's driver ended."""
    import ray.util
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    from panacea_platform.training.launch_ray import PLACEMENT_GROUP_TAG

    group = tags.get(PLACEMENT_GROUP_TAG)
    if not group or ray.util.placement_group_table().get(group, {}).get("state") in (None, "REMOVED"):
        return False
    ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))
    return True


class ProgressCallback(tune.Callback):
    """One line as each trial ends: how it ended, the sweep's counts and best so far (Tune's table, when
    console.bars(), shows the trials as they run)."""

    def __init__(self, plan: SweepPlan, scheduler_name: str, out: Callable[[str], None] | None = None) -> None:
        self.plan, self.scheduler_name = plan, scheduler_name
        # Some libraries replace builtins.print, which then cannot be pickled: None means print.
        self.out = _print if out is None or _is_print(out) else out
        self.start, self.ended = time.monotonic(), 0  # trials ended in this process: the ETA's rate

    def __getstate__(self) -> dict[str, Any]:
        # `out` may be a test's list.append or print; the clock restarts after a restore.
        out = None if self.out is _print else self.out
        return {"plan": self.plan, "scheduler_name": self.scheduler_name, "out": out}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ProgressCallback.__init__(self, **state)

    def on_trial_complete(self, iteration, trials, trial, **info):
        early = "" if (trial.last_result or {}).get(FINAL_KEY) else f" (stopped early by {self.scheduler_name})"
        self._line(trials, f"trial {trial.trial_id} done{early}", trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, f"trial {trial.trial_id} FAILED: {trial_error_text(trial)[:300]}", trial, "ERROR")

    def _line(self, trials, event: str, ending: Any, ending_as: str) -> None:
        self.ended += 1
        elapsed = time.monotonic() - self.start
        self.out(progress_line(self.plan, trials, elapsed, event, ending, ending_as, self.ended))


class TrialTable(tune.CLIReporter):
    """Tune's table, with the searched values and the sweep's metric as its columns, and a line above it with
    the trials ended and the time left (Tune's own header has the time passed only)."""

    def __init__(self, space: SearchSpace, every_s: float) -> None:
        super().__init__(
            parameter_columns={f"params/{path}": path for path in space.parameters},
            metric_columns=[space.metric],
            max_report_frequency=int(max(1, every_s)),
        )
        self.expected = expected_trials(space)
        self.ended_before: int | None = None  # a resumed sweep's trials that had ended: not this run's rate

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        super().report(trials, done, *sys_info, self.ended_line(trials, time.time() - self._start_time))

    def ended_line(self, trials: list, elapsed_s: float) -> str:
        """The line above the table, e.g. "3/9 trials ended, ETA 12m00s"."""
        ended = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        if self.ended_before is None:
            self.ended_before = ended
        total = max(len(trials), self.expected)
        eta = time_left(ended - self.ended_before, total - ended, elapsed_s)
        return f"{ended}/{total} trials ended" + (f", {eta}" if eta else "")
