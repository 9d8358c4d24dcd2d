"""The evaluation pipeline on Ray Data: prompts -> generation actor pool -> judge actor pool -> rows.

    ray.data.from_items(prompts)
      .map_batches(GeneratorActor, ActorPoolStrategy(size=evaluation.generation_actors),
                   batch_size=evaluation.generation_batch_size, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
      .map_batches(JudgeActor, ActorPoolStrategy(size=evaluation.judge_actors),
                   batch_size=evaluation.judge_batch_size, num_cpus=judge_cpus_per_actor, num_gpus=gpus_per_actor)

Each generator actor loads base + adapter (+ eps) once and answers a whole
batch per decode (left padding, KV cache), every row within its suite's token
budget; each judge actor loads the refusal judge and, when first needed, each
harm judge a suite names, and scores every row: refusal, emptiness and
incoherence for all, the judge's verdict for harmful_score suites and the
rule's reading for accuracy suites. The same code runs on this CPU machine
(embedded Ray) and on a GPU cluster (RAY_ADDRESS): only the pool sizes and
per-actor resources change.

Prompts come from the run's evaluation suites (evaluation/suites.py), each in
its source's fixed order (data.pool_seed, never the run's seed), so every seed
and every arm of an experiment is scored on the same prompts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panacea_platform import console
from panacea_platform.config import ConfigError
from panacea_platform.data.templates import render_prompt
from panacea_platform.evaluation.generation import balanced_order

if TYPE_CHECKING:
    from panacea_platform.config import EvaluationConfig, ModelConfig, RunConfig

__all__ = [
    "AdapterMismatchError",
    "EvalPrompt",
    "PipelineRun",
    "check_adapter",
    "evaluation_prompts",
    "load_eval_model",
    "run_pipeline",
]


class AdapterMismatchError(ConfigError):
    """The adapter (or its perturbation) was trained for another base model than model.name."""


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to answer: `instruction` is what the judge reads, `rendered` what the model reads.

    `judge` (harmful_score suites) and `rule` (accuracy suites) say how the answer is scored;
    "" means none. `budget` is the suite's max_new_tokens.
    """

    index: int
    suite: str
    metric: str
    judge: str
    rule: str
    budget: int
    instruction: str
    rendered: str
    label: str | None
    reference: str
    category: str | None

    def to_row(self) -> dict[str, Any]:
        # Ray Data columns need one type per column: "" stands for "none" in text columns.
        return {
            "index": self.index,
            "suite": self.suite,
            "metric": self.metric,
            "judge_name": self.judge,
            "rule": self.rule,
            "budget": self.budget,
            "instruction": self.instruction,
            "rendered": self.rendered,
            "label": self.label or "",
            "has_label": self.label is not None,
            "reference": self.reference,
            "category": self.category or "",
        }


def evaluation_prompts(config: RunConfig) -> list[EvalPrompt]:
    """Every suite's prompts, in suite order, rendered with the run's template."""
    from panacea_platform.evaluation.suites import suite_budget, suite_examples, suite_judge, suite_rule

    template = config.data.prompt_template
    prompts: list[EvalPrompt] = []
    for suite in config.evaluation.suites:
        judge, rule, budget = (
            suite_judge(config, suite) or "",
            suite_rule(config, suite) or "",
            suite_budget(config, suite),
        )
        for example in suite_examples(config, suite):
            prompts.append(
                EvalPrompt(
                    len(prompts),
                    suite.name,
                    suite.metric,
                    judge,
                    rule,
                    budget,
                    example.prompt,
                    render_prompt(template, example.prompt),
                    example.label,
                    example.answer,
                    example.category,
                )
            )
    return prompts


# ----------------------------------------------------------------------------- model loading


