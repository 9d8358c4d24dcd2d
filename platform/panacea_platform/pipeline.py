"""The main job: align, attack the aligned model with harmful fine-tuning under each defence, evaluate, compare.

One MLflow parent run holds everything: per seed, the alignment run (trained
once per alignment setting and reused), then one fine-tuning run per arm
(SFT at p = 0 as the control, SFT, random perturbation, Panacea at p), each
evaluated (harmful score with the run's judge, refusal rate, fine-tune
accuracy) into its own run. The result is a table shaped like the paper's,
with the spread over seeds, an HS-against-FA plot and eps per layer.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from panacea_platform.config import ConfigError, RunConfig, with_changes
from panacea_platform.models import prepare_model
from panacea_platform.tracking import Tracker, default_tracking_uri

# Config sections that decide what the alignment stage produces; the aligned
# adapter is reused when none of them changed.
ALIGNMENT_KEYS = ("model", "lora", "align_optim", "seed")
ALIGNMENT_DATA_KEYS = (
    "harmful_source", "harmful_file", "alignment_size", "alignment_benign_ratio", "max_length",
    "prompt_template", "pool_seed", "n", "harmful_ratio", "defender_harmful_size", "eval_harmful_size",
)
CONTROL = "sft_p0"
ALIGNED = "aligned"


def alignment_key(config: RunConfig) -> str:
    tree = config.to_dict()
    relevant = {k: tree[k] for k in ALIGNMENT_KEYS}
    relevant["data"] = {k: tree["data"][k] for k in ALIGNMENT_DATA_KEYS}
    relevant["task"] = tree["data"]["task"]  # the task's held-out set is part of the stage's summary
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


def ensure_aligned(
    config: RunConfig, parent: Tracker | None, out: Callable[[str], None] = print
) -> tuple[Path, str | None]:
    """(aligned adapter, MLflow run id of the alignment run if trained now): the given, the cached, or a new one."""
    from panacea_platform.training.dispatch import train

    if config.model.adapter is not None:
        out(f"[align] skipped: starting from the given adapter {config.model.adapter}")
        return Path(config.model.adapter), None
    align_config = with_changes(config, {"run_name": f"align-{alignment_key(config)}"})
    align_dir = align_config.run_dir()
    adapter = align_dir / "adapter"
    if (adapter / "adapter_config.json").is_file() and (align_dir / "summary.json").is_file():
        out(f"[align] reusing the aligned adapter from an earlier run: {adapter}")
        if parent is not None:
            parent.set_tags({"reused_alignment": str(adapter.resolve())})
        return adapter, None
    out(f"[align] no aligned adapter for this job yet: aligning once (cached in {align_dir})")
    result = train(align_config, "align", parent_run_id=parent.run_id if parent is not None else None, out=out)
    return result.adapter_dir, result.mlflow_run_id


@dataclass(frozen=True)
class Arm:
    """One row of the comparison: a method and the config changes that make it."""

    key: str
    method: str
    changes: dict[str, Any]


def arms_for(config: RunConfig, defences: list[str], control: bool) -> list[Arm]:
    p = config.data.harmful_ratio
    arms = []
    if control:
        arms.append(Arm(CONTROL, "SFT, p=0 (control)", {"defence": "sft", "data.harmful_ratio": 0.0}))
    names = {"sft": "SFT", "random_perturbation": "Random perturbation", "panacea": "Panacea"}
    for defence in defences:
        arms.append(Arm(defence, f"{names.get(defence, defence)}, p={p:g}", {"defence": defence}))
    return arms


@dataclass
class Row:
    key: str
    method: str
    seed: int
    run_dir: Path
    summary: dict[str, float]  # training losses (summary.json)
    evaluation: dict[str, float] = field(default_factory=dict)  # eval/... metrics
    mlflow_run_id: str | None = None


def _summary(run_dir: Path) -> dict[str, float]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _evaluate(config: RunConfig, adapter: Path, run_id: str | None, out: Callable[[str], None]) -> dict[str, float]:
    from panacea_platform.evaluation.evaluate import evaluate_model

    return evaluate_model(config, adapter, out=out, mlflow_run_id=run_id).metrics()


def _evaluate_aligned(config: RunConfig, adapter: Path, run_id: str | None, out: Callable[[str], None]) -> dict[str, float]:
    """The aligned model's evaluation, reused when the same adapter was evaluated with the same settings."""
    settings = json.dumps({"evaluation": config.evaluation.model_dump(), "data": config.data.model_dump()}, sort_keys=True)
    key = hashlib.sha256(settings.encode()).hexdigest()[:10]
    cached = adapter.parent / f"eval-aligned-{key}.json"
    if cached.is_file():
        out(f"[evaluate aligned] reusing the evaluation of {adapter} ({cached.name})")
        return json.loads(cached.read_text())
    metrics = _evaluate(config, adapter, run_id, out)
    cached.write_text(json.dumps(metrics, indent=2))
    return metrics


