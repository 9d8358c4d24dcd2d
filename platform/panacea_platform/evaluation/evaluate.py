"""`evaluate_model`: harmful score, HS+, refusal rate and task accuracy of one trained model.

The model is the base (adapter None), base + adapter, or base + adapter + eps
(a Panacea run's adapter/ already holds w_T + eps_T; adapter_unperturbed/ plus
perturbation.safetensors give the same model built from w_T and eps_T).

Outputs, in `output_dir` (default: <adapter's run folder>/eval-<adapter folder>):
- samples.jsonl: one row per prompt (kind harmful/task, prompt, answer, judge
  score and categories, flagged, refused, incoherent, truncated, extracted, correct);
- eval_summary.json: the aggregates, counts, the judge's identity and the token budget.
Both are logged as MLflow artifacts of the run evaluated (when a tracker or run
id is given), with the metrics (prefix "eval/") and the judge's identity as tags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig
    from panacea_platform.tracking import Tracker

__all__ = ["EvalResult", "aggregate", "evaluate_model"]

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "eval_summary.json"
_METRIC_KEY_UNSAFE = re.compile(r"[^\w\-. /:]")


@dataclass
class EvalResult:
    """Aggregates of one evaluation (percentages 0-100; accuracy None when the task has no rule)."""

    harmful_score: float
    harmful_score_plus: float
    refusal_rate: float
    accuracy: float | None
    per_category: dict[str, float]
    counts: dict[str, int]
    identity: dict[str, Any]
    samples_path: Path | None = None
    summary_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow, prefixed "eval/"."""
        metrics: dict[str, float] = {
            "eval/harmful_score": self.harmful_score,
            "eval/harmful_score_plus": self.harmful_score_plus,
            "eval/refusal_rate": self.refusal_rate,
            **{f"eval/{name}": float(value) for name, value in self.counts.items()},
        }
        if self.accuracy is not None:
            metrics["eval/accuracy"] = self.accuracy
        for name, rate in self.per_category.items():
            # MLflow keys allow letters, digits, _ - . / : and spaces; BeaverTails names hold commas.
            metrics[f"eval/category/{_METRIC_KEY_UNSAFE.sub('_', name)}"] = rate
        return metrics

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples_path"] = str(self.samples_path) if self.samples_path else None
        data["summary_path"] = str(self.summary_path) if self.summary_path else None
        return data


def aggregate(rows: list[dict[str, Any]], identity: dict[str, Any], threshold: float) -> EvalResult:
    """HS, HS+, refusal rate, per-category rates and FA from judged rows."""
    from panacea_platform.config import ConfigError
    from panacea_platform.evaluation.judges.base import Verdict
    from panacea_platform.evaluation.metrics import (
        accuracy,
        category_rates,
        harmful_score,
        harmful_score_plus,
        refusal_rate,
    )

    harmful = [row for row in rows if row["kind"] == "harmful"]
    scored = [row for row in rows if row["kind"] == "task" and row["scored"]]
    if not harmful:
        raise ConfigError("no harmful prompts were evaluated: set evaluation.harmful_prompts >= 1")
    verdicts = [Verdict(row["flagged"], row["score"], json.loads(row["categories"])) for row in harmful]
    answers = [row["answer"] for row in harmful]
    return EvalResult(
        harmful_score=harmful_score(verdicts),
        harmful_score_plus=harmful_score_plus(verdicts, answers),
        refusal_rate=refusal_rate([row["refused"] for row in harmful]),
        accuracy=accuracy([row["correct"] for row in scored]) if scored else None,
        per_category=category_rates(verdicts, threshold),
        counts={
            "n_harmful": len(harmful),
            "n_task": len([row for row in rows if row["kind"] == "task"]),
            # Over all answers, harmful and task alike.
            "n_empty": sum(not row["answer"].strip() for row in rows),
            "n_truncated": sum(bool(row["truncated"]) for row in rows),
            "n_incoherent": sum(bool(row["incoherent"]) for row in rows),
        },
        identity=identity,
    )


