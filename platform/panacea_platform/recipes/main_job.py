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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from panacea_platform.config import ConfigError, RunConfig, with_changes
from panacea_platform.config_checks import check_config
from panacea_platform.models import prepare_model
from panacea_platform.tracking import Tracker, default_tracking_uri, runs_page
from panacea_platform.training.alignment import aligning_defence, ensure_aligned

CONTROL = "sft_p0"
ALIGNED = "aligned"
# `panacea demo --suite NAME`: the defences each compares (besides the p = 0 control).
DEMO_SUITES = {
    "default": ["sft", "random_perturbation", "panacea", "panacea_end_masked"],
    # The Panacea paper's comparison: SFT, alignment-stage (Vaccine, RepNoise, Booster), fine-tuning-stage
    # (Lisa) and post-fine-tuning (random perturbation, Antidote) defences, Panacea and its end-masked variant.
    "paper-comparison": [
        "sft",
        "random_perturbation",
        "vaccine",
        "repnoise",
        "booster",
        "lisa",
        "antidote",
        "panacea",
        "panacea_end_masked",
    ],
}


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
    names = {
        "sft": "SFT",
        "random_perturbation": "Random perturbation",
        "panacea": "Panacea",
        "vaccine": "Vaccine",
        "repnoise": "RepNoise",
        "booster": "Booster",
        "lisa": "Lisa",
        "antidote": "Antidote",
        "panacea_end_masked": "Panacea end-masked",
    }
    for defence in defences:
        arms.append(Arm(defence, f"{names.get(defence, defence)}, p={p:g}", {"defence": defence}))
    return arms


def arm_config_for(
    seeded: RunConfig, arm: Arm, aligned: Path, trained: dict[str, Any], out: Callable[[str], None] = print
) -> RunConfig:
    """The arm's run config: the aligned adapter fine-tuned with the arm's changes.

    Each arm fine-tunes under its convention (algorithms/convention.py): its defence's authors' unless the
    job sets model.after_alignment. A defence that trains as SFT does (random perturbation) under SFT's
    convention is not trained again when this seed's SFT arm already ran: its w_T is SFT's, step for
    step (same seed, data and steps), so it takes that run's adapter with 0 steps, in this process, and
    adds its perturbation (tested equal to training it in full).
    """
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.algorithms.convention import with_convention

    changes = {**arm.changes, "run_name": f"{seeded.run_name}-{arm.key}-s{seeded.seed}", "model.adapter": str(aligned)}
    arm_config = with_convention(with_changes(seeded, changes))
    sft_config = with_convention(with_changes(seeded, {"defence": "sft", "model.adapter": str(aligned)}))
    # Under the merge convention an adapter is a fresh LoRA over the merged aligned model: SFT's w_T is not its.
    continues = arm_config.model.after_alignment == sft_config.model.after_alignment == "continue"
    alike = continues and (arm_config.lora, arm_config.optim) == (sft_config.lora, sft_config.optim)
    if arm_config.defence != "sft" and DEFENCES.get(arm_config.defence).trains_as_sft() and "sft" in trained and alike:
        sft = trained["sft"]
        out(
            f"[demo] {arm.method}: SFT's w_T ({sft.adapter_dir}) plus its perturbation; the training is SFT's, "
            "step for step, and is not repeated"
        )
        return with_changes(
            arm_config,
            {
                "model.adapter": str(sft.adapter_dir),
                "optim.max_steps": 0,
                "scaling.zero_stage": None,
                "scaling.num_workers": 1,
            },
        )
    return arm_config


@dataclass
class Row:
    key: str
    method: str
    seed: int
    run_dir: Path
    summary: dict[str, float]  # training losses (summary.json)
    evaluation: dict[str, float] = field(default_factory=dict)  # eval/... metrics
    mlflow_run_id: str | None = None
    samples: str | None = None  # the evaluation's samples.jsonl (per-prompt outcomes)
    first_token: dict[str, Any] | None = None  # the first-token probe (evaluation/first_token.py)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "method": self.method,
            "seed": self.seed,
            "run_dir": str(self.run_dir),
            "summary": self.summary,
            "evaluation": self.evaluation,
            "mlflow_run_id": self.mlflow_run_id,
            "samples": self.samples,
            "first_token": self.first_token,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        return cls(
            data["key"],
            data["method"],
            data["seed"],
            Path(data["run_dir"]),
            data["summary"],
            data.get("evaluation") or {},
            data.get("mlflow_run_id"),
            data.get("samples"),
            data.get("first_token"),
        )


