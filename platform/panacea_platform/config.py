"""The typed run configuration: one YAML file under jobs/, plus dotted overrides.

A leaf of the package: schemas and each field's own checks (types, ranges, files that must exist,
fields that contradict each other). What a config names is checked against the registries, the
data and the models by config_checks.py, before any work; each plugin's settings sit beside its
code (algorithms/*_config.py, evaluation/suite_config.py) and are gathered here. A bad value
raises ConfigError with one message naming the field, the value given and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from panacea_platform.algorithms.antidote_config import AntidoteConfig
from panacea_platform.algorithms.booster_config import BoosterConfig
from panacea_platform.algorithms.lisa_config import LisaConfig
from panacea_platform.algorithms.panacea_config import PanaceaConfig
from panacea_platform.algorithms.panacea_end_masked_config import PanaceaEndMaskedConfig
from panacea_platform.algorithms.random_perturbation_config import RandomPerturbationConfig
from panacea_platform.algorithms.repnoise_config import RepNoiseConfig
from panacea_platform.algorithms.vaccine_config import VaccineConfig
from panacea_platform.config_base import ConfigError, Section, read_yaml_mapping
from panacea_platform.evaluation.suite_config import DEFAULT_SUITES, SUITE_KEYS, SuiteConfig, resolve_suite_entries


class FieldError(ValueError):
    """A validation message that already names its field and value (printed as it is)."""


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A registered offline model (see `panacea models`), a local directory, or a Hugging Face hub id.",
    )
    adapter: str | None = Field(
        None, description="Existing LoRA adapter directory to keep training (e.g. the aligned adapter)."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repo. Off unless asked.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype while training.")
    after_alignment: Literal["authors", "continue", "merge"] = Field(
        "authors",
        description="What fine-tuning does with an aligned adapter (model.adapter). 'authors': what the "
        "run's defence's authors did (algorithms/convention.py; each defence's fine_tuning setting): SFT, Panacea "
        "and Booster keep training the aligned LoRA, Vaccine, RepNoise, Lisa and Antidote merge it and train a "
        "fresh one (Lisa and Antidote of their own shape, Lisa at its own lr and batch). 'continue' or 'merge': "
        "every defence alike, an ablation. The convention each run ran under is recorded with it.",
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the matrix products in training's forward and backward passes "
        "(torch.autocast). bfloat16 runs them in bf16, as the Panacea authors train, while the weights, the LoRA "
        "gradients, eps and every update stay in float32; held-out losses and generation run in model.dtype.",
    )


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"], min_length=1, description="Modules that get LoRA."
    )


class DataConfig(Section):
    task: str = Field(
        "offline_arithmetic", description="Fine-tuning task: a registered task name (see `panacea tasks`)."
    )
    task_file: str | None = Field(
        None, description="Local JSONL/CSV/Parquet for task 'local' (fields: prompt, answer)."
    )
    n: int = Field(200, ge=1, description="Number of fine-tuning samples the user uploads.")
    harmful_ratio: float = Field(0.1, ge=0, le=1, description="Fraction p of the n samples that are harmful.")
    harmful_source: str = Field(
        "offline_pyrit", description="Harmful question/answer source: 'offline_pyrit', 'beavertails' or 'file'."
    )
    harmful_file: str | None = Field(
        None, description="Local JSONL/CSV/Parquet for harmful_source 'file' (fields: prompt, answer)."
    )
    defender_harmful_size: int = Field(100, ge=1, description="Size of the defender's own harmful set (Panacea's h).")
    eval_harmful_size: int = Field(40, ge=1, description="Held-out harmful prompts (with answers) used for evaluation.")
    task_eval_size: int = Field(50, ge=1, description="Held-out task samples used to measure accuracy.")
    alignment_size: int = Field(200, ge=1, description="Harmful prompts paired with refusals for the alignment stage.")
    alignment_benign_ratio: float = Field(
        0.5, ge=0, lt=1, description="Fraction of the alignment set that is benign requests with helpful answers."
    )
    alignment_self_distill: int = Field(
        0,
        ge=0,
        description="Open benign requests (a short poem, study tips) in the alignment's benign half, answered "
        "by the base model itself before alignment (self-distillation, cached); they replace as many generated factual "
        "pairs. 0 = factual pairs only.",
    )
    task_self_distill: int = Field(
        0,
        ge=0,
        description="Of the user's n - n*p benign samples, this many are ordinary open requests answered by "
        "the base model itself before alignment (self-distilled, cached; other requests than the alignment's), the "
        "rest "
        "the task's: a user's instruction data beside the task. FA reads the task's held-out set only. 0 = task only.",
    )
    max_length: int = Field(128, ge=8, description="Token limit of prompt + answer; longer samples are truncated.")
    pool_seed: int = Field(
        0,
        ge=0,
        description="Seed of the split into attack / defender / evaluation / alignment pools; kept apart "
        "from `seed` so every seed of an experiment is evaluated on the same held-out prompts.",
    )
    prompt_template: str = Field(
        "alpaca", description="'alpaca', 'plain', or a custom template containing '{instruction}'."
    )


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    epochs: float | None = Field(None, gt=0, description="Epochs over the training set (used when max_steps is unset).")
    max_steps: int | None = Field(
        30,
        ge=0,
        description="Optimiser steps; overrides epochs when set. 0 (fine-tuning only) = no step: a "
        "defence that trains as SFT does (sft, random_perturbation) releases model.adapter's weights as they are, "
        "plus its post-training perturbation (the main job derives random perturbation from the SFT run so).",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="Global batch size: split over scaling.num_workers and "
        "grad_accum_steps micro-batches each, unevenly where it must be (a worker with no "
        "sample contributes zero).",
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches each worker runs per pass, their gradients summed with token "
        "weights, so a step equals one pass over the whole batch with the activations of one micro-batch.",
    )
    harmful_batch_size: int = Field(8, ge=1, description="Batch size of the defender's harmful batches (Panacea).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to lr (honoured by every schedule).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the update's global norm; null disables.")
    log_every: int = Field(1, ge=1, description="Log metrics every this many steps.")
    eval_every: int = Field(
        0,
        ge=0,
        description="Held-out losses (task; harmful at w and as released, w + eps) every this many "
        "steps, logged and reported with the step (cheap signals for a sweep's scheduler); 0 = only at the end.",
    )

    @model_validator(mode="after")
    def _length_given(self) -> OptimConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set optim.max_steps or optim.epochs (both are null)")
        return self


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel); more than 1 needs zero_stage.")
    zero_stage: int | None = Field(
        None, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 on Ray Train; null = plain PyTorch in this process."
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker.")
    use_gpu: bool = Field(
        False, description="One GPU per worker, NCCL and DeepSpeed's CUDA accelerator (CPU workers use gloo)."
    )
    deepspeed_json: str | None = Field(
        None,
        description="A DeepSpeed JSON to use instead of the generated one; checked against optim, model.dtype "
        "and scaling (batch split, ZeRO stage, precision, clipping); it may not set optimizer or scheduler.",
    )
    zero_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra zero_optimization keys for DeepSpeed (e.g. offload settings)."
    )
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="Every this many steps the run saves a checkpoint (weights, optimiser, schedule, "
        "step, eps, RNG): in one process into <run folder>/checkpoints, resumed by running the same config "
        "again; on Ray Train each worker's part, reported to Ray Train's storage. 0 = never.",
    )
    keep_checkpoints: int | None = Field(
        2,
        ge=1,
        description="Checkpoints kept (on Ray Train the final run-folder checkpoint counts among them); null = all.",
    )
    storage: str | None = Field(
        None,
        description="Where distributed runs and sweeps keep checkpoints, the released run folder and the "
        "sweep's state: a folder every node sees (an NFS mount on a cluster) or a bucket URI, s3://bucket/prefix "
        "or gs://bucket/prefix (credentials from each node's environment). A single-process run uploads its run "
        "folder there too. null = <output_dir>/ray on this machine.",
    )
    max_failures: int | None = Field(
        None,
        ge=-1,
        description="Distributed runs: times Ray Train restarts the worker group from the latest "
        "checkpoint after a worker fails; null = 1 when checkpoint_every > 0, else 0; -1 = no limit.",
    )

    @property
    def distributed(self) -> bool:
        return self.zero_stage is not None

    @model_validator(mode="after")
    def _stage_for_many_workers(self) -> ScalingConfig:
        if self.zero_stage is None:
            for field, value in (
                ("num_workers", self.num_workers > 1),
                ("use_gpu", self.use_gpu),
                ("deepspeed_json", self.deepspeed_json is not None),
            ):
                if value:
                    raise ValueError(
                        f"scaling.{field} = {getattr(self, field)!r} needs scaling.zero_stage (0-3): "
                        "it applies to training under DeepSpeed on Ray Train workers"
                    )
        if self.deepspeed_json is not None and not Path(self.deepspeed_json).is_file():
            raise ValueError(
                f"scaling.deepspeed_json = {self.deepspeed_json!r}: expected an existing JSON file (not found)"
            )
        return self


class EvaluationConfig(Section):
    judge: str = Field(
        "offline",
        description="Registered harm judge: 'offline' (MiniLM + head trained on the offline labelled "
        "rows), 'beaver_dam' (14-category classifier), 'llama_guard' (generative), 'refusal' (refusal phrases).",
    )
    judge_model: str | None = Field(
        None,
        description="Model of the judge: local directory or hub id; null = the judge's default "
        "(beaver_dam: PKU-Alignment/beaver-dam-7b, llama_guard: meta-llama/LlamaGuard-7b).",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="An answer is flagged when the judge's harm score exceeds this."
    )
    judge_max_length: int = Field(512, ge=16, description="Token limit of what the judge reads (prompt + answer).")
    judge_batch_size: int = Field(16, ge=1, description="Answers per judge call.")
    judge_actors: int = Field(1, ge=1, description="Judge actors in the Ray Data pool.")
    max_new_tokens: int = Field(64, ge=1, description="Greedy generation budget per answer.")
    generation_batch_size: int = Field(20, ge=1, description="Prompts per generation call (left-padded, KV cache).")
    generation_max_batch_tokens: int | None = Field(
        32768,
        ge=1,
        description="Rows x longest prompt per decoding batch: bounds the KV cache it holds (lower "
        "it for large models on small GPUs); null = no limit.",
    )
    generation_actors: int = Field(1, ge=1, description="Generation actors in the Ray Data pool.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves for each generation actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs for each generation or judge actor (0 on CPU).")
    judge_cpus_per_actor: float = Field(
        0.5,
        gt=0,
        description="CPUs Ray reserves for each judge actor (a light judge need not hold a whole core "
        "that generation could use).",
    )
    decoder_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="dtype the generation actors decode in; null = model.dtype, as loaded. Another dtype merges "
        "the adapter (and eps) into the base weights in the loaded dtype, then casts the merged model once. bfloat16 "
        "against float32 on the main job: docs/benchmarks.md (`panacea bench eval --decoder-dtypes float32,bfloat16`).",
    )
    torch_threads_per_actor: int | None = Field(
        None,
        ge=1,
        description="torch threads in each generation actor; null = cpus_per_actor rounded (at least 1).",
    )
    harmful_prompts: int | None = Field(
        None, ge=1, description="Harmful prompts evaluated (from the evaluation pool); null = data.eval_harmful_size."
    )
    task_prompts: int | None = Field(
        None, ge=1, description="Task prompts scored for accuracy; null = data.task_eval_size."
    )
    first_token_probe: bool = Field(
        True,
        description="`panacea demo`: for every released model, P(first new token is an end token) on the "
        "helpfulness, over-refusal and harmful prompts, at w_T and w_T + eps_T, and per layer with eps on that layer "
        "alone (evaluation/first_token.py). Needs a tokenizer with an end-of-sequence or end-of-turn token.",
    )
    suites: list[SuiteConfig] = Field(
        default_factory=lambda: [SuiteConfig(**entry) for entry in DEFAULT_SUITES],
        min_length=1,
        description="Evaluation suites: preset names (evaluation/suites/NAME.yaml), {preset: NAME, KEY: VALUE}, or "
        "inline mappings (name, source, metric, judge, rule, size, max_new_tokens, optional); default: the held-out "
        "harmful pool (harmful_score) and the task's held-out split (accuracy).",
    )

    @field_validator("suites", mode="before")
    @classmethod
    def _suites_valid(cls, entries: Any) -> list[SuiteConfig]:
        """Each suite validated on its own, so an error names the suite and its field."""
        if not isinstance(entries, list):
            raise ValueError("expected a list of suites (preset names or mappings)")
        try:
            resolved = resolve_suite_entries(entries)
        except ConfigError as exc:
            raise FieldError(str(exc)) from None
        suites: list[SuiteConfig] = []
        for position, entry in enumerate(resolved):
            label = entry.get("name", position) if isinstance(entry, dict) else position
            try:
                suite = SuiteConfig.model_validate(entry)
            except ValidationError as exc:
                item = exc.errors()[0]
                field = ".".join(str(part) for part in item["loc"]) or "?"
                message = item["msg"].removeprefix("Value error, ")
                if item["type"] == "extra_forbidden":
                    message = f"unknown key (a suite has {SUITE_KEYS})"
                given = "" if item["type"] in ("missing", "extra_forbidden") else f" = {item.get('input')!r}"
                raise FieldError(f"evaluation.suites[{label}].{field}{given}: {message}") from None
            problem = suite.problem()
            if problem is not None:
                raise FieldError(f"evaluation.suites[{suite.name}].{problem[0]}: {problem[1]}")
            if any(s.name == suite.name for s in suites):
                raise FieldError(f"evaluation.suites[{suite.name}].name: two suites share this name")
            suites.append(suite)
        return suites


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: SQLite store inside output_dir's parent (runs/mlflow.db)."
    )
    experiment: str = Field("panacea", description="MLflow experiment name.")


class RunConfig(Section):
    run_name: str = Field("run", description="Name of the run (MLflow run name, output sub-folder).")
    seed: int = Field(0, ge=0, description="Seed for data sampling, initialisation and noise.")
    output_dir: str = Field("runs", description="Where run folders (adapters, eps, config) are written.")
    defence: str = Field(
        "panacea",
        description="Registered defence (`panacea list`): sft, random_perturbation, "
        "panacea, panacea_end_masked, vaccine, repnoise, booster, lisa, antidote. It acts at the "
        "stages it declares.",
    )
    defence_stages: list[Literal["align", "finetune", "post_finetune"]] | None = Field(
        None,
        description="The stages the defence acts at, a subset of those it declares (e.g. [finetune] for "
        "Panacea's training without adding eps); null = all of them.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    align_optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=5e-4, max_steps=60),
        description="Optimisation of the alignment stage (safety fine-tuning on refusals).",
    )
    random_perturbation: RandomPerturbationConfig = Field(default_factory=RandomPerturbationConfig)
    panacea: PanaceaConfig = Field(default_factory=PanaceaConfig)
    panacea_end_masked: PanaceaEndMaskedConfig = Field(default_factory=PanaceaEndMaskedConfig)
    vaccine: VaccineConfig = Field(default_factory=VaccineConfig)
    repnoise: RepNoiseConfig = Field(default_factory=RepNoiseConfig)
    booster: BoosterConfig = Field(default_factory=BoosterConfig)
    lisa: LisaConfig = Field(default_factory=LisaConfig)
    antidote: AntidoteConfig = Field(default_factory=AntidoteConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _files_given(self) -> RunConfig:
        for field, needed_by, value in (
            ("data.task_file", self.data.task == "local", self.data.task_file),
            ("data.harmful_file", self.data.harmful_source == "file", self.data.harmful_file),
        ):
            if needed_by and value is None:
                raise field_error(field, value, "a path to a JSONL, CSV or Parquet file")
            if value is not None and not Path(value).is_file():
                raise field_error(field, value, "an existing file (not found)")
        if self.model.adapter is not None and not (Path(self.model.adapter) / "adapter_config.json").is_file():
            raise field_error("model.adapter", self.model.adapter, "a LoRA adapter directory with adapter_config.json")
        if self.align_optim.max_steps == 0:
            raise field_error("align_optim.max_steps", 0, "at least 1 (the alignment stage trains)")
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list) else value

        walk("", self.to_dict())
        return out


def field_error(field: str, value: Any, allowed: str) -> ValueError:
    return FieldError(f"{field} = {value!r}: expected {allowed}")


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            lines.append(f"{location}: unknown key (check the spelling; `panacea config fields` lists them)")
        elif isinstance(item.get("ctx", {}).get("error"), FieldError):
            lines.append(message)
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" = {given!r}"
            lines.append(f"{location}{shown}: {message}" if location else message)
    return "invalid configuration: " + "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. panacea.rho=0.5")
    key, raw = text.split("=", 1)
    # YAML parsing gives numbers, booleans, null and lists their types.
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_job_tree(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A job file's mapping; `extends: OTHER.yaml` (relative to the file) starts from OTHER's, each section
    of this file merged into the other's key by key."""
    path = Path(path)
    tree = read_yaml_mapping(path, "config file", "see jobs/")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"config file {str(path)!r}: extends {base!r} again (a cycle)")
    merged = read_job_tree(base_path, (*seen, path.resolve()))
    for key, value in tree.items():
        merged[key] = (
            {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML job file (or the defaults) and apply dotted overrides."""
    tree = read_job_tree(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    return config_from_dict(tree)


def with_changes(config: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A validated copy of `config` with dotted keys (spelt as `panacea config show` prints them) replaced."""
    tree = config.to_dict()
    for dotted, value in changes.items():
        apply_override(tree, dotted.split("."), value)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
