"""The training loop for both stages (align and finetune).

`train_steps` is the loop itself: it only sees TrainableWeights, a defence and
batch streams. `execute_stage` wraps it with model, held-out losses, artifacts
and MLflow for any backend (LocalBackend here; a DeepSpeed backend in
training/distributed.py). `run_stage` runs a stage in this process.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from panacea_platform.algorithms import build_defence
from panacea_platform.algorithms.defences import Defence
from panacea_platform.algorithms.interface import TrainableWeights, global_norm
from panacea_platform.config import OptimConfig, RunConfig, save_config
from panacea_platform.data import TASKS, Example
from panacea_platform.data.collate import BatchStream, collate, tokenize_example
from panacea_platform.data.pools import HarmfulPools, build_alignment_set, mix_poison, pools_for
from panacea_platform.models import (
    PERTURBATION_FILE,
    attach_lora,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
    save_perturbation,
)
from panacea_platform.analysis import analyse_run, write_layer_analysis
from panacea_platform.plots import plot_training_curves
from panacea_platform.training.torch_backend import TorchWeights
from panacea_platform.tracking import Tracker, default_tracking_uri, package_versions

STAGES = ("align", "finetune")


def training_loss(config: RunConfig) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """lm_loss with the run's compute dtype: under bf16 the forward (and so the backward) matrix products
    run in bf16 through torch.autocast, while the fp32 LoRA weights get fp32 gradients."""
    if config.model.compute_dtype == "float32":
        return lm_loss

    def autocast_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = model.get_input_embeddings().weight.device
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return lm_loss(model, batch)

    return autocast_lm_loss


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over answer tokens (prompt and padding carry label -100).

    The vocabulary projection runs only at the positions whose next token is an answer token in
    some row of the batch (`logits_to_keep`): a prompt position's logits never enter the loss,
    and with a 49k-token vocabulary they cost 10-20% of a step when answers are short (a label).
    The loss is the one HF computes from every logit (tested to 1e-6, gradients too).
    """
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    targets = labels[:, 1:]
    positions = (targets != -100).any(dim=0).nonzero().squeeze(1)
    if positions.numel() == 0 or not _takes_logits_to_keep(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=-100
    )


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under a DeepSpeed engine and a PEFT wrapper accepts `logits_to_keep`."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return _forward_takes_logits_to_keep(type(base))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    # Read once per model class: lm_loss runs on every pass of every step.
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def total_steps(optim: OptimConfig, steps_per_epoch: int) -> int:
    if optim.max_steps is not None:
        return optim.max_steps
    return max(1, math.ceil(optim.epochs * steps_per_epoch))


def lr_factor(schedule: str, warmup_steps: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimiser step `step` (0-based).

    Warm-up is linear and applies to every schedule, constant included (the
    authors' code asks for warm-up with a constant schedule, which ignores it).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig, total: int):
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim.schedule, optim.warmup_steps, total))
    return optimizer, scheduler


class Progress:
    """Prints `label step/total metrics, elapsed, time left` at most every `every` steps."""

    def __init__(self, label: str, total: int, every: int = 1, out: Callable[[str], None] = print) -> None:
        self.label, self.total, self.every, self.out = label, total, every, out
        self.start = time.monotonic()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / step * (self.total - step) if step else 0.0
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.out(f"[{self.label}] step {step}/{self.total} {shown} | {elapsed:.0f}s elapsed, ~{left:.0f}s left")


def train_steps(
    weights: TrainableWeights,
    defence: Defence,
    batches: Iterator[Any],
    harmful_batches: Iterator[Any] | None,
    steps: int,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    start_step: int = 0,
) -> list[dict[str, float]]:
    """Run defence steps start_step + 1 .. steps; returns the metrics of each.

    `start_step` > 0 continues a run from a checkpoint taken after that step:
    the weights, optimiser and defence are restored, and the streams must be
    fast-forwarded past the batches those steps drew (BatchStream.iter_from).
    """
    if steps < 1:
        raise ValueError("training needs at least one step")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step = {start_step}: expected 0 <= start_step <= steps = {steps}")
    history = []
    for step in range(start_step + 1, steps + 1):
        harmful = next(harmful_batches) if defence.uses_harmful_batches and harmful_batches is not None else None
        metrics = defence.step(weights, next(batches), harmful)
        history.append(metrics)
        on_step(step, metrics)
    return history


