"""`panacea bench sweep`: how much of a sweep's wall time is training, read from MLflow.

- wall time: the parent run's start to end (to now while it runs; a resumed
  sweep counts the time between the kill and the rerun too);
- training time of a trial: from its first to its last logged training step,
  plus one mean step for the first step itself (the MLflow timestamps of the
  per-step `task_loss` metric);
- trial time: the child run's start to end (start-up of Ray Train, data, model,
  evaluation and logging included).

overhead = wall / sum(training time): 1.0 would be a sweep that does nothing
but train, one trial at a time; concurrent trials can bring it below 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class SweepTiming:
    trials: int
    wall_s: float
    training_s: float
    trial_s: float
    overhead: float
    per_trial_startup_s: float


def training_seconds(client, run_id: str, key: str = "task_loss") -> float:
    """First to last logged step of `key`, plus one mean step (the first step's own time)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)
    if len(history) < 2:
        return 0.0
    span = (history[-1].timestamp - history[0].timestamp) / 1000.0
    steps = history[-1].step - history[0].step
    return span + span / steps if steps else span


def bench_sweep(
    tracking_uri: str, sweep: str, *, experiment: str | None = None, out: Callable[[str], None] = print
) -> SweepTiming:
    """Print and return the sweep's wall time against the sum of its trials' training time."""
    from mlflow.tracking import MlflowClient

    from panacea_platform.search.report import collect_trials, resolve_parent

    client = MlflowClient(tracking_uri=tracking_uri)
    parent_id = resolve_parent(client, sweep, experiment)
    parent = client.get_run(parent_id)
    end_ms = parent.info.end_time or int(time.time() * 1000)
    wall = (end_ms - parent.info.start_time) / 1000.0
    trials = collect_trials(client, parent_id)
    training = sum(training_seconds(client, row.run_id) for row in trials)
    trial_time = sum(((row.end_ms or end_ms) - row.start_ms) / 1000.0 for row in trials if row.start_ms)
    overhead = wall / training if training else float("inf")
    startup = (trial_time - training) / len(trials) if trials else 0.0
    name = parent.data.tags.get("sweep", parent_id)
    out(f"sweep {name}: {len(trials)} trials, parent run {parent.info.status.lower()}")
    out(f"  wall time (parent run)           {wall:9.1f} s")
    out(f"  trial time (child runs, summed)  {trial_time:9.1f} s")
    out(f"  training time (steps, summed)    {training:9.1f} s")
    out(
        f"  overhead: wall / training = {overhead:.2f}x; per trial {startup:.1f} s outside its training steps "
        "(Ray Train start-up, model and data loading, evaluation, logging)"
    )
    return SweepTiming(len(trials), wall, training, trial_time, overhead, startup)