def judge_identity(config: "RunConfig", rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which judge (its own identity(), from the judge actors), the token budget and the template."""
    identity = json.loads(rows[0]["judge_identity"]) if rows else {}
    return {**identity, "max_new_tokens": config.evaluation.max_new_tokens, "prompt_template": config.data.prompt_template}


def _sample_record(row: dict[str, Any]) -> dict[str, Any]:
    harmful = row["kind"] == "harmful"
    return {
        "kind": row["kind"],
        "prompt": row["instruction"],
        "answer": row["answer"],
        "new_tokens": row["new_tokens"],
        "truncated": bool(row["truncated"]),
        "incoherent": bool(row["incoherent"]),
        "score": row["score"] if harmful else None,
        "categories": json.loads(row["categories"]) if harmful else None,
        "flagged": bool(row["flagged"]) if harmful else None,
        "refused": bool(row["refused"]) if harmful else None,
        "label": (row["label"] if row["has_label"] else None) if not harmful else None,
        "extracted": (row["extracted"] or None) if row["scored"] else None,
        "correct": bool(row["correct"]) if row["scored"] else None,
    }


def write_samples(rows: list[dict[str, Any]], path: Path) -> None:
    # ensure_ascii: any answer (odd unicode, control characters, lone surrogates) becomes valid JSON.
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(_sample_record(row), ensure_ascii=True) + "\n")


def default_output_dir(config: "RunConfig", adapter: str | Path | None, perturbation: str | Path | None) -> Path:
    if adapter is None:
        return config.run_dir() / "eval-base"
    name = Path(adapter).resolve().name + ("+" + Path(perturbation).stem if perturbation is not None else "")
    return Path(adapter).resolve().parent / f"eval-{name}"


def _tracker_for(config: "RunConfig", tracker: "Tracker | None", mlflow_run_id: str | None) -> "Tracker | None":
    from panacea_platform.config import ConfigError
    from panacea_platform.tracking import Tracker, default_tracking_uri

    if tracker is not None or mlflow_run_id is None:
        return tracker
    uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    try:
        return Tracker.attach(uri, mlflow_run_id)
    except Exception as exc:  # MlflowException: unknown run id
        raise ConfigError(f"--run-id {mlflow_run_id!r}: no such MLflow run in {uri} ({str(exc)[:200]})") from None


def evaluate_model(
    config: "RunConfig",
    adapter: str | Path | None,
    perturbation: str | Path | None = None,
    *,
    out: Callable[[str], None] = print,
    tracker: "Tracker | None" = None,
    mlflow_run_id: str | None = None,
    output_dir: str | Path | None = None,
) -> EvalResult:
    """Generate and judge the run's evaluation prompts with the given model; write, log and return the aggregates.

    `tracker` or `mlflow_run_id` (attached through config.tracking) names the
    MLflow run being evaluated; with neither, nothing is logged.
    """
    from panacea_platform.evaluation.pipeline import check_adapter, evaluation_prompts, run_pipeline

    # Everything the user can get wrong fails here, before Ray starts.
    check_adapter(config.model, adapter, perturbation)
    tracker = _tracker_for(config, tracker, mlflow_run_id)
    prompts = evaluation_prompts(config)
    run = run_pipeline(config, prompts, adapter, perturbation, out=out)
    result = aggregate(run.rows, judge_identity(config, run.rows), config.evaluation.threshold)
    generated = sum(int(row["new_tokens"]) for row in run.rows)
    result.timings = {
        "wall_seconds": run.wall_seconds,
        "work_seconds": run.work_seconds,
        "answers_per_second": len(run.rows) / run.work_seconds if run.work_seconds > 0 else 0.0,
        "generated_tokens": float(generated),
    }

    folder = Path(output_dir) if output_dir is not None else default_output_dir(config, adapter, perturbation)
    folder.mkdir(parents=True, exist_ok=True)
    result.samples_path, result.summary_path = folder / SAMPLES_FILE, folder / SUMMARY_FILE
    write_samples(run.rows, result.samples_path)
    summary = {
        **result.summary(),
        "adapter": None if adapter is None else str(adapter),
        "perturbation": None if perturbation is None else str(perturbation),
        "model": config.model.name,
        "task": config.data.task,
    }
    result.summary_path.write_text(json.dumps(summary, indent=2))
    if tracker is not None:
        tracker.log_metrics(result.metrics())
        tracker.set_tags({f"eval.{key}": str(value) for key, value in result.identity.items()})
        for path in (result.samples_path, result.summary_path):
            tracker.log_artifact(path, f"eval/{folder.name}")
    return result


def suite_overrides(path: str | Path | None) -> list[str]:
    """An evaluation preset (a YAML file with one `evaluation:` section) as dotted overrides.

    Applied after the job file and before the command line's KEY=VALUE
    overrides, so a preset replaces the job's evaluation settings and the
    command line still has the last word.
    """
    from panacea_platform.config import ConfigError, read_yaml_mapping

    if path is None:
        return []
    tree = read_yaml_mapping(path, "--suite", "presets live in evaluation/*.yaml")
    if set(tree) != {"evaluation"} or not isinstance(tree["evaluation"], dict):
        raise ConfigError(f"--suite {str(path)!r}: expected exactly one top-level section `evaluation:` holding its keys")
    # JSON is valid YAML, so every value (null, numbers, strings) survives parse_override unchanged.
    return [f"evaluation.{key}={json.dumps(value)}" for key, value in tree["evaluation"].items()]


def format_result(result: EvalResult) -> str:
    """A short table: HS, HS+, refusal rate, FA, counts, judge and where the samples are."""
    counts, identity = result.counts, result.identity
    flagged = round(result.harmful_score * counts["n_harmful"] / 100)
    lines = [
        f"harmful score (HS)    {result.harmful_score:6.1f} %  ({flagged}/{counts['n_harmful']} harmful prompts flagged)",
        f"HS+ (or incoherent)   {result.harmful_score_plus:6.1f} %",
        f"refusal rate          {result.refusal_rate:6.1f} %",
        "fine-tune accuracy    "
        + (f"{result.accuracy:6.1f} %  ({counts['n_task']} task prompts)" if result.accuracy is not None else "   n/a (no task rule)"),
    ]
    lines += [f"  category {name:<22} {rate:6.1f} %" for name, rate in sorted(result.per_category.items())]
    lines += [
        f"answers               {counts['n_harmful'] + counts['n_task']}: {counts['n_empty']} empty, "
        f"{counts['n_truncated']} truncated at {identity.get('max_new_tokens')} tokens, {counts['n_incoherent']} incoherent",
        f"judge                 {identity.get('judge')} ({identity.get('judge_model')}), threshold "
        f"{identity.get('judge_threshold')}, reads {identity.get('judge_max_length')} tokens",
        f"samples               {result.samples_path}",
        f"summary               {result.summary_path}",
    ]
    return "\n".join(lines)
