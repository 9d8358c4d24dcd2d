"""The training loop for both stages (align and finetune), on any strategy.

`train_steps` is the loop itself: it only sees TrainableWeights, a defence and batch streams.
`execute_stage` runs a stage on one rank as setup -> train -> finalise: every rank builds the same
data, streams and seeds (so every rank holds the same global batch, and its TrainableWeights takes
its share), and rank 0 writes the run folder. What comes after the last collective (plots, the
layer analysis, MLflow uploads) is publish.py's, run by whoever owns the run: this process in
`run_stage`, the driver on Ray Train (launch_ray.py).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from panacea_platform import console
from panacea_platform.algorithms.convention import describe as describe_convention
from panacea_platform.algorithms.convention import with_convention
from panacea_platform.algorithms.defences import ALIGN, POST_FINETUNE, Defence, stage_defence
from panacea_platform.algorithms.interface import TrainableWeights, global_norm
from panacea_platform.algorithms.provenance import write_alignment_provenance
from panacea_platform.config import RunConfig, save_config
from panacea_platform.data import Example
from panacea_platform.data.collate import BatchStream, collate, tokenize_example
from panacea_platform.models import PERTURBATION_FILE, load_tokenizer, save_perturbation
from panacea_platform.run_notes import training_note
from panacea_platform.tracking import Tracker, default_tracking_uri, package_versions
from panacea_platform.training.checkpointing import Checkpoints, LocalCheckpoints, run_identity, run_settings
from panacea_platform.training.losses import heldout_signals, mean_loss, training_loss
from panacea_platform.training.result import StageResult
from panacea_platform.training.schedule import total_steps
from panacea_platform.training.stage_data import STAGES, StageData, prepare_data

CHECKPOINT_DIR = "checkpoints"


class Progress:
    """A stage's progress bar on the rank that prints, with rate and ETA: Ray's tqdm from a Ray worker (the
    driver draws it), tqdm's in this process. In lines mode (console.py) no bar: the stage's "done" line
    says how long it took."""

    def __init__(self, label: str, total: int, start: int = 0, out: Callable[[str], None] = print) -> None:
        self.label, self.total, self.out = label, total, out
        self.started, self.first = time.monotonic(), start
        self.bar = _progress_bar(f"[{label}]", total, start) if console.bars() and out is not _silent else None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.set_description(
            f"[{self.label}] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in _SHOWN)
        )
        self.bar.update(1)
        if step == self.total:
            self.bar.close()

    def describe(self) -> str:
        """e.g. "30 steps in 4m25s (0.11 steps/s)"."""
        elapsed = time.monotonic() - self.started
        steps = self.total - self.first
        return f"{steps} steps in {console.clock(elapsed)} ({steps / elapsed if elapsed > 0 else 0.0:.2f} steps/s)"


_SHOWN = ("task_loss", "harmful_loss", "loss", "heldout_task_loss")


def _silent(line: str) -> None:
    """The printer of the ranks other than 0."""


def _progress_bar(desc: str, total: int, start: int) -> Any:
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        bar = ray_tqdm(desc=desc, total=total, unit="step")
        bar.update(start)
        return bar
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, initial=start, unit="step", dynamic_ncols=True)


def train_steps(
    weights: TrainableWeights,
    defence: Defence,
    batches: Iterator[Any],
    extra_batches: dict[str, Iterator[Any]] | None,
    steps: int,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    start_step: int = 0,
    stage: str = "finetune",
) -> list[dict[str, float]]:
    """Run defence steps start_step + 1 .. steps; returns the metrics of each.

    Each step draws one batch from `batches` and one from each of `extra_batches` (the streams the
    defence needs at this stage, by name), whether or not the step uses it, so that a run resumed at
    `start_step` > 0 (weights, optimiser and defence restored; streams fast-forwarded with
    BatchStream.iter_from) draws what an uninterrupted one draws.
    """
    if steps < 1:
        raise ValueError("training needs at least one step")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step = {start_step}: expected 0 <= start_step <= steps = {steps}")
    step_of = defence.align_step if stage == "align" else defence.step
    history = []
    for step in range(start_step + 1, steps + 1):
        extra = {name: next(stream) for name, stream in (extra_batches or {}).items()}
        metrics = step_of(weights, next(batches), extra)
        history.append(metrics)
        on_step(step, metrics)
    return history


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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
        tags={
            "stage": stage,
            "defence": stage_defence(config, stage).name,
            "after_alignment": config.model.after_alignment if config.model.adapter else "none",
        },
    )


# -- a stage in this process ---------------------------------------------------------------------------


def run_stage(
    config: RunConfig,
    stage: str,
    parent_run_id: str | None = None,
    out: Callable[[str], None] = print,
    track: bool = True,
) -> StageResult:
    """Train one stage in this process (plain PyTorch): data, model, steps, held-out losses, artifacts, MLflow.

    With scaling.checkpoint_every > 0 the stage checkpoints into <run folder>/checkpoints; running the
    same config again after an interruption resumes from the latest one, logging into the same MLflow
    run. The checkpoints are removed once the stage has finished.
    """
    from panacea_platform.training.publish import publish_stage
    from panacea_platform.training.strategy import check_precision
    from panacea_platform.training.strategy.torch import TorchStrategy

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "finetune":
        config = with_convention(config)  # algorithms/convention.py; a resolved config is unchanged
    check_precision(config, use_gpu=torch.cuda.is_available())
    optim = config.optim if stage == "finetune" else config.align_optim
    strategy = TorchStrategy(accumulation=optim.grad_accum_steps)
    store = LocalCheckpoints(config.run_dir() / CHECKPOINT_DIR, config.scaling.keep_checkpoints)
    # A checkpoint this run cannot continue from, a bad file or too small a source is the user's to fix,
    # and fails before any training, and before an MLflow run exists.
    checkpoints = _local_checkpoints(config, stage, strategy, store)
    data = prepare_data(config, stage)
    tracker = None
    if track:
        resumed_run = checkpoints.state.get("mlflow_run_id") if checkpoints.state else None
        tracker = _reattach(config, resumed_run) if resumed_run else open_tracker(config, stage, parent_run_id)
        checkpoints.extra_state["mlflow_run_id"] = tracker.run_id
    # The tracker ends its run FINISHED, FAILED (with the error) or KILLED (interrupt).
    with tracker if tracker is not None else nullcontext():
        result = execute_stage(config, stage, data, strategy, tracker, out, checkpoints=checkpoints)
        publish_stage(config, stage, result, tracker, out)
    store.clear()
    if config.scaling.storage:
        from panacea_platform.storage import Storage

        uploaded = Storage.at(config.scaling.storage).upload(config.run_dir(), f"runs/{config.run_name}")
        out(f"[{stage}] run folder copied to {uploaded.uri}")
    return result


def _local_checkpoints(config: RunConfig, stage: str, strategy: Any, store: LocalCheckpoints) -> Checkpoints:
    """Checkpoints for a stage in this process; refuses a latest checkpoint this run cannot continue from."""
    return Checkpoints(
        config.scaling.checkpoint_every,
        run_identity(config, stage),
        stage,
        strategy,
        store,
        source=store.latest(),
        settings=run_settings(config),
    )


def _reattach(config: RunConfig, run_id: str) -> Tracker:
    tracker = Tracker.attach(config.tracking.tracking_uri or default_tracking_uri(config.output_dir), run_id)
    tracker.client.update_run(run_id, status="RUNNING")
    return tracker


# -- a stage on one rank: setup -> train -> finalise ------------------------------------------------


@dataclass
class _Stage:
    """What setup builds and train and finalise use."""

    label: str
    stage: str
    optim: Any
    steps: int
    defence: Defence
    model: Any  # the Hugging Face causal LM (PEFT-wrapped) the strategy loaded
    weights: TrainableWeights
    stream: BatchStream
    extra_streams: dict[str, BatchStream]  # the streams the defence needs at this stage, by name
    eval_task: list[dict]
    eval_harmful: list[dict]
    pad: int
    start: int
    rows: list[dict[str, Any]]  # history.jsonl lines (step, metrics, lr) of the steps done
    last_step_metrics: dict[str, float] = field(default_factory=dict)  # what the last step logged
    probe: tuple[list[list[int]], tuple[int, ...]] | None = None  # held-out first-token probe (prompts, end ids)
    progress: Progress | None = None  # set when training starts


def execute_stage(
    config: RunConfig,
    stage: str,
    data: StageData,
    strategy: Any,
    tracker: Tracker | None,
    out: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    checkpoints: Checkpoints | None = None,
    record_params: bool = True,
) -> StageResult:
    """The stage on one rank of any strategy; only rank 0 writes files and logs metrics to MLflow.

    `checkpoints` saves a checkpoint every so many steps and, when it holds one to resume from,
    restores it before the first step. `record_params=False` leaves the run's params and config to
    its opener (the Ray driver, whose config names the run folder as the user does, not a node's scratch).
    """
    rank0 = strategy.rank == 0
    if not rank0:
        out, tracker = _silent, None
    resuming = checkpoints is not None and checkpoints.resume_step is not None
    _open_run_folder(config, stage, data.fingerprints, tracker if record_params and not resuming else None, rank0)
    setup = setup_stage(config, stage, data, strategy, checkpoints, out)
    history = train_stage(setup, config, strategy, tracker, out, on_step, checkpoints)
    return finalise_stage(setup, config, strategy, history, tracker, out)


def _open_run_folder(
    config: RunConfig, stage: str, fingerprints: dict[str, str], tracker: Tracker | None, rank0: bool
) -> None:
    if not rank0:
        return
    if tracker is not None:
        record_run(config, stage, fingerprints, tracker)
    else:  # a resumed attempt logs into the run the first attempt opened, whose params are there
        config.run_dir().mkdir(parents=True, exist_ok=True)
        save_config(config, config.run_dir() / "config.yaml")


def record_run(config: RunConfig, stage: str, fingerprints: dict[str, str], tracker: Tracker) -> None:
    """The run's params (config, stage, data fingerprints, package versions) and its config.yaml."""
    tracker.log_params(
        {**config.flat(), "stage": stage, **{f"data.fingerprint.{k}": v for k, v in fingerprints.items()}}
    )
    tracker.log_params(package_versions())
    if stage == "finetune":
        tracker.set_tags({"fine_tuning_convention": describe_convention(config)})
    tracker.describe(training_note(config, stage))
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "config.yaml")