def _summary(run_dir: Path) -> dict[str, float]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _evaluate(config: RunConfig, adapter: Path, run_id: str | None, out: Callable[[str], None]) -> tuple[dict, str]:
    """(eval/... metrics, samples.jsonl path) of the model at `adapter`, logged into MLflow run `run_id`."""
    from panacea_platform.evaluation.evaluate import evaluate_model

    result = evaluate_model(config, adapter, out=out, mlflow_run_id=run_id)
    return result.metrics(), str(result.samples_path)


def aligned_evaluation_key(config: RunConfig) -> str:
    """What an aligned model's evaluation depends on: the evaluation settings, the data settings but the
    attack's n and p (no evaluation prompt depends on them), and the prompts themselves, so an edited
    prompt set or another installed benchmark is evaluated anew."""
    from panacea_platform.evaluation.suites import suite_examples

    prompts = {s.name: [e.prompt for e in suite_examples(config, s)] for s in config.evaluation.suites}
    data = config.data.model_dump(exclude={"n", "harmful_ratio"})
    settings = json.dumps(
        {"evaluation": config.evaluation.model_dump(), "data": data, "prompts": prompts}, sort_keys=True
    )
    return hashlib.sha256(settings.encode()).hexdigest()[:10]


def _evaluate_aligned(
    config: RunConfig, adapter: Path, run_id: str | None, out: Callable[[str], None]
) -> tuple[dict, str]:
    """The aligned model's evaluation, reused when the same adapter was evaluated with the same settings
    on the same prompts."""
    cached = adapter.parent / f"eval-aligned-{aligned_evaluation_key(config)}.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if "samples" in saved and Path(saved["samples"]).is_file():
            out(f"[evaluate aligned] reusing the evaluation of {adapter} ({cached.name})")
            return saved["metrics"], saved["samples"]
    metrics, samples = _evaluate(config, adapter, run_id, out)
    # Its own copy of the answers: a later evaluation of this adapter with other settings rewrites eval-adapter/.
    kept = cached.with_suffix(".samples.jsonl")
    kept.write_text(Path(samples).read_text())
    cached.write_text(json.dumps({"metrics": metrics, "samples": str(kept)}, indent=2))
    return metrics, str(kept)


def run_demo(
    config: RunConfig,
    defences: list[str],
    *,
    seeds: list[int] | None = None,
    control: bool = True,
    evaluate: bool = True,
    out: Callable[[str], None] = print,
    command: str = "run_demo(...) from Python",
) -> list[Row]:
    """Align, fine-tune every arm, evaluate, for each seed; print and save the comparison. `command` is
    what the parent run's description says ran it."""
    from panacea_platform.evaluation.suites import check_suites

    if evaluate:
        config = check_suites(config, out)  # a bad or unreachable suite fails now, before any training
    seeds = seeds if seeds else [config.seed]
    arms = arms_for(config, defences, control)
    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    fingerprint = _job_fingerprint(config, defences, control, evaluate)
    rows = _earlier_rows(config, seeds, fingerprint, out)
    started = time.monotonic()
    for arm in arms:  # each arm's config is valid (e.g. an aligning defence with a given adapter) before any work
        check_config(with_changes(config, arm.changes))
    prepare_model(config.model.name, out)
    for arm in arms:
        _check_arm(with_changes(config, arm.changes))
    _check_end_tokens(config, defences, evaluate)
    progress = _progress(len(seeds) * (len(arms) + 1), started, out)
    with Tracker(
        tracking_uri,
        config.tracking.experiment,
        config.run_name,
        artifact_root=Path(config.output_dir) / "mlartifacts",
        tags={"stage": "demo", "defences": ",".join(defences), "seeds": ",".join(map(str, seeds))},
    ) as parent:
        parent.log_params(config.flat())
        for seed in seeds:
            rows += _run_seed(with_changes(config, {"seed": seed}), arms, parent, evaluate, progress, out)
            rows.sort(key=lambda row: row.seed)  # stable: each seed's rows keep their order
            # Each finished seed is saved at once: if a later seed fails, --report-only still reads this one.
            _rows_path(config).write_text(json.dumps([r.to_json() for r in rows], indent=2))
            _rows_path(config).with_suffix(".fingerprint").write_text(fingerprint)
        text = _report(config, rows, parent, tracking_uri, started, out)
        parent.describe(_parent_note(rows, text, command), whole_at=f"{config.run_name}-summary.txt")
    return rows