def _same_model(recorded: str, resolved: str) -> bool:
    """Whether an adapter's recorded base model is the one about to be loaded.

    Equal after resolving paths, or equal last path components: a run trained on
    another machine records that machine's cache path for the same offline
    model, and a hub id "org/name" matches a local copy in a folder "name".
    """

    def norm(text: str) -> str:
        path = Path(text).expanduser()
        return str(path.resolve()) if path.exists() else text.rstrip("/")

    if norm(recorded) == norm(resolved):
        return True
    return Path(recorded.rstrip("/")).name.lower() == Path(resolved.rstrip("/")).name.lower()


def check_adapter(model_config: ModelConfig, adapter: str | Path | None, perturbation: str | Path | None) -> None:
    """Fail before any work when the adapter or perturbation is missing or names another base model."""
    from panacea_platform.models import resolve_model_path

    if perturbation is not None and not Path(perturbation).is_file():
        raise FileNotFoundError(
            f"--perturbation {str(perturbation)!r}: no such file (expected a perturbation.safetensors)"
        )
    if adapter is None:
        if perturbation is not None:
            raise ConfigError("--perturbation needs --adapter: eps is added to an adapter's LoRA weights")
        return
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"--adapter {str(adapter)!r}: no adapter_config.json there (expected a LoRA adapter folder, e.g. "
            "runs/<run>/adapter)"
        )
    recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    resolved = resolve_model_path(model_config.name)
    if recorded and not _same_model(recorded, resolved):
        raise AdapterMismatchError(
            f"--adapter {str(adapter)!r} was trained on base model {recorded!r} but model.name = "
            f"{model_config.name!r} loads {resolved!r}; set model.name to the adapter's base model"
        )


def load_eval_model(
    model_config: ModelConfig,
    adapter: str | Path | None,
    perturbation: str | Path | None = None,
    decoder_dtype: str | None = None,
):
    """Base model (adapter None) or base + adapter (+ eps), in eval mode; a shape mismatch is a clear error."""
    import torch

    from panacea_platform.models import load_base_model, load_for_eval

    if adapter is None:
        model = load_base_model(model_config)
        model.eval()
    else:
        try:
            model = load_for_eval(model_config, str(adapter), None if perturbation is None else str(perturbation))
        except (RuntimeError, ValueError) as exc:
            if "size mismatch" in str(exc) or "perturbation" in str(exc) or "shape" in str(exc):
                raise AdapterMismatchError(
                    f"adapter {str(adapter)!r}{' + ' + str(perturbation) if perturbation else ''} does not fit base "
                    f"model {model_config.name!r} ({str(exc).splitlines()[0][:300]}); set model.name to the base "
                    "model the adapter was trained on"
                ) from None
            raise
    model = as_decoder_dtype(model, decoder_dtype)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def as_decoder_dtype(model: Any, decoder_dtype: str | None) -> Any:
    """The model to decode with, in `decoder_dtype`; None, or the dtype it was loaded in, leaves it as loaded.

    Another dtype merges the LoRA (and the eps already added to it) into the base weights first, in
    their loaded dtype, and casts once: B A and eps, each small beside W, are added before rounding
    to bfloat16's 8 bits of mantissa rather than lost to it, and the decode runs no LoRA side path.
    """
    import torch

    if decoder_dtype is None:
        return model
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16}[decoder_dtype]
    if next(model.parameters()).dtype == target:
        return model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(dtype=target)


# ----------------------------------------------------------------------------- actors