def setup_stage(
    config: RunConfig,
    stage: str,
    data: StageData,
    strategy: Any,
    checkpoints: Checkpoints | None,
    out: Callable[[str], None],
) -> _Stage:
    """Tokenised streams, the model, its optimiser and TrainableWeights, restored from a checkpoint if any."""
    optim = config.optim if stage == "finetune" else config.align_optim
    tokenizer = load_tokenizer(config.model)
    template, max_len = config.data.prompt_template, config.data.max_length

    def tokenize(examples: list[Example]) -> list[Any]:
        return [tokenize_example(tokenizer, template, e, max_len) for e in examples]

    pad = tokenizer.pad_token_id
    stream = BatchStream(tokenize(data.train), optim.batch_size, config.seed, pad)
    steps = total_steps(optim, stream.steps_per_epoch)
    defence = stage_defence(config, stage)
    defence.begin(steps)
    harmful_batch = defence.harmful_batch_size(optim)
    sources = {"harmful": (data.defender_harmful, harmful_batch, 1), "alignment": (data.alignment, optim.batch_size, 2)}
    extra_streams = {
        name: BatchStream(tokenize(sources[name][0]), sources[name][1], config.seed + sources[name][2], pad)
        for name in defence.needs_at(stage)
    }
    if "calibration" in defence.needs_at(POST_FINETUNE):
        calibration = tokenize(data.calibration)
        defence.calibrate(
            [
                collate(calibration[i : i + optim.harmful_batch_size], pad)
                for i in range(0, len(calibration), optim.harmful_batch_size)
            ]
        )
    seed_everything(config.seed)
    model = strategy.load_model(config)
    model.train()
    weights = strategy.prepare(model, optim, steps, training_loss(config))
    start, rows = 0, []
    restored = checkpoints.restore(weights, defence) if checkpoints is not None else None
    if restored is not None:
        start, rows = restored[0], [dict(row) for row in restored[1]]
        if start > steps:
            raise ValueError(f"the checkpoint is at step {start} but this stage has only {steps} steps")
    label = f"{stage} {defence.name}" if stage == "finetune" or defence.acts_at(ALIGN) else stage
    trainable = sum(shape.numel() for shape in weights.weight_shapes())
    if console.bars():  # the line above the bar; in lines mode the stage's one line is its "done" line
        out(
            f"[{label}] {len(data.train)} training samples, {steps} steps of batch {optim.batch_size} "
            f"{strategy.describe()}, {trainable:,} trainable weights"
        )
    # Held-out sets are tokenised once; periodic evaluation (optim.eval_every) reuses them.
    return _Stage(
        label,
        stage,
        optim,
        steps,
        defence,
        model,
        weights,
        stream,
        extra_streams,
        tokenize(data.eval_task),
        tokenize(data.eval_harmful),
        pad,
        start,
        rows,
        probe=_heldout_probe(config, tokenizer, optim),
    )