def _progress(total: int, started: float, out: Callable[[str], None]) -> Callable[[str], None]:
    """A callback that counts finished models and prints the time elapsed and left."""
    done = 0

    def finished(label: str) -> None:
        nonlocal done
        done += 1
        elapsed = time.monotonic() - started
        left = elapsed / done * (total - done)
        out(f"[demo] {done}/{total} done ({label}) | {_clock(elapsed)} elapsed, ~{_clock(left)} left")

    return finished


def _run_seed(
    seeded: RunConfig,
    arms: list[Arm],
    parent: Tracker,
    evaluate: bool,
    progress: Callable[[str], None],
    out: Callable[[str], None],
) -> list[Row]:
    """One seed of the main job: the aligned model, then every arm fine-tuned from it, each evaluated."""
    from panacea_platform.training.dispatch import train

    tracking_uri = seeded.tracking.tracking_uri or default_tracking_uri(seeded.output_dir)
    aligned, align_run = ensure_aligned(seeded, parent, out)
    row = Row(
        ALIGNED,
        "Aligned (before attack)",
        seeded.seed,
        aligned.parent,
        _summary(aligned.parent),
        mlflow_run_id=align_run,
    )
    if evaluate:
        row.evaluation, row.samples = _evaluate_aligned(seeded, aligned, align_run, out)
        _probe(seeded, row, aligned, tracking_uri, out)
    rows = [_headlined(seeded, row, tracking_uri)]
    progress(f"aligned, seed {seeded.seed}")
    trained: dict[str, Any] = {}
    for arm in arms:
        arm_config = arm_config_for(seeded, arm, _aligned_for(seeded, arm, aligned, parent, out), trained, out)
        result = train(arm_config, "finetune", parent_run_id=parent.run_id, out=out)
        trained[arm.key] = result
        row = Row(arm.key, arm.method, seeded.seed, result.run_dir, result.summary, mlflow_run_id=result.mlflow_run_id)
        if evaluate:
            row.evaluation, row.samples = _evaluate(arm_config, result.adapter_dir, result.mlflow_run_id, out)
            _probe(arm_config, row, result.adapter_dir, tracking_uri, out)
        rows.append(_headlined(seeded, row, tracking_uri))
        progress(f"{arm.method}, seed {seeded.seed}")
    return rows


def _headlined(config: RunConfig, row: Row, tracking_uri: str) -> Row:
    """The row, its headline metrics (HS, FA, ...) logged into its run under names that sort together."""
    from panacea_platform.run_notes import headline_metrics

    columns = {**paper_columns(config), "answered": _answered_column(config)}
    headlines = headline_metrics(columns, row.evaluation or {})
    if headlines and row.mlflow_run_id is not None:
        Tracker.attach(tracking_uri, row.mlflow_run_id).log_metrics(headlines)
    return row


def _answered_column(config: RunConfig) -> tuple[str, str] | None:
    """The helpfulness suite's answered rate: whether a method still answers ordinary requests."""
    suite = next((s.name for s in config.evaluation.suites if s.metric == "helpfulness"), None)
    return (suite, "answered_rate") if suite else None


def _check_arm(config: RunConfig) -> None:
    """What an arm needs beyond a valid config, checked before any run starts: a fresh LoRA of its convention
    that fits the model, and enough harmful pairs for Antidote's calibration."""
    from panacea_platform.algorithms.convention import check_fits
    from panacea_platform.data.pools import pools_for
    from panacea_platform.training.stage_data import calibration_examples

    check_fits(config)
    calibration_examples(config, pools_for(config.data))


