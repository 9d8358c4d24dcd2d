"""`evaluate_model`: every evaluation suite of the run (harm, capability, over-refusal, helpfulness, task) on one model.

The model is the base (adapter None), base + adapter, or base + adapter + eps
(a Panacea run's adapter/ already holds w_T + eps_T; adapter_unperturbed/ plus
perturbation.safetensors give the same model built from w_T and eps_T).

Outputs, in `output_dir` (default: <adapter's run folder>/eval-<adapter folder>):
- samples.jsonl: one row per prompt (suite, prompt, answer, its length and budget, empty,
  refused, incoherent; the judge's verdict, score and categories, or the rule's reading);
- eval_summary.json: per suite, every rate with its 95% interval, the counts (unparsed
  verdicts and truncated judge inputs among them), the judge's identity and the budget.
Both are logged as MLflow artifacts of the run evaluated (when a tracker or run
id is given), with the metrics (prefix "eval/") and the judge's identity as tags.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panacea_platform.evaluation.results import EvalResult, aggregate, format_result, sample_record
from panacea_platform.run_notes import answers_rows

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig
    from panacea_platform.tracking import Tracker

__all__ = ["evaluate_model", "format_result"]

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "eval_summary.json"


def write_samples(records: list[dict[str, Any]], path: Path) -> None:
    # ensure_ascii: any answer (odd unicode, control characters, lone surrogates) becomes valid JSON.
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")


def default_output_dir(config: RunConfig, adapter: str | Path | None, perturbation: str | Path | None) -> Path:
    if adapter is None:
        return config.run_dir() / "eval-base"
    name = Path(adapter).resolve().name + ("+" + Path(perturbation).stem if perturbation is not None else "")
    return Path(adapter).resolve().parent / f"eval-{name}"


def _tracker_for(config: RunConfig, tracker: Tracker | None, mlflow_run_id: str | None) -> Tracker | None:
    from panacea_platform.config import ConfigError
    from panacea_platform.tracking import Tracker, default_tracking_uri

    if tracker is not None or mlflow_run_id is None:
        return tracker
    uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    try:
        return Tracker.attach(uri, mlflow_run_id)
    except Exception as exc:  # MlflowException: unknown run id
        raise ConfigError(f"--run-id {mlflow_run_id!r}: no such MLflow run in {uri} ({str(exc)[:200]})") from None


def released_model_of_run(tracking_uri: str, run_id: str, into: Path) -> tuple[Path, dict[str, Any]]:
    """The released adapter (w_T + eps_T) and the model section of an MLflow training run, downloaded
    through the tracking store into `into`: a run is evaluated from its id alone, on any machine."""
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from panacea_platform.config import ConfigError

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--run-id {run_id!r}: no such run in the tracking store {tracking_uri}") from None
    names = {artifact.path for artifact in client.list_artifacts(run_id)}
    if "adapter" not in names:
        raise ConfigError(
            f"--run-id {run_id!r}: the run has no 'adapter' artifact (it is not a training run); "
            "pass --adapter to evaluate a model and log into this run"
        )
    into.mkdir(parents=True, exist_ok=True)
    adapter = Path(client.download_artifacts(run_id, "adapter", str(into)))
    model: dict[str, Any] = {}
    if "config.yaml" in names:
        tree = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(into))).read_text())
        model = {key: tree["model"][key] for key in ("name", "trust_remote_code", "dtype") if key in tree["model"]}
    return adapter, model


def evaluate_model(
    config: RunConfig,
    adapter: str | Path | None,
    perturbation: str | Path | None = None,
    *,
    out: Callable[[str], None] = print,
    tracker: Tracker | None = None,
    mlflow_run_id: str | None = None,
    output_dir: str | Path | None = None,
) -> EvalResult:
    """Generate and judge the run's evaluation prompts with the given model; write, log and return the aggregates.

    `tracker` or `mlflow_run_id` (attached through config.tracking) names the
    MLflow run being evaluated; with neither, nothing is logged.
    """
    from panacea_platform.algorithms.convention import with_convention
    from panacea_platform.evaluation.pipeline import check_adapter, evaluation_prompts, run_pipeline
    from panacea_platform.evaluation.suites import check_suites

    # The fine-tuned adapter sits on the base its run trained on: the aligned one merged, or not.
    config = with_convention(config)
    # Everything the user can get wrong fails here, before Ray starts.
    check_adapter(config.model, adapter, perturbation)
    config = check_suites(config, out)
    tracker = _tracker_for(config, tracker, mlflow_run_id)
    prompts = evaluation_prompts(config)
    run = run_pipeline(config, prompts, adapter, perturbation, out=out)
    records = [sample_record(row) for row in run.rows]
    identities = {row["judge_name"]: json.loads(row["judge_identity"]) for row in run.rows if row["judge_identity"]}
    sources = {suite.name: suite.source for suite in config.evaluation.suites}
    result = EvalResult(
        suites=aggregate(records, sources, config.evaluation.threshold, identities),
        identity={
            "judges": ",".join(sorted(identities)),
            "prompt_template": config.data.prompt_template,
            "suites": ",".join(sources),
            "decoder_dtype": ",".join(sorted({row["decoder_dtype"] for row in run.rows})),
        },
    )
    generated = sum(int(row["new_tokens"]) for row in run.rows)
    result.timings = {
        "wall_seconds": run.wall_seconds,
        "work_seconds": run.work_seconds,
        "answers_per_second": len(run.rows) / run.work_seconds if run.work_seconds > 0 else 0.0,
        "generated_tokens": float(generated),
    }

    folder = Path(output_dir) if output_dir is not None else default_output_dir(config, adapter, perturbation)
    _write(result, records, folder, config, adapter, perturbation)
    if tracker is not None:
        _log(tracker, result, records, identities, folder)
    return result


def _write(
    result: EvalResult,
    records: list[dict[str, Any]],
    folder: Path,
    config: RunConfig,
    adapter: str | Path | None,
    perturbation: str | Path | None,
) -> None:
    """samples.jsonl and eval_summary.json into `folder`; their paths into `result`."""
    folder.mkdir(parents=True, exist_ok=True)
    result.samples_path, result.summary_path = folder / SAMPLES_FILE, folder / SUMMARY_FILE
    write_samples(records, result.samples_path)
    summary = {
        **result.summary(),
        "adapter": None if adapter is None else str(adapter),
        "perturbation": None if perturbation is None else str(perturbation),
        "model": config.model.name,
        "task": config.data.task,
    }
    result.summary_path.write_text(json.dumps(summary, indent=2))


def _log(
    tracker: Tracker, result: EvalResult, records: list[dict[str, Any]], identities: dict[str, Any], folder: Path
) -> None:
    """The evaluation into its MLflow run: the metrics, the judges' identities, the files, the answers table."""
    tracker.log_metrics(result.metrics())
    tracker.set_tags({f"eval.{key}": str(value) for key, value in result.identity.items()})
    for name, identity in identities.items():
        tracker.set_tags({f"eval.judge.{name}.{key}": str(value) for key, value in identity.items()})
    for path in (result.samples_path, result.summary_path):
        if path is not None:  # _write sets both
            tracker.log_artifact(path, f"eval/{folder.name}")
    tracker.log_table(answers_rows(records), f"eval/{folder.name}/answers.json")


def preset_overrides(path: str | Path | None) -> list[str]:
    """An evaluation preset (a YAML file with one `evaluation:` section) as dotted overrides.

    Applied after the job file and before the command line's KEY=VALUE
    overrides, so a preset replaces the job's evaluation settings and the
    command line still has the last word.
    """
    from panacea_platform.config import ConfigError, read_yaml_mapping

    if path is None:
        return []
    tree = read_yaml_mapping(path, "--preset", "presets live in evaluation/*.yaml")
    if set(tree) != {"evaluation"} or not isinstance(tree["evaluation"], dict):
        raise ConfigError(
            f"--preset {str(path)!r}: expected exactly one top-level section `evaluation:` holding its keys"
        )
    # JSON is valid YAML, so every value (null, numbers, strings) survives parse_override unchanged.
    return [f"evaluation.{key}={json.dumps(value)}" for key, value in tree["evaluation"].items()]