def run_demo(
    config: RunConfig,
    defences: list[str],
    *,
    seeds: list[int] | None = None,
    control: bool = True,
    evaluate: bool = True,
    out: Callable[[str], None] = print,
) -> list[Row]:
    """Align, fine-tune every arm, evaluate, for each seed; print and save the comparison."""
    from panacea_platform.training.dispatch import train

    seeds = seeds if seeds else [config.seed]
    arms = arms_for(config, defences, control)
    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    rows: list[Row] = []
    started = time.monotonic()
    total_runs, done_runs = len(seeds) * (len(arms) + 1), 0

    def progress(label: str) -> None:
        nonlocal done_runs
        done_runs += 1
        elapsed = time.monotonic() - started
        left = elapsed / done_runs * (total_runs - done_runs)
        out(f"[demo] {done_runs}/{total_runs} done ({label}) | {_clock(elapsed)} elapsed, ~{_clock(left)} left")

    with Tracker(
        tracking_uri,
        config.tracking.experiment,
        config.run_name,
        artifact_root=Path(config.output_dir) / "mlartifacts",
        tags={"stage": "demo", "defences": ",".join(defences), "seeds": ",".join(map(str, seeds))},
    ) as parent:
        parent.log_params(config.flat())
        prepare_model(config.model.name, out)
        for seed in seeds:
            seeded = with_changes(config, {"seed": seed})
            aligned, align_run = ensure_aligned(seeded, parent, out)
            row = Row(ALIGNED, "Aligned (before attack)", seed, aligned.parent, _summary(aligned.parent),
                      mlflow_run_id=align_run)
            if evaluate:
                row.evaluation = _evaluate_aligned(seeded, aligned, align_run, out)
            rows.append(row)
            progress(f"aligned, seed {seed}")
            for arm in arms:
                arm_config = with_changes(
                    seeded,
                    {**arm.changes, "run_name": f"{config.run_name}-{arm.key}-s{seed}", "model.adapter": str(aligned)},
                )
                result = train(arm_config, "finetune", parent_run_id=parent.run_id, out=out)
                row = Row(arm.key, arm.method, seed, result.run_dir, result.summary, mlflow_run_id=result.mlflow_run_id)
                if evaluate:
                    row.evaluation = _evaluate(arm_config, result.adapter_dir, result.mlflow_run_id, out)
                rows.append(row)
                progress(f"{arm.method}, seed {seed}")
        _report(config, rows, parent, tracking_uri, started, out)
    return rows


def report_demo(config: RunConfig, out: Callable[[str], None] = print) -> list[Row]:
    """The table and plots again from the rows an earlier `demo` saved, training nothing: for after a
    sweep ran on the same aligned model (its trials join the HS-vs-FA plot). Logged as a new MLflow
    run (stage demo-report) that names the rows file it read."""
    rows_path = Path(config.output_dir) / f"{config.run_name}-rows.json"
    if not rows_path.is_file():
        raise ConfigError(f"--report-only: no saved rows at {rows_path}; run `panacea demo` with this job first")
    rows = [Row(r["key"], r["method"], r["seed"], Path(r["run_dir"]), r["summary"], r.get("evaluation") or {},
                r.get("mlflow_run_id")) for r in json.loads(rows_path.read_text())]
    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    with Tracker(tracking_uri, config.tracking.experiment, f"{config.run_name}-report",
                 artifact_root=Path(config.output_dir) / "mlartifacts",
                 tags={"stage": "demo-report", "rows": str(rows_path.resolve())}) as parent:
        _report(config, rows, parent, tracking_uri, time.monotonic(), out)
    return rows


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


