"""`panacea report`: a sweep's trials as a table and its Pareto plot, read through MlflowClient only.

Everything comes from the tracking server (the parent run's tags name the
searched parameters and the objectives; each child run holds its params,
metrics and status), so a report works on a team's server as well as on the
local SQLite store.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panacea_platform.config import ConfigError
from panacea_platform.search.pareto import pareto_front

TRIAL_TAG = "tune_trial_id"  # the same tag sweep.py sets on every child run
SWEEP_TAG = "sweep"
SIGNAL_COLUMNS = (
    ("task loss", "heldout_task_loss"),
    ("harm loss w", "heldout_harmful_loss"),
    ("harm loss rel.", "released_heldout_harmful_loss"),
    ("task loss rel.", "released_heldout_task_loss"),
)
EVAL_COLUMNS = (
    ("HS %", "eval/harmful/harmful_score"),
    ("FA %", "eval/task/accuracy"),
    ("answered %", "eval/helpfulness/answered_rate"),
)
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class SweepNotFoundError(ConfigError):
    """No sweep parent run matches the name or id given."""


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_ms: int | None = None
    end_ms: int | None = None

    @property
    def label(self) -> str:
        if self.status == "KILLED" and "stopped_by" in self.tags:
            return f"stopped ({self.tags['stopped_by']})"
        return self.status.lower()


@dataclass
class SweepReport:
    parent_run_id: str
    parameters: list[str]
    objectives: list[tuple[str, str]]
    trials: list[TrialRow] = field(default_factory=list)
    front: list[bool] = field(default_factory=list)
    table: str = ""
    plot: Path | None = None


def resolve_parent(client, sweep: str, experiment: str | None = None) -> str:
    """The parent run id of a sweep given by name (latest such sweep) or by run id."""
    if _RUN_ID.match(sweep):
        try:
            return client.get_run(sweep).info.run_id
        except Exception:  # noqa: BLE001 - MLflow raises its own RestException / MlflowException
            pass
    experiments = client.search_experiments()
    if experiment is not None:
        experiments = [e for e in experiments if e.name == experiment] or experiments
    runs = (
        client.search_runs(
            [e.experiment_id for e in experiments],
            filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.stage = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiments
        else []
    )
    if not runs:
        raise SweepNotFoundError(
            f"--sweep {sweep!r}: no sweep with that name or parent run id in {client.tracking_uri} "
            "(pass the name given to `panacea sweep --name`, or the parent run id, and the same -c job / tracking URI)"
        )
    return runs[0].info.run_id


def collect_trials(client, parent_run_id: str) -> list[TrialRow]:
    """Every child run of the sweep that is a Tune trial, oldest first."""
    parent = client.get_run(parent_run_id)
    parameters = json.loads(parent.data.tags.get("sweep.parameters", "[]"))
    rows, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            max_results=500,
            page_token=token,
        )
        for run in page:
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id is None:
                continue  # e.g. the alignment run the sweep trained first
            rows.append(
                TrialRow(
                    trial_id=trial_id,
                    run_id=run.info.run_id,
                    status=run.info.status,
                    params={p: _param(run.data.params, p) for p in parameters},
                    metrics=dict(run.data.metrics),
                    tags=dict(run.data.tags),
                    start_ms=run.info.start_time,
                    end_ms=run.info.end_time,
                )
            )
        token = page.token
        if not token:
            break
    rows.sort(key=lambda row: row.trial_id)
    return rows


def _param(params: dict[str, str], path: str) -> Any:
    value = params.get(path)
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def objectives_of(parent) -> list[tuple[str, str]]:
    raw = parent.data.tags.get("sweep.objectives")
    if not raw:
        return [("eval/harmful/harmful_score", "min"), ("eval/task/accuracy", "max")]
    return [(metric, mode) for metric, mode in json.loads(raw)]


def front_flags(trials: list[TrialRow], objectives: list[tuple[str, str]]) -> list[bool]:
    """Pareto flags over the finished trials (stopped and failed ones are never on the front)."""
    finished = [row.status == "FINISHED" for row in trials]
    flags = pareto_front([row.metrics if ok else {} for row, ok in zip(trials, finished)], objectives)
    return [flag and ok for flag, ok in zip(flags, finished)]


def _cell(value: Any, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.4g}"
    return f"{str(value):>{width}}"


def _rate_cell(metrics: dict[str, float], key: str, width: int) -> str:
    """A rate with its 95% interval when the trial logged one (eval/SUITE/RATE_ci_low/_ci_high)."""
    value, low, high = metrics.get(key), metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if value is None or low is None or high is None:
        return _cell(value, width)
    return f"{f'{value:.1f} [{low:.1f}, {high:.1f}]':>{width}}"


def format_table(
    trials: list[TrialRow], parameters: list[str], objectives: list[tuple[str, str]], front: list[bool]
) -> str:
    """One line per trial: searched values, harmful score, accuracy (with their intervals), cheap signals,
    score, status, front."""
    metric_columns = list(EVAL_COLUMNS) + list(SIGNAL_COLUMNS) + [("score", "score")]
    for metric, _ in objectives:
        if metric not in [key for _, key in metric_columns]:
            metric_columns.append((metric[-14:], metric))
    widths = [20 if key.startswith("eval/") else 15 for _, key in metric_columns]
    # A searched value's column is as wide as its name or its widest value needs, two spaces apart.
    names = [p.split(".")[-1] for p in parameters]
    param_widths = [
        max([10, len(name) + 2] + [len(_cell(row.params.get(p), 0)) + 2 for row in trials])
        for name, p in zip(names, parameters)
    ]
    header = f"{'trial':<14}" + "".join(f"{name:>{w}}" for name, w in zip(names, param_widths))
    header += "".join(f"{name:>{w}}" for (name, _), w in zip(metric_columns, widths)) + f"{'status':>18}{'front':>7}"
    lines = [header, "-" * len(header)]
    for row, on_front in zip(trials, front):
        line = f"{row.trial_id:<14}" + "".join(_cell(row.params.get(p), w) for p, w in zip(parameters, param_widths))
        line += "".join(_rate_cell(row.metrics, key, w) for (_, key), w in zip(metric_columns, widths))
        line += f"{row.label:>18}{'*' if on_front else '':>7}"
        lines.append(line)
    directions = ", ".join(f"{metric} {'down' if mode == 'min' else 'up'}" for metric, mode in objectives)
    lines.append(
        f"front (*): not dominated among finished trials on {directions}; [95% Wilson interval]; "
        "'harm loss rel.' = held-out harmful loss of the released model w + eps (higher = safer)"
    )
    return "\n".join(lines)


def plot_pareto(
    trials: list[TrialRow],
    parameters: list[str],
    objectives: list[tuple[str, str]],
    front: list[bool],
    path: str | Path,
    title: str,
) -> Path:
    """Scatter of the finished trials on the first two objectives, with their 95% intervals where the
    trials logged them, the front ringed (and joined when there are two objectives); a third objective
    colours the points."""
    from panacea_platform.plots import _pyplot

    plt = _pyplot()
    (x_metric, x_mode), (y_metric, y_mode) = objectives[0], objectives[1]
    third = objectives[2] if len(objectives) > 2 else None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    points = [
        (row, x, y, flag)
        for row, flag in zip(trials, front)
        if (x := row.metrics.get(x_metric)) is not None and (y := row.metrics.get(y_metric)) is not None
    ]
    on_front = sorted((p for p in points if p[3]), key=lambda p: p[1])
    # A trial's evaluation logs each rate's 95% Wilson interval beside it (eval/SUITE/RATE_ci_low/_ci_high).
    for row, x, y, _ in points:
        xerr, yerr = _error_bar(row.metrics, x_metric, x), _error_bar(row.metrics, y_metric, y)
        if xerr is not None or yerr is not None:
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.6", capsize=2, zorder=1)
    if third is not None and points:
        shade = ax.scatter(
            [p[1] for p in points],
            [p[2] for p in points],
            c=[p[0].metrics.get(third[0], float("nan")) for p in points],
            cmap="viridis",
            s=50,
            label="trial",
            zorder=3,
        )
        fig.colorbar(shade, ax=ax, label=f"{third[0]} ({'lower' if third[1] == 'min' else 'higher'} is better)")
    elif points:
        ax.scatter(
            [p[1] for p in points if not p[3]], [p[2] for p in points if not p[3]], c="grey", alpha=0.6, label="trial"
        )
    if on_front:
        # Over three objectives the front is not a curve in these two axes: ring its points, do not join them.
        ax.plot(
            [p[1] for p in on_front],
            [p[2] for p in on_front],
            "o-" if third is None else "o",
            c="tab:red",
            mfc="none",
            ms=11,
            label="Pareto front" + (" (all objectives)" if third is not None else ""),
        )
    for row, x, y, _ in points:
        text = ", ".join(f"{p.split('.')[-1]}={_short(row.params.get(p))}" for p in parameters)
        if third is not None and row.metrics.get(third[0]) is not None:
            text += f" ({third[0].split('/')[-1]} {row.metrics[third[0]]:.3g})"
        ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{x_metric} ({'lower' if x_mode == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y_metric} ({'lower' if y_mode == 'min' else 'higher'} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _error_bar(metrics: dict[str, float], metric: str, value: float) -> list[list[float]] | None:
    low, high = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
    if low is None or high is None:
        return None
    return [[max(0.0, value - low)], [max(0.0, high - value)]]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def study_report(
    client: Any, parent_run_id: str, trials: list[TrialRow], folder: Path, out: Callable[[str], None]
) -> str | None:
    """A study's tables and plot (recipes/study.py), printed and logged on the parent run; None for a plain sweep."""
    from panacea_platform.recipes.study import format_study, plot_study, read_study

    study = read_study(client, parent_run_id, trials)
    if study is None:
        return None
    table = format_study(study)
    out(table)
    (folder / "study.txt").write_text(table + "\n")
    plot = plot_study(study, folder / "study.png")
    for path in (folder / "study.txt", plot):
        client.log_artifact(parent_run_id, str(path))
    out(f"study plot: {plot}")
    return table