def _probe(config: RunConfig, row: Row, adapter: Path, tracking_uri: str, out: Callable[[str], None]) -> None:
    """The first-token probe of a released model (w_T and w_T + eps_T), into the row and its MLflow run."""
    from panacea_platform.evaluation.first_token import probe_run
    from panacea_platform.models import PERTURBATION_FILE

    if not config.evaluation.first_token_probe:
        return
    started = time.monotonic()
    unperturbed, eps = row.run_dir / "adapter_unperturbed", row.run_dir / PERTURBATION_FILE
    split = (unperturbed / "adapter_config.json").is_file() and eps.is_file()
    probe = probe_run(config, row.key, row.method, unperturbed if split else adapter, eps if split else None)
    row.first_token = probe.to_json()
    if row.mlflow_run_id is not None:
        Tracker.attach(tracking_uri, row.mlflow_run_id).log_metrics(probe.metrics())
    shown = ", ".join(f"{suite} {100 * value:.2f}%" for suite, value in probe.unperturbed.items())
    released = ", ".join(f"{suite} {100 * value:.2f}%" for suite, value in probe.perturbed.items())
    out(
        f"[probe] {row.method}, seed {row.seed}: P(first token ends the answer) at w_T: {shown}"
        + (f"; at w_T + eps_T: {released}" if released else "")
        + f" ({time.monotonic() - started:.0f} s)"
    )


def _check_end_tokens(config: RunConfig, defences: list[str], evaluate: bool) -> None:
    """The probe and the end-masked variant read the model's end tokens: a model without one fails here, before
    any run starts, naming the setting that needs them."""
    from panacea_platform.models import end_token_ids, load_tokenizer

    needs = (
        [("evaluation.first_token_probe", "set evaluation.first_token_probe=false")]
        if evaluate and config.evaluation.first_token_probe
        else []
    )
    needs += [("defences", "leave panacea_end_masked out of --defences")] if "panacea_end_masked" in defences else []
    if not needs:
        return
    tokenizer = load_tokenizer(config.model)
    for setting, fix in needs:
        try:
            end_token_ids(tokenizer, f"{setting} (model.name = {config.model.name!r})")
        except ValueError as exc:
            raise ConfigError(f"{exc}, or {fix}") from None


def _rows_path(config: RunConfig) -> Path:
    return Path(config.output_dir) / f"{config.run_name}-rows.json"


def _job_fingerprint(config: RunConfig, defences: list[str], control: bool, evaluate: bool) -> str:
    """What a seed's rows depend on besides the seed: the job's config and the demo's choices."""
    tree = {key: value for key, value in config.to_dict().items() if key != "seed"}
    choices = {"config": tree, "defences": defences, "control": control, "evaluate": evaluate}
    return hashlib.sha256(json.dumps(choices, sort_keys=True).encode()).hexdigest()[:12]


def _earlier_rows(config: RunConfig, seeds: list[int], fingerprint: str, out: Callable[[str], None]) -> list[Row]:
    """The saved rows of other seeds of this same job (config and choices alike): a seed run later joins
    them in the table. Rows of another job, or saved before jobs were fingerprinted, are replaced."""
    path = _rows_path(config)
    stamp = path.with_suffix(".fingerprint")
    if not path.is_file():
        return []
    if not stamp.is_file() or stamp.read_text().strip() != fingerprint:
        out(f"[demo] {path.name} holds rows of another job or choice of arms: this run's replace them")
        return []
    kept = [Row.from_json(r) for r in json.loads(path.read_text()) if r["seed"] not in seeds]
    if kept:
        earlier = ",".join(str(seed) for seed in sorted({row.seed for row in kept}))
        out(f"[demo] keeping seeds {earlier} of {path.name} (same job): the table is over them and this run's")
    return kept


def _aligned_for(seeded: RunConfig, arm: Arm, shared: Path, parent: Tracker, out: Callable[[str], None]) -> Path:
    """The arm's starting point: the shared aligned adapter, or its own where its defence aligns."""
    arm_seeded = with_changes(seeded, {k: v for k, v in arm.changes.items() if k == "defence"})
    if aligning_defence(arm_seeded) is None:
        return shared
    adapter, _ = ensure_aligned(arm_seeded, parent, out)
    return adapter