def _heldout_probe(config: RunConfig, tokenizer: Any, optim: Any) -> tuple[list[list[int]], tuple[int, ...]] | None:
    """The training-time first-token probe (held-out open requests, end ids), where eval_every asks for
    held-out signals and the model has an end token to read."""
    from panacea_platform.evaluation.first_token import heldout_probe_rows
    from panacea_platform.models import end_token_ids

    if not optim.eval_every or not config.evaluation.first_token_probe:
        return None
    try:
        ends = end_token_ids(tokenizer, "evaluation.first_token_probe")
    except ValueError:
        return None  # tokenize_example already needs an EOS: unreachable for a model that trains
    return heldout_probe_rows(tokenizer, config.data.prompt_template), ends


def train_stage(
    s: _Stage,
    config: RunConfig,
    strategy: Any,
    tracker: Tracker | None,
    out: Callable[[str], None],
    on_step: Callable[[int, dict[str, float]], None],
    checkpoints: Checkpoints | None,
) -> list[dict]:
    """The steps after the restored one: history.jsonl, MLflow metrics, progress, checkpoints."""
    run_dir, optim, steps, start = config.run_dir(), s.optim, s.steps, s.start
    progress = s.progress = Progress(s.label, steps, start, out=out)
    history_file = (run_dir / "history.jsonl").open("w") if strategy.rank == 0 else None
    if start:
        out(f"[{s.label}] resumed from the checkpoint at step {start}/{steps}")
        if history_file is not None:
            # The steps before the checkpoint, from the checkpoint: rows the failed
            # attempt wrote after it are dropped, so every step appears once.
            history_file.writelines(json.dumps(row) + "\n" for row in s.rows)
            history_file.flush()
    # After a restart (from a checkpoint or from scratch), steps a failed attempt
    # already logged are not logged twice: the restarted run recomputes them the same.
    logged_through = last_logged_step(tracker) if tracker is not None and checkpoints is not None else 0
    scheduler_lr = _lr_reader(s.weights)

    def step_done(step: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "lr": scheduler_lr()}
        if optim.eval_every and step % optim.eval_every == 0:
            metrics.update(
                heldout_signals(
                    s.model,
                    s.weights,
                    s.defence,
                    s.eval_task,
                    s.eval_harmful,
                    optim.batch_size,
                    s.pad,
                    strategy,
                    s.probe,
                )
            )
        if history_file is not None:
            history_file.write(json.dumps({"step": step, **metrics}) + "\n")
            history_file.flush()
        if tracker is not None and step > logged_through and (step % optim.log_every == 0 or step == steps):
            tracker.log_metrics(metrics, step)
        if step == steps:
            s.last_step_metrics = metrics
        progress.update(step, metrics)
        on_step(step, metrics)
        if checkpoints is not None:
            s.rows.append({"step": step, **metrics})
            checkpoints.after_step(step, s.rows, metrics, s.weights, s.defence)

    # A resumed run draws what an uninterrupted one draws after `start` steps (one harmful batch a step).
    batches = s.stream.iter_from(start)
    extra = {name: stream.iter_from(start) for name, stream in s.extra_streams.items()}
    try:
        # 0 steps (optim.max_steps = 0): model.adapter is released as it is, plus the defence's perturbation.
        history = (
            train_steps(s.weights, s.defence, batches, extra, steps, step_done, start_step=start, stage=s.stage)
            if steps
            else []
        )
    finally:
        if history_file is not None:
            history_file.close()
    if start:
        history = [{k: v for k, v in row.items() if k not in ("step", "lr")} for row in s.rows[:start]] + history
    return history