@torch.no_grad()
def mean_loss(model: torch.nn.Module, features: list[dict], batch_size: int, pad_token_id: int) -> float:
    """Token-weighted mean loss over a held-out set (forward only)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = collate(features[start : start + batch_size], pad_token_id)
        count = int((batch["labels"][:, 1:] != -100).sum())
        if count:
            total += lm_loss(model, batch).item() * count
            tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def heldout_signals(
    model: torch.nn.Module,
    weights: TrainableWeights,
    defence: Defence,
    eval_task: list[dict],
    eval_harmful: list[dict],
    batch_size: int,
    pad_token_id: int,
) -> dict[str, float]:
    """Mid-training held-out losses: task and harmful at w, and both as released (w + eps).

    eps is what the defence would add were training to stop now: Panacea's last
    eps, the random baseline's noise (drawn from a generator of its own, so no
    RNG state of the run is consumed), none for SFT. Forward passes only; the
    weights are w again, bit for bit, afterwards. Run on every rank (under
    ZeRO-3 a forward pass and the perturbation are collective).
    """
    signals = {
        "heldout_task_loss": mean_loss(model, eval_task, batch_size, pad_token_id),
        "heldout_harmful_loss": mean_loss(model, eval_harmful, batch_size, pad_token_id),
    }
    eps = defence.final_perturbation(weights)
    if eps is None:
        signals["released_heldout_harmful_loss"] = signals["heldout_harmful_loss"]
        signals["released_heldout_task_loss"] = signals["heldout_task_loss"]
        return signals
    with weights.perturbed(eps):
        signals["released_heldout_harmful_loss"] = mean_loss(model, eval_harmful, batch_size, pad_token_id)
        signals["released_heldout_task_loss"] = mean_loss(model, eval_task, batch_size, pad_token_id)
    return signals


@dataclass
class StageData:
    train: list[Example]
    defender_harmful: list[Example]
    eval_harmful: list[Example]
    eval_task: list[Example]
    pools: HarmfulPools
    fingerprints: dict[str, str] = field(default_factory=dict)


def fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.prompt.encode())
        digest.update(b"\0")
        digest.update(example.answer.encode())
        digest.update(b"\1")
    return f"{digest.hexdigest()[:16]}:{len(examples)}"


def prepare_data(config: RunConfig, stage: str) -> StageData:
    """The four disjoint harmful pools, the stage's training set and held-out sets."""
    data = config.data
    pools = pools_for(data)
    task = TASKS.get(data.task)
    # Held-out task samples depend on pool_seed only: every seed is scored on the same set.
    eval_task = task(data, "test", data.task_eval_size, data.pool_seed)
    if stage == "align":
        from panacea_platform.data.self_distill import self_distilled_examples

        train = build_alignment_set(
            [e.prompt for e in pools.alignment], data.alignment_size, data.alignment_benign_ratio, config.seed,
            open_pairs=self_distilled_examples(config),
        )
    else:
        clean = task(data, "train", data.n - len(pools.attack), config.seed) if len(pools.attack) < data.n else []
        train = mix_poison(clean, pools.attack, data.n, data.harmful_ratio, config.seed)
    if not train:
        raise ValueError(f"the {stage} training set is empty: check data.n and data.alignment_size")
    prints = {
        "train": fingerprint(train),
        "attack": fingerprint(pools.attack),
        "defender": fingerprint(pools.defender),
        "evaluation": fingerprint(pools.evaluation),
        "alignment": fingerprint(pools.alignment),
        "task_eval": fingerprint(eval_task),
    }
    return StageData(train, pools.defender, pools.evaluation, eval_task, pools, prints)


@dataclass
class StageResult:
    run_dir: Path
    adapter_dir: Path
    unperturbed_adapter_dir: Path | None
    perturbation_path: Path | None
    summary: dict[str, float]
    history: list[dict[str, float]]
    mlflow_run_id: str | None


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class LocalBackend:
    """How a stage builds its model and TrainableWeights in one process (plain PyTorch).

    training/distributed.py has the DeepSpeed counterpart with the same four
    methods and `rank`; `execute_stage` only talks to this surface.
    """

    rank = 0

    def load_model(self, config: RunConfig) -> torch.nn.Module:
        model = attach_lora(load_base_model(config.model), config.lora, config.model.adapter)
        return model.to(training_device())

    def wrap(self, model, optimizer, scheduler, optim: OptimConfig, loss_fn=lm_loss) -> TrainableWeights:
        return TorchWeights(model, loss_fn, optimizer, scheduler, optim.max_grad_norm)

    def full_weights(self, weights: TrainableWeights):
        """A block in which the model's trainable weights are whole (for saving)."""
        return nullcontext()

    def describe(self) -> str:
        return f"on {training_device()}"