def sweep_report(
    tracking_uri: str,
    sweep: str,
    *,
    experiment: str | None = None,
    out: Callable[[str], None] = print,
    output_dir: str | Path | None = None,
) -> SweepReport:
    """Print the trials table, write the Pareto plot (PNG) and log both on the parent run."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent_run_id = resolve_parent(client, sweep, experiment)
    parent = client.get_run(parent_run_id)
    parameters = json.loads(parent.data.tags.get("sweep.parameters", "[]"))
    objectives = objectives_of(parent)
    trials = collect_trials(client, parent_run_id)
    front = front_flags(trials, objectives)
    table = format_table(trials, parameters, objectives, front)
    out(table)
    name = parent.data.tags.get(SWEEP_TAG, parent_run_id)
    folder = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="panacea-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    plot = plot_pareto(trials, parameters, objectives, front, folder / "pareto.png", f"sweep {name}: Pareto front")
    (folder / "trials.txt").write_text(table + "\n")
    (folder / "trials.json").write_text(
        json.dumps(
            [
                {
                    "trial_id": t.trial_id,
                    "run_id": t.run_id,
                    "status": t.status,
                    "params": t.params,
                    "metrics": t.metrics,
                    "on_front": f,
                }
                for t, f in zip(trials, front)
            ],
            indent=2,
        )
    )
    for path in (plot, folder / "trials.txt", folder / "trials.json"):
        client.log_artifact(parent_run_id, str(path))
    for row, flag in zip(trials, front):
        client.set_tag(row.run_id, "pareto_front", str(flag).lower())
    study_report(client, parent_run_id, trials, folder, out)
    client.set_tag(parent_run_id, "pareto_front_trials", ",".join(t.trial_id for t, f in zip(trials, front) if f))
    out(f"Pareto plot: {plot} (also an artifact of MLflow run {parent_run_id})")
    return SweepReport(parent_run_id, parameters, objectives, trials, front, table, plot)