def _lr_reader(weights: Any) -> Callable[[], float]:
    scheduler: Any = getattr(weights, "scheduler", None) or getattr(
        getattr(weights, "engine", None), "lr_scheduler", None
    )
    return lambda: scheduler.get_last_lr()[0]


def finalise_stage(
    s: _Stage,
    config: RunConfig,
    strategy: Any,
    history: list[dict],
    tracker: Tracker | None,
    out: Callable[[str], None],
) -> StageResult:
    """The last collectives: held-out losses (each rank its shard), w_T and eps saved, w_T + eps released."""
    run_dir, rank0, batch = config.run_dir(), strategy.rank == 0, s.optim.batch_size

    def score(features: list[dict]) -> float:
        return mean_loss(s.model, features, batch, s.pad, strategy)

    summary: dict[str, float] = {
        **({"final_task_loss": history[-1]["task_loss"]} if history else {}),
        "heldout_harmful_loss": score(s.eval_harmful),
        "heldout_task_loss": score(s.eval_task),
    }

    def save_adapter(path: Path) -> None:
        with strategy.full_weights(s.weights):
            if rank0:
                s.model.save_pretrained(path)

    perturbation = s.defence.final_perturbation(s.weights)
    unperturbed_dir = perturbation_path = None
    if perturbation is not None:
        unperturbed_dir, perturbation_path = run_dir / "adapter_unperturbed", run_dir / PERTURBATION_FILE
        save_adapter(unperturbed_dir)
        if rank0:
            save_perturbation(s.model, perturbation, perturbation_path)
        # The released model is w_T + eps_T.
        s.weights.add_to_weights(perturbation)
        summary["perturbation_norm"] = global_norm(perturbation).item()
        summary["released_heldout_harmful_loss"] = score(s.eval_harmful)
        summary["released_heldout_task_loss"] = score(s.eval_task)
    else:
        # Nothing is added after training: the released model is w_T itself.
        summary["released_heldout_harmful_loss"] = summary["heldout_harmful_loss"]
        summary["released_heldout_task_loss"] = summary["heldout_task_loss"]
    adapter_dir = run_dir / "adapter"
    save_adapter(adapter_dir)
    if rank0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if s.stage == ALIGN:
            write_alignment_provenance(run_dir, s.defence.name, s.defence.settings())
        took = f" ({s.progress.describe()})" if s.progress is not None else ""
        out(f"[{s.label}] done{took}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    if tracker is not None:
        # Held-out losses measured at the last step (optim.eval_every) are these same values: logged once.
        tracker.log_metrics({k: v for k, v in summary.items() if k not in s.last_step_metrics}, s.steps)
    return StageResult(
        run_dir,
        adapter_dir,
        unperturbed_dir,
        perturbation_path,
        summary,
        history,
        tracker.run_id if tracker is not None else None,
    )