def run_stage(
    config: RunConfig,
    stage: str,
    parent_run_id: str | None = None,
    out: Callable[[str], None] = print,
    track: bool = True,
) -> StageResult:
    """Train one stage in this process: data, model, steps, held-out losses, artifacts, MLflow."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    # Data first: a bad file or too small a source is the user's to fix, and
    # fails before a run folder or an MLflow run exists.
    data = prepare_data(config, stage)
    tracker = open_tracker(config, stage, parent_run_id) if track else None
    # The tracker ends its run FINISHED, FAILED (with the error) or KILLED (interrupt).
    with tracker if tracker is not None else nullcontext():
        return execute_stage(config, stage, data, LocalBackend(), tracker, out)


def last_logged_step(tracker: Tracker, key: str = "task_loss") -> int:
    """The last step at which `key` was logged into the tracker's run (0 if none)."""
    history = tracker.client.get_metric_history(tracker.run_id, key)
    return max((metric.step for metric in history), default=0)


def open_tracker(config: RunConfig, stage: str, parent_run_id: str | None) -> Tracker:
    return Tracker(
        config.tracking.tracking_uri or default_tracking_uri(config.output_dir),
        config.tracking.experiment,
        config.run_name,
        artifact_root=Path(config.output_dir) / "mlartifacts",
        parent_run_id=parent_run_id,
        tags={"stage": stage, "defence": config.defence if stage == "finetune" else "sft"},
    )