def report_demo(config: RunConfig, out: Callable[[str], None] = print) -> list[Row]:
    """The table and plots again from the rows an earlier `demo` saved, training nothing: for after a
    sweep ran on the same aligned model (its trials join the HS-vs-FA plot). Logged as a new MLflow
    run (stage demo-report) that names the rows file it read."""
    rows_path = _rows_path(config)
    if not rows_path.is_file():
        raise ConfigError(f"--report-only: no saved rows at {rows_path}; run `panacea demo` with this job first")
    rows = [Row.from_json(r) for r in json.loads(rows_path.read_text())]
    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    with Tracker(
        tracking_uri,
        config.tracking.experiment,
        f"{config.run_name}-report",
        artifact_root=Path(config.output_dir) / "mlartifacts",
        tags={"stage": "demo-report", "rows": str(rows_path.resolve())},
    ) as parent:
        _report(config, rows, parent, tracking_uri, time.monotonic(), out)
    return rows


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


# The training-side signals beside the evaluation: (column title, summary.json key, format).
LOSS_COLUMNS = (
    ("harm loss", "released_heldout_harmful_loss", ".3f"),
    ("task loss", "released_heldout_task_loss", ".3f"),
    ("||eps||", "perturbation_norm", ".3f"),
)


def format_losses(rows: list[Row]) -> str:
    """The released models' held-out losses (and ||eps||) per method: mean ± sample std over seeds."""
    methods: dict[str, list[Row]] = {}
    for row in rows:
        methods.setdefault(row.key, []).append(row)
    header = f"{'method':<28}" + "".join(f"{title:>18}" for title, _, _ in LOSS_COLUMNS)
    lines = [header, "-" * len(header)]
    for members in methods.values():
        cells = []
        for _, key, fmt in LOSS_COLUMNS:
            values = [float(r.summary[key]) for r in members if r.summary.get(key) is not None]
            if not values:
                cells.append(f"{'-':>18}")
                continue
            spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):{fmt}}{spread}".rjust(18))
        lines.append(f"{members[0].method:<28}" + "".join(cells))
    seeds = sorted({r.seed for r in rows})
    spread = " (mean ± sample std)" if len(seeds) > 1 else ""
    lines.append(
        f"seeds {','.join(map(str, seeds))}{spread}. harm loss = mean loss on held-out harmful answers of the "
        "released model (higher = worse at producing them); task loss = its loss on held-out task answers."
    )
    return "\n".join(lines)


def comparison_blocks(config: RunConfig, rows: list[Row]):
    """(comparison, printed blocks) of the evaluated rows: the per-suite tables, the paired differences
    against SFT and the judge's notes; (None, []) when nothing was evaluated."""
    from panacea_platform.recipes.comparison import (
        ModelAnswers,
        compare,
        format_differences,
        format_judge_notes,
        format_paper_table,
        format_suite_tables,
    )

    evaluated = [r for r in rows if r.samples and Path(r.samples).is_file()]
    if not evaluated:
        return None, []
    answers = [ModelAnswers.read(r.key, r.method, r.seed, str(r.samples)) for r in evaluated]  # set: filtered above
    suites = {s.name: s.metric for s in config.evaluation.suites}
    comparison = compare(answers, suites, reference="sft")
    blocks = [
        format_paper_table(comparison, paper_columns(config)),
        format_suite_tables(comparison),
        format_differences(comparison),
        *_against_panacea(answers, suites),
        format_judge_notes(answers, suites),
    ]
    return comparison, [block for block in blocks if block]


def _against_panacea(answers, suites: dict[str, str]) -> list[str]:
    """Where a variant of Panacea ran beside it, every arm's paired differences against Panacea too: does the
    variant keep Panacea's HS while it answers more?"""
    from panacea_platform.recipes.comparison import compare, format_differences

    keys = {a.key for a in answers}
    if "panacea" not in keys or not any(k.startswith("panacea_") for k in keys):
        return []
    mine = [a for a in answers if a.key != ALIGNED]
    return [format_differences(compare(mine, suites, reference="panacea"))]