def _quiet_transformers() -> None:
    # Weight-loading progress bars and peft's deprecation warning from every actor would bury the
    # pipeline's own progress lines (the CLI silences the warning in the driver the same way).
    from transformers.utils import logging as hf_logging

    from panacea_platform.models import silence_peft_deprecation

    silence_peft_deprecation()

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class GeneratorActor:
    """Loads the model once; answers each batch of rendered prompts in one batched greedy decode, each
    row within its own suite's budget."""

    def __init__(
        self,
        model_config: dict,
        adapter: str | None,
        perturbation: str | None,
        torch_threads: int,
        max_batch_tokens: int | None = None,
        decoder_dtype: str | None = None,
    ) -> None:
        import torch

        from panacea_platform.config import ModelConfig
        from panacea_platform.models import load_tokenizer

        torch.set_num_threads(torch_threads)
        _quiet_transformers()
        config = ModelConfig.model_validate(model_config)
        self.tokenizer = load_tokenizer(config)
        self.model = load_eval_model(config, adapter, perturbation, decoder_dtype)
        self.decoded_in = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.max_batch_tokens = max_batch_tokens
        self.ready_at = time.time()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from panacea_platform.evaluation.generation import generate

        started = time.time()
        prompts = [str(text) for text in batch["rendered"]]
        budgets = [int(b) for b in batch["budget"]]
        answers = generate(
            self.model,
            self.tokenizer,
            prompts,
            budgets,
            batch_size=max(1, len(prompts)),
            max_batch_tokens=self.max_batch_tokens,
        )
        return {
            **batch,
            "answer": np.array([a.text for a in answers], dtype=object),
            "truncated": np.array([a.truncated for a in answers], dtype=bool),
            "new_tokens": np.array([a.new_tokens for a in answers], dtype=np.int64),
            "decoder_dtype": np.full(len(answers), self.decoded_in, dtype=object),
            "generator_ready_at": np.full(len(answers), self.ready_at),
            "generation_seconds": np.full(len(answers), time.time() - started),
        }


class JudgeActor:
    """Scores every answer of a batch: refusal, emptiness and incoherence for all; the row's harm judge
    (harmful_score suites) or accuracy rule (accuracy suites). Judges load once, when first needed."""

    def __init__(self, evaluation: dict, judge_classes: dict[str, type] | None = None) -> None:
        from panacea_platform.config import EvaluationConfig
        from panacea_platform.evaluation.judges import JUDGES, build_judge

        _quiet_transformers()
        # A judge registered at run time in the driver (a plugin) is unknown to this
        # fresh worker process: the driver ships its class and it is registered here.
        for name, judge_class in (judge_classes or {}).items():
            if name not in JUDGES:
                JUDGES.register(name, judge_class)
        self.config = EvaluationConfig.model_validate(evaluation)
        self.judges: dict[str, Any] = {"refusal": build_judge(self.config, "refusal")}
        self.identities: dict[str, str] = {}

    def _judge(self, name: str):
        from panacea_platform.evaluation.judges import build_judge

        if name not in self.judges:
            self.judges[name] = build_judge(self.config, name)
        if name not in self.identities:
            # The judge's own identity (an offline judge adds its held-out AUC), carried on its rows.
            self.identities[name] = json.dumps(self.judges[name].identity(), default=str)
        return self.judges[name]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from panacea_platform.evaluation.metrics import has_content, is_incoherent, score_answer

        n = len(batch["suite"])
        answers, prompts = [str(a) for a in batch["answer"]], [str(p) for p in batch["instruction"]]
        columns: dict[str, Any] = {
            key: np.zeros(n, dtype=bool)
            for key in ("flagged", "judge_unparsed", "judge_truncated", "scored", "correct")
        }
        columns.update(
            score=np.full(n, np.nan),
            categories=np.array(["{}"] * n, dtype=object),
            extracted=np.array([""] * n, dtype=object),
            judge_identity=np.array([""] * n, dtype=object),
        )
        refusals = self.judges["refusal"].judge(prompts, answers)
        for name in sorted({str(j) for j in batch["judge_name"]} - {""}):
            rows = [i for i in range(n) if batch["judge_name"][i] == name]
            judge = self._judge(name)
            verdicts = (
                [refusals[i] for i in rows]
                if name == "refusal"
                else judge.judge([prompts[i] for i in rows], [answers[i] for i in rows])
            )
            for i, verdict in zip(rows, verdicts):
                columns["flagged"][i], columns["score"][i] = verdict.flagged, verdict.score
                columns["judge_unparsed"][i], columns["judge_truncated"][i] = verdict.unparsed, verdict.truncated
                columns["categories"][i], columns["judge_identity"][i] = (
                    json.dumps(verdict.categories),
                    self.identities[name],
                )
        for i in range(n):
            if batch["rule"][i]:
                label = str(batch["label"][i]) if batch["has_label"][i] else None
                result = score_answer(str(batch["rule"][i]), answers[i], label, str(batch["reference"][i]))
                if result is not None:
                    columns["scored"][i], columns["correct"][i] = True, result.correct
                    columns["extracted"][i] = result.extracted or ""
        return {
            **batch,
            **columns,
            "refused": np.array([v.flagged for v in refusals], dtype=bool),
            "empty": np.array([not has_content(a) for a in answers], dtype=bool),
            "incoherent": np.array([is_incoherent(a) for a in answers], dtype=bool),
            "judged_at": np.full(n, time.time()),
        }


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class PipelineRun:
    """Rows in prompt order, and timings: `work_seconds` runs from the first generator actor being
    ready (model loaded) to the last row judged; `wall_seconds` includes actor start-up and loading."""

    rows: list[dict[str, Any]]
    wall_seconds: float
    work_seconds: float