def execute_stage(
    config: RunConfig,
    stage: str,
    data: StageData,
    backend: Any,
    tracker: Tracker | None,
    out: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    checkpoints: Any | None = None,
) -> StageResult:
    """The body of a stage on any backend; only rank 0 writes files and talks to MLflow.

    Every rank builds the same data, streams and seeds, so every rank holds the
    same global batch; a distributed backend's weights take their share of it.

    `checkpoints` (None in one process; distributed.RayCheckpoints on Ray Train)
    saves and restores the training state. It offers `resume_step` (the step of
    the checkpoint this attempt starts from, or None), `restore(weights, defence)`
    (loads that checkpoint into the weights, optimiser, scheduler, defence and
    RNG; returns (step, history.jsonl rows up to that step) or None) and
    `after_step(step, rows, metrics, weights, defence)` (called after every step
    with the history rows so far; saves a checkpoint when one is due).
    """
    optim = config.optim if stage == "finetune" else config.align_optim
    rank0 = backend.rank == 0
    run_dir = config.run_dir()
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    else:
        out, tracker = (lambda line: None), None
    resuming = checkpoints is not None and checkpoints.resume_step is not None
    if tracker is not None and not resuming:
        # A resumed attempt logs into the run the first attempt opened: its params are there.
        tracker.log_params(
            {**config.flat(), "stage": stage, **{f"data.fingerprint.{k}": v for k, v in data.fingerprints.items()}}
        )
        tracker.log_params(package_versions())
        tracker.log_artifact(run_dir / "config.yaml")

    tokenizer = load_tokenizer(config.model)
    template, max_len = config.data.prompt_template, config.data.max_length

    def tokenize(examples: list[Example]) -> list[dict]:
        return [tokenize_example(tokenizer, template, e, max_len) for e in examples]

    pad = tokenizer.pad_token_id
    stream = BatchStream(tokenize(data.train), optim.batch_size, config.seed, pad)
    steps = total_steps(optim, stream.steps_per_epoch)
    defence = build_defence(config) if stage == "finetune" else DEFENCE_FOR_ALIGNMENT
    harmful_stream = None
    if defence.uses_harmful_batches:
        harmful_stream = BatchStream(tokenize(data.defender_harmful), optim.harmful_batch_size, config.seed + 1, pad)

    seed_everything(config.seed)
    model = backend.load_model(config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, optim, steps)
    weights = backend.wrap(model, optimizer, scheduler, optim, training_loss(config))
    start, rows = 0, []  # rows: history.jsonl lines (step, metrics, lr) of the steps done
    if checkpoints is not None:
        restored = checkpoints.restore(weights, defence)
        if restored is not None:
            start, rows = restored[0], [dict(row) for row in restored[1]]
            if start > steps:
                raise ValueError(f"the checkpoint is at step {start} but this stage has only {steps} steps")

    label = f"{stage} {defence.name}" if stage == "finetune" else stage
    trainable = sum(shape.numel() for shape in weights.weight_shapes())
    out(f"[{label}] {len(data.train)} training samples, {steps} steps of batch {optim.batch_size} "
        f"{backend.describe()}, {trainable:,} trainable weights")
    progress = Progress(label, steps, every=optim.log_every, out=out)
    history_file = (run_dir / "history.jsonl").open("w") if rank0 else None
    if start:
        out(f"[{label}] resumed from the checkpoint at step {start}/{steps}")
        if history_file is not None:
            # The steps before the checkpoint, from the checkpoint: rows the failed
            # attempt wrote after it are dropped, so every step appears once.
            history_file.writelines(json.dumps(row) + "\n" for row in rows)
            history_file.flush()
    # After a restart (from a checkpoint or from scratch), steps a failed attempt
    # already logged are not logged twice: the restarted run recomputes them the same.
    logged_through = last_logged_step(tracker) if tracker is not None and checkpoints is not None else 0
    # Held-out sets are tokenized once; periodic evaluation (optim.eval_every) reuses them.
    eval_harmful, eval_task = tokenize(data.eval_harmful), tokenize(data.eval_task)

    def step_done(step: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "lr": scheduler.get_last_lr()[0]}
        if optim.eval_every and step % optim.eval_every == 0:
            metrics.update(
                heldout_signals(model, weights, defence, eval_task, eval_harmful, optim.batch_size, pad)
            )
        if history_file is not None:
            history_file.write(json.dumps({"step": step, **metrics}) + "\n")
            history_file.flush()
        if tracker is not None and step > logged_through and (step % optim.log_every == 0 or step == steps):
            tracker.log_metrics(metrics, step)
        progress.update(step, metrics)
        on_step(step, metrics)
        if checkpoints is not None:
            rows.append({"step": step, **metrics})
            checkpoints.after_step(step, rows, metrics, weights, defence)

    # A resumed run draws what an uninterrupted one draws after `start` steps (one harmful batch a step).
    batches = stream.iter_from(start)
    harmful_batches = harmful_stream.iter_from(start) if harmful_stream is not None else None
    try:
        # 0 steps (optim.max_steps = 0): model.adapter is released as it is, plus the defence's perturbation.
        history = (train_steps(weights, defence, batches, harmful_batches, steps, step_done, start_step=start)
                   if steps else [])
    finally:
        if history_file is not None:
            history_file.close()
    if start:
        history = [{k: v for k, v in row.items() if k not in ("step", "lr")} for row in rows[:start]] + history

    # Held-out losses run on every rank: under ZeRO-3 each forward pass is collective.
    batch = optim.batch_size
    summary: dict[str, float] = {
        **({"final_task_loss": history[-1]["task_loss"]} if history else {}),
        "heldout_harmful_loss": mean_loss(model, eval_harmful, batch, pad),
        "heldout_task_loss": mean_loss(model, eval_task, batch, pad),
    }

    def save_adapter(path: Path) -> None:
        with backend.full_weights(weights):
            if rank0:
                model.save_pretrained(path)

    perturbation = defence.final_perturbation(weights)
    unperturbed_dir = perturbation_path = None
    if perturbation is not None:
        unperturbed_dir, perturbation_path = run_dir / "adapter_unperturbed", run_dir / PERTURBATION_FILE
        save_adapter(unperturbed_dir)
        if rank0:
            save_perturbation(model, perturbation, perturbation_path)
        # The released model is w_T + eps_T.
        weights.add_to_weights(perturbation)
        summary["perturbation_norm"] = global_norm(perturbation).item()
        summary["released_heldout_harmful_loss"] = mean_loss(model, eval_harmful, batch, pad)
        summary["released_heldout_task_loss"] = mean_loss(model, eval_task, batch, pad)
    else:
        # Nothing is added after training: the released model is w_T itself.
        summary["released_heldout_harmful_loss"] = summary["heldout_harmful_loss"]
        summary["released_heldout_task_loss"] = summary["heldout_task_loss"]
    adapter_dir = run_dir / "adapter"
    save_adapter(adapter_dir)
    if rank0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        curves = (plot_training_curves(history, f"{label}: {config.run_name}", run_dir / "training_curves.png")
                  if history else None)
        out(f"[{label}] done: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        # Where eps goes, layer by layer (the paper's safety-affinity observation), for any model.
        layer_files = [] if perturbation_path is None else write_layer_analysis(
            analyse_run(run_dir, resolve_model_path(config.model.name)), run_dir, f"eps per layer: {config.run_name}"
        )
    if tracker is not None:
        tracker.log_metrics(summary, steps)
        for path in (adapter_dir, unperturbed_dir, perturbation_path, run_dir / "history.jsonl",
                     run_dir / "summary.json", curves, *layer_files):
            if path is not None:
                tracker.log_artifact(path)
    return StageResult(
        run_dir, adapter_dir, unperturbed_dir, perturbation_path, summary, history,
        tracker.run_id if tracker is not None else None,
    )


# Alignment is plain fine-tuning on refusals; defences apply to the user's fine-tuning.
DEFENCE_FOR_ALIGNMENT = Defence()