def paper_columns(config: RunConfig) -> dict[str, tuple[str, str] | None]:
    """The paper's columns from the job's suites: HS (first harm suite), FA (the task), capability and
    over-refusal, where the job evaluates them."""
    suites = config.evaluation.suites
    harm, task = plot_axes(config)
    capability = next((s.name for s in suites if s.name == "capability"), None)
    over_refusal = next((s.name for s in suites if s.metric == "over_refusal"), None)
    return {
        "HS": (harm, "harmful_score") if harm else None,
        "FA": (task, "accuracy") if task else None,
        "capability": (capability, "accuracy") if capability else None,
        "over-refusal": (over_refusal, "refusal_rate") if over_refusal else None,
    }


def plot_axes(config: RunConfig) -> tuple[str | None, str | None]:
    """The suites of the HS-vs-FA plot, for the methods and the sweep trials alike: the first harm
    suite and the task suite."""
    suites = config.evaluation.suites
    harm = next((s.name for s in suites if s.metric == "harmful_score"), None)
    task = next((s.name for s in suites if s.source == "task"), None)
    return harm, task


@dataclass(frozen=True)
class SweepTrial:
    sweep: str
    label: str  # the searched values, e.g. "rho=0.1 lambda=1"
    harmful_score: float
    accuracy: float


def sweeps_on(
    output_dir: Path, aligned_adapters: set[Path], harm: str = "harmful", task: str = "task"
) -> tuple[list[SweepTrial], list[Path]]:
    """Evaluated trials and Pareto plots of the sweeps under `output_dir` that fine-tuned one of these
    aligned adapters (a sweep on another task or alignment is not comparable and is left out); a
    trial's point is its HS on the `harm` suite and its accuracy on the `task` suite."""
    hs_key, fa_key = f"eval/{harm}/harmful_score", f"eval/{task}/accuracy"
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
            if hs_key in metrics and fa_key in metrics:
                label = " ".join(
                    f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in trial.get("params", {}).items()
                )
                trials.append(SweepTrial(sweep_dir.name, label, metrics[hs_key], metrics[fa_key]))
    return trials, plots


def _report(
    config: RunConfig, rows: list[Row], parent: Tracker, tracking_uri: str, started: float, out: Callable[[str], None]
) -> str:
    from panacea_platform.plots import plot_method_comparison

    folder = Path(config.output_dir)
    summary_path, rows_path = folder / f"{config.run_name}-summary.txt", _rows_path(config)
    # The rows first: whatever the report meets, --report-only can read the models back.
    rows_path.write_text(json.dumps([r.to_json() for r in rows], indent=2))
    comparison, blocks = comparison_blocks(config, rows)
    text = "\n\n".join(
        [*blocks, format_losses(rows), *_probe_block(rows), *_convention_block(config, rows), *_reading(comparison)]
    )
    summary_path.write_text(text + "\n")
    plots = [
        plot_method_comparison(
            [(f"{r.method} s{r.seed}", r.summary) for r in rows], folder / f"{config.run_name}-comparison.png"
        )
    ]
    aligned = {(r.run_dir / "adapter").resolve() for r in rows if r.key == ALIGNED}
    harm, task = plot_axes(config)
    search_trials, pareto_plots = sweeps_on(folder, aligned, harm or "harmful", task or "task")
    if comparison is not None:
        plots += _comparison_plots(config, comparison, (harm, task), search_trials, folder)
    for path in (*plots, summary_path, rows_path):
        parent.log_artifact(path)
    layer_plots = sorted(
        str(r.run_dir / "layerwise_eps.png") for r in rows if (r.run_dir / "layerwise_eps.png").is_file()
    )

    out("")
    out(
        f"== main job: {len(rows)} models, seeds {','.join(str(s) for s in sorted({r.seed for r in rows}))}, "
        f"{_clock(time.monotonic() - started)} =="
    )
    out(text)
    out("plots: " + ", ".join(str(p) for p in plots))
    if layer_plots:
        out("eps per layer: " + ", ".join(layer_plots))
    if pareto_plots:
        out(
            f"search: {len(search_trials)} evaluated trials on this aligned model, drawn in the HS-vs-FA plot; "
            "Pareto plots: " + ", ".join(str(p) for p in pareto_plots)
        )
    else:
        out("search: none yet on this aligned model; run  panacea sweep -s search_spaces/offline_default.yaml")
    out(f"MLflow: {runs_page(tracking_uri, parent.experiment_id)}")
    return text