def torch_threads(evaluation: EvaluationConfig) -> int:
    return evaluation.torch_threads_per_actor or max(1, round(evaluation.cpus_per_actor))


def check_resources(evaluation: EvaluationConfig) -> None:
    """Both actor pools must fit the Ray cluster at once, or the pipeline would wait forever."""
    import ray

    available = ray.cluster_resources()
    for resource, generation, judge, keys in (
        ("CPU", evaluation.cpus_per_actor, evaluation.judge_cpus_per_actor, "cpus_per_actor / judge_cpus_per_actor"),
        ("GPU", evaluation.gpus_per_actor, evaluation.gpus_per_actor, "gpus_per_actor"),
    ):
        needed = evaluation.generation_actors * generation + evaluation.judge_actors * judge
        if needed > available.get(resource, 0.0) + 1e-9:
            raise ConfigError(
                f"evaluation needs {needed:g} {resource} (generation_actors = {evaluation.generation_actors} x "
                f"{generation:g} + judge_actors = {evaluation.judge_actors} x {judge:g}) but the Ray cluster has "
                f"{available.get(resource, 0.0):g}; lower evaluation.generation_actors, evaluation.judge_actors or "
                f"evaluation.{keys}"
            )


def run_pipeline(
    config: RunConfig,
    prompts: list[EvalPrompt],
    adapter: str | Path | None,
    perturbation: str | Path | None = None,
    out: Callable[[str], None] = print,
) -> PipelineRun:
    """Generate and judge every prompt on Ray Data; rows come back in prompt order."""
    import ray.data

    from panacea_platform.ray_instance import connect_ray

    evaluation = config.evaluation
    connect_ray()
    check_resources(evaluation)
    judges = sorted({p.judge for p in prompts} - {""})
    if "offline" in judges and evaluation.judge_model is None:
        # Train (once, cached) here, not in each judge actor at the same time.
        from panacea_platform.evaluation.judges.offline import ensure_offline_judge

        ensure_offline_judge()
    console.route_library_loggers()  # Ray Data's first use set up its own logger to print
    context = ray.data.DataContext.get_current()
    # Ray Data's own bars show the progress (console.py); its plan and statistics go to the run's log.
    context.enable_progress_bars = console.bars()
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    ordered = [prompts[i] for i in work_order(prompts, evaluation.generation_batch_size)]
    dataset = _dataset(config, ordered, adapter, perturbation, judges)
    start = time.monotonic()
    suites = ", ".join(f"{s} {sum(p.suite == s for p in prompts)}" for s in dict.fromkeys(p.suite for p in prompts))
    out(
        f"[eval] {len(prompts)} prompts ({suites}), {evaluation.generation_actors} generation actor(s) x batch "
        f"{evaluation.generation_batch_size}, judge(s) {', '.join(judges) or 'none'}"
    )
    try:
        rows = _collect_rows(dataset, len(prompts))
    except Exception as exc:
        from panacea_platform.user_errors import user_error_in

        found = user_error_in(exc, (ConfigError, FileNotFoundError), follow_context=True)
        if found is not None:
            raise type(found)(str(found)) from None
        raise
    wall = time.monotonic() - start
    rows.sort(key=lambda row: row["index"])
    work = max(row["judged_at"] for row in rows) - min(row["generator_ready_at"] for row in rows)
    out(
        f"[eval] {len(rows)}/{len(prompts)} answers generated and judged in {console.clock(wall)} "
        f"({len(rows) / wall:.2f} answers/s)"
    )
    return PipelineRun(rows=rows, wall_seconds=wall, work_seconds=work)