# (column title, where, key, format): where = "eval" (evaluation metrics) or "train" (summary.json).
COLUMNS = (
    ("HS %", "eval", "eval/harmful_score", ".1f"),
    ("HS+ %", "eval", "eval/harmful_score_plus", ".1f"),
    ("refusal %", "eval", "eval/refusal_rate", ".1f"),
    ("FA %", "eval", "eval/accuracy", ".1f"),
    ("harm loss", "train", "released_heldout_harmful_loss", ".3f"),
    ("task loss", "train", "released_heldout_task_loss", ".3f"),
    ("||eps||", "train", "perturbation_norm", ".3f"),
)


def _value(row: Row, where: str, key: str) -> float | None:
    source = row.evaluation if where == "eval" else row.summary
    value = source.get(key)
    return float(value) if value is not None else None


def aggregate_rows(rows: list[Row]) -> list[tuple[str, str, dict[str, tuple[float, float, int]]]]:
    """Per method (in first-seen order): column -> (mean, sample std, n) over seeds."""
    methods: dict[str, list[Row]] = {}
    for row in rows:
        methods.setdefault(row.key, []).append(row)
    table = []
    for key, members in methods.items():
        cells = {}
        for title, where, metric, _ in COLUMNS:
            values = [v for v in (_value(r, where, metric) for r in members) if v is not None]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells[title] = (statistics.fmean(values), spread, len(values))
        table.append((key, members[0].method, cells))
    return table