def _parent_note(rows: list[Row], text: str, command: str) -> str:
    """The main job's run description: the command that ran it, then its report as printed."""
    seeds = ",".join(str(s) for s in sorted({r.seed for r in rows}))
    return (
        f"**Main job**: {len({r.key for r in rows})} methods, seeds {seeds}. Command: `{command}`\n\n```\n{text}\n```"
    )


def _convention_block(config: RunConfig, rows: list[Row]) -> list[str]:
    """How each method fine-tuned after alignment (algorithms/convention.py), read from its run's config.yaml."""
    from panacea_platform.algorithms.convention import describe
    from panacea_platform.config import load_config

    lines, seen = [], set()
    for row in rows:
        saved = row.run_dir / "config.yaml"
        if row.key == ALIGNED or row.key in seen or not saved.is_file():
            continue
        seen.add(row.key)
        lines.append(f"  {row.method}: {describe(load_config(saved))}")
    who = (
        "each defence's authors'"
        if config.model.after_alignment == "authors"
        else f"{config.model.after_alignment} for every defence"
    )
    return (
        [
            f"fine-tuning after alignment (model.after_alignment: {config.model.after_alignment}, {who}):\n"
            + "\n".join(lines)
        ]
        if lines
        else []
    )


def _probe_block(rows: list[Row]) -> list[str]:
    from panacea_platform.evaluation.first_token import FirstTokenProbe, format_probes

    probes = [
        FirstTokenProbe(**{**r.first_token, "by_layer": {int(k): v for k, v in r.first_token["by_layer"].items()}})
        for r in rows
        if r.first_token
    ]
    block = format_probes(probes)
    return [block] if block else []


def _comparison_plots(
    config: RunConfig, comparison, axes: tuple[str | None, str | None], search_trials: list[SweepTrial], folder: Path
) -> list[Path]:
    """HS against FA (first harm suite against the task suite) and every suite's headline, with 95% intervals."""
    from panacea_platform.evaluation.results import HEADLINES
    from panacea_platform.plots import plot_hs_vs_fa, plot_suite_headlines

    harm, task = axes
    plots = []
    if harm and task:
        points = [
            (method, comparison.cell(key, harm, "harmful_score"), comparison.cell(key, task, "accuracy"))
            for key, method in comparison.methods.items()
        ]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        plots.append(
            plot_hs_vs_fa(
                points,
                folder / f"{config.run_name}-hs-vs-fa.png",
                trials=[(t.label, t.harmful_score, t.accuracy) for t in search_trials],
                axes=(f"{harm} suite", f"{task} suite"),
            )
        )
    headlines = {s.name: HEADLINES[s.metric] for s in config.evaluation.suites}
    plots.append(plot_suite_headlines(comparison, headlines, folder / f"{config.run_name}-suites.png"))
    return plots


def _reading(comparison) -> list[str]:
    """For every method (the p=0 control included), what the paired intervals against SFT can and cannot tell apart."""
    from panacea_platform.evaluation.results import HEADLINES
    from panacea_platform.recipes.comparison import TITLES

    if comparison is None or comparison.reference is None:
        return []
    lines = []
    for key in comparison.methods:
        if key in (comparison.reference, ALIGNED):
            continue
        lower: list[str] = []
        higher: list[str] = []
        unclear: list[str] = []
        for suite, metric in comparison.suites.items():
            found = comparison.differences.get((key, suite))
            if found is not None:
                shown = f"{suite} {TITLES[HEADLINES[metric]]} {found.difference:+.1f}"
                (lower if found.ci_high < 0 else higher if found.ci_low > 0 else unclear).append(shown)
        parts = [
            f"{word} on {', '.join(items)}"
            for word, items in (("lower", lower), ("higher", higher), ("no difference its interval can tell", unclear))
            if items
        ]
        if parts:
            lines.append(
                f"{comparison.methods[key]} against {comparison.methods[comparison.reference]}, same prompts: "
                + "; ".join(parts)
                + "."
            )
    return lines