def _dataset(
    config: RunConfig,
    ordered: list[EvalPrompt],
    adapter: str | Path | None,
    perturbation: str | Path | None,
    judges: list[str],
):
    """The Ray Data plan: prompts -> generation actor pool -> judge actor pool (lazy until iterated)."""
    import ray.data

    from panacea_platform.evaluation.judges import JUDGES

    evaluation = config.evaluation
    return (
        ray.data.from_items([p.to_row() for p in ordered])
        .map_batches(
            GeneratorActor,
            fn_constructor_kwargs={
                "model_config": config.model.model_dump(mode="json"),
                "adapter": None if adapter is None else str(Path(adapter).resolve()),
                "perturbation": None if perturbation is None else str(Path(perturbation).resolve()),
                "torch_threads": torch_threads(evaluation),
                "max_batch_tokens": evaluation.generation_max_batch_tokens,
                "decoder_dtype": evaluation.decoder_dtype,
            },
            batch_size=evaluation.generation_batch_size,
            batch_format="numpy",
            # One batch in flight per actor: with more, Ray Data may queue every batch on the first
            # actor while the others idle (measured: both 40-prompt batches on one of 2 actors, 1.7x the time).
            compute=ray.data.ActorPoolStrategy(size=evaluation.generation_actors, max_tasks_in_flight_per_actor=1),
            num_cpus=evaluation.cpus_per_actor,
            num_gpus=evaluation.gpus_per_actor,
        )
        .map_batches(
            JudgeActor,
            fn_constructor_kwargs={
                "evaluation": evaluation.model_dump(mode="json"),
                "judge_classes": {name: JUDGES.get(name) for name in judges},
            },
            batch_size=evaluation.judge_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=evaluation.judge_actors),
            num_cpus=evaluation.judge_cpus_per_actor,
            num_gpus=evaluation.gpus_per_actor,
        )
    )


def work_order(prompts: list[EvalPrompt], batch_size: int) -> list[int]:
    """Prompt indices in the order batches are cut: suites of the largest budget first, and within a
    budget, batches of equal work (balanced_order).

    Rows of one batch decode together until the longest budget is spent, so mixing a 64-token
    suite with an 8-token one would keep the short rows' batch alive for 64 steps; budget-sorted
    batches, largest first, also let the actors take the long batches while the short ones wait.
    """
    order: list[int] = []
    for budget in sorted({p.budget for p in prompts}, reverse=True):
        members = [i for i, p in enumerate(prompts) if p.budget == budget]
        order += [members[j] for j in balanced_order([len(prompts[i].rendered) for i in members], batch_size)]
    return order


def _collect_rows(dataset: Any, total: int) -> list[dict[str, Any]]:
    """The answers in the order they arrive; where Ray Data draws no bar, console.answers_bar counts them."""
    rows: list[dict[str, Any]] = []
    bar = console.answers_bar(total)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            answers = _batch_rows(batch)
            rows.extend(answers)
            if bar is not None:
                bar.update(len(answers))
    finally:
        if bar is not None:
            bar.close()
    return rows


def _batch_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [{key: _plain(batch[key][i]) for key in keys} for i in range(len(batch[keys[0]]))]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (for JSON)."""
    return value.item() if hasattr(value, "item") else value