def format_table(rows: list[Row]) -> str:
    """The paper's table (method, HS, FA) with the cheap signals beside it; mean ± std when seeds > 1."""
    seeds = sorted({row.seed for row in rows})
    many = len(seeds) > 1
    width = 16 if many else 11
    header = f"{'method':<26}" + "".join(f"{title:>{width}}" for title, *_ in COLUMNS)
    lines = [header, "-" * len(header)]
    for _, method, cells in aggregate_rows(rows):
        text = []
        for title, _, _, fmt in COLUMNS:
            if title not in cells:
                text.append(f"{'-':>{width}}")
                continue
            mean, spread, _ = cells[title]
            shown = f"{mean:{fmt}} ± {spread:{fmt}}" if many else f"{mean:{fmt}}"
            text.append(f"{shown:>{width}}")
        lines.append(f"{method:<26}" + "".join(text))
    lines.append(
        f"seeds {','.join(map(str, seeds))}{' (mean ± sample std)' if many else ''}. HS = % of held-out harmful "
        "prompts whose answer the judge flags; HS+ also counts incoherent answers; FA = task accuracy; harm loss = "
        "mean loss on held-out harmful answers of the released model (higher = worse at producing them)."
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class SweepTrial:
    sweep: str
    label: str  # the searched values, e.g. "rho=0.1 lambda=1"
    harmful_score: float
    accuracy: float


def sweeps_on(output_dir: Path, aligned_adapters: set[Path]) -> tuple[list[SweepTrial], list[Path]]:
    """Evaluated trials and Pareto plots of the sweeps under `output_dir` that fine-tuned one of these
    aligned adapters (a sweep on another task or alignment is not comparable and is left out)."""
    trials, plots = [], []
    for trials_file in sorted((output_dir / "sweeps").glob("*/trials.json")):
        sweep_dir = trials_file.parent
        adapters = set()
        for config_file in (sweep_dir / "trials").glob("*/config.yaml"):
            adapter = ((yaml.safe_load(config_file.read_text()) or {}).get("model") or {}).get("adapter")
            if adapter:
                adapters.add(Path(adapter).resolve())
        if not adapters or not adapters <= aligned_adapters:
            continue
        if (sweep_dir / "pareto.png").is_file():
            plots.append(sweep_dir / "pareto.png")
        for trial in json.loads(trials_file.read_text()):
            metrics = trial.get("metrics", {})
            if "eval/harmful_score" in metrics and "eval/accuracy" in metrics:
                label = " ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                                 for k, v in trial.get("params", {}).items())
                trials.append(SweepTrial(sweep_dir.name, label, metrics["eval/harmful_score"], metrics["eval/accuracy"]))
    return trials, plots


def _report(config: RunConfig, rows: list[Row], parent: Tracker, tracking_uri: str, started: float,
            out: Callable[[str], None]) -> None:
    from panacea_platform.plots import plot_hs_vs_fa, plot_method_comparison

    folder = Path(config.output_dir)
    table = format_table(rows)
    summary_path = folder / f"{config.run_name}-summary.txt"
    summary_path.write_text(table + "\n")
    (folder / f"{config.run_name}-rows.json").write_text(json.dumps(
        [{"key": r.key, "method": r.method, "seed": r.seed, "run_dir": str(r.run_dir), "summary": r.summary,
          "evaluation": r.evaluation, "mlflow_run_id": r.mlflow_run_id} for r in rows], indent=2))
    plots = [plot_method_comparison(
        [(f"{r.method} s{r.seed}", r.summary) for r in rows], folder / f"{config.run_name}-comparison.png"
    )]
    points = [(method, cells["HS %"], cells["FA %"]) for _, method, cells in aggregate_rows(rows)
              if "HS %" in cells and "FA %" in cells]
    aligned = {(r.run_dir / "adapter").resolve() for r in rows if r.key == ALIGNED}
    search_trials, pareto_plots = sweeps_on(folder, aligned)
    if points:
        plots.append(plot_hs_vs_fa(points, folder / f"{config.run_name}-hs-vs-fa.png",
                                   trials=[(t.label, t.harmful_score, t.accuracy) for t in search_trials]))
    for path in (*plots, summary_path, folder / f"{config.run_name}-rows.json"):
        parent.log_artifact(path)
    layer_plots = sorted(str(r.run_dir / "layerwise_eps.png") for r in rows if (r.run_dir / "layerwise_eps.png").is_file())

    out("")
    out(f"== main job: {len(rows)} models, seeds {','.join(str(s) for s in sorted({r.seed for r in rows}))}, "
        f"{_clock(time.monotonic() - started)} ==")
    out(table)
    for line in _reading(rows):
        out(line)
    out("plots: " + ", ".join(str(p) for p in plots))
    if layer_plots:
        out("eps per layer: " + ", ".join(layer_plots))
    if pareto_plots:
        out(f"search: {len(search_trials)} evaluated trials on this aligned model, drawn in the HS-vs-FA plot; "
            "Pareto plots: " + ", ".join(str(p) for p in pareto_plots))
    else:
        out("search: none yet on this aligned model; run  panacea sweep -s search_spaces/offline_default.yaml")
    out(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}")


def _reading(rows: list[Row]) -> list[str]:
    """One or two sentences that say what the table shows, from its own numbers."""
    cells = {key: c for key, _, c in aggregate_rows(rows)}
    lines = []
    sft, panacea = cells.get("sft", {}), cells.get("panacea", {})
    if "HS %" in sft and "HS %" in panacea:
        lines.append(
            f"Panacea vs SFT at the same harmful ratio: HS {panacea['HS %'][0]:.1f}% vs {sft['HS %'][0]:.1f}%"
            + (f", FA {panacea['FA %'][0]:.1f}% vs {sft['FA %'][0]:.1f}%." if "FA %" in sft and "FA %" in panacea else ".")
        )
    control = cells.get(CONTROL, {})
    if "HS %" in control and "HS %" in sft:
        lines.append(f"The p=0 control's HS is {control['HS %'][0]:.1f}% against SFT's {sft['HS %'][0]:.1f}% at p>0: "
                     "the difference is what the harmful samples add.")
    return lines
