"""Distributed training: the single-process stage on N Ray Train workers under DeepSpeed ZeRO.

`run_distributed` launches a Ray Train (V2) `TorchTrainer`; each worker runs
`train_on_rank`, which is `loop._run_stage` with the model wrapped in a
DeepSpeed engine and `DeepSpeedWeights` in place of `TorchWeights`:

- every rank builds the same data, streams and seeds, so every rank holds the
  same *global* batch; DeepSpeedWeights takes this rank's share of it and
  makes the engine's gradient average equal to the global-batch gradient;
- the defence step (algorithms/) is the one the single-process loop runs,
  untouched, through `train_steps`;
- rank 0 writes what `run_stage` writes (config.yaml, history.jsonl,
  adapter_unperturbed/, perturbation.safetensors, adapter/, summary.json),
  gathering the full LoRA weights under ZeRO-3 so no adapter is saved empty,
  plus distributed.json (world size and ZeRO stage: a run cannot be resumed
  with a different world size), and reports the folder to Ray Train as the
  final checkpoint.

Ray and DeepSpeed are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from panacea_platform.config import RunConfig, config_from_dict, save_config
from panacea_platform.training.deepspeed_backend import DeepSpeedConfigError, DeepSpeedWeights, deepspeed_config

DISTRIBUTED_FILE = "distributed.json"
CPU_BACKEND = "gloo"


@dataclass
class DistributedResult:
    run_dir: Path
    adapter_dir: Path
    unperturbed_adapter_dir: Path | None
    perturbation_path: Path | None
    summary: dict[str, float]
    history: list[dict[str, float]]
    num_workers: int
    zero_stage: int
    checkpoint_path: str | None = None
    metrics: dict[str, Any] | None = field(default=None)


def _as_config(config: RunConfig | dict) -> RunConfig:
    return config if isinstance(config, RunConfig) else config_from_dict(config)


def check_distributed(
    config: RunConfig, stage: str, num_workers: int, zero_stage: int, micro_batch_size: int | None = None,
    zero_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate before any worker starts; returns the DeepSpeed config the workers will use."""
    from panacea_platform.training.loop import STAGES

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    optim = config.optim if stage == "finetune" else config.align_optim
    return deepspeed_config(
        optim, num_workers, zero_stage, dtype=config.model.dtype, micro_batch_size=micro_batch_size,
        zero_options=zero_options,
    )


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory comm op (about 50 s on 2 cores).

    That op only serves DeepSpeed-inference's all-reduce; training collectives go
    through torch.distributed (gloo). DeepSpeed caches its op-compatibility table
    in `deepspeed.ops.__compatible_ops__` and reads it before building the op.
    Set PANACEA_DS_BUILD_SHM_COMM=1 to build it anyway (cached in TORCH_EXTENSIONS_DIR).
    """
    if os.environ.get("PANACEA_DS_BUILD_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _save_adapter(model, weights: DeepSpeedWeights, path: Path, rank: int) -> None:
    """Save the LoRA adapter on rank 0; under ZeRO-3 the full weights are gathered first (on every rank)."""
    with weights.full_weights():
        if rank == 0:
            model.save_pretrained(path)


def train_on_rank(
    config: RunConfig | dict,
    stage: str,
    zero_stage: int,
    rank: int,
    world_size: int,
    *,
    micro_batch_size: int | None = None,
    zero_options: dict[str, Any] | None = None,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    out: Callable[[str], None] = print,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """One rank's share of a distributed stage; needs torch.distributed set up when world_size > 1.

    Mirrors loop._run_stage step for step (same seeds, same data, same defence)
    so the result equals the single-process run's up to float rounding.
    Returns (summary, history); files are written by rank 0 under config.run_dir().
    """
    import deepspeed

    from panacea_platform.algorithms import build_defence
    from panacea_platform.algorithms.interface import global_norm
    from panacea_platform.data.collate import BatchStream, tokenize_example
    from panacea_platform.models import PERTURBATION_FILE, attach_lora, load_base_model, load_tokenizer, save_perturbation
    from panacea_platform.training.loop import (
        DEFENCE_FOR_ALIGNMENT,
        Progress,
        lm_loss,
        make_optimizer,
        mean_loss,
        prepare_data,
        seed_everything,
        total_steps,
        train_steps,
    )

    config = _as_config(config)
    optim = config.optim if stage == "finetune" else config.align_optim
    ds_config = check_distributed(config, stage, world_size, zero_stage, micro_batch_size, zero_options)
    run_dir = config.run_dir()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        (run_dir / DISTRIBUTED_FILE).write_text(
            json.dumps({"num_workers": world_size, "zero_stage": zero_stage, "deepspeed_config": ds_config}, indent=2)
        )

    skip_shm_comm_build()
    # Joins the process group the launcher made (Ray Train: gloo); creates none of its own.
    deepspeed.init_distributed(dist_backend=CPU_BACKEND)

    # Data: identical on every rank (same seeds), as in loop._run_stage.
    seed_everything(config.seed)
    data = prepare_data(config, stage)
    tokenizer = load_tokenizer(config.model)
    template, max_len = config.data.prompt_template, config.data.max_length

    def tokenize(examples):
        return [tokenize_example(tokenizer, template, e, max_len) for e in examples]

    pad = tokenizer.pad_token_id
    stream = BatchStream(tokenize(data.train), optim.batch_size, config.seed, pad)
    steps = total_steps(optim, stream.steps_per_epoch)
    defence = build_defence(config) if stage == "finetune" else DEFENCE_FOR_ALIGNMENT
    harmful_stream = None
    if defence.uses_harmful_batches:
        harmful_stream = iter(BatchStream(tokenize(data.defender_harmful), optim.harmful_batch_size, config.seed + 1, pad))

    # Model: under ZeRO-3, HfDeepSpeedConfig must exist before from_pretrained, so
    # that every worker loads its partition only (not the whole model).
    hf_ds_config = None
    if zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (held: transformers keeps a weak reference)
    engine = None
    try:
        seed_everything(config.seed)
        model = attach_lora(load_base_model(config.model), config.lora, config.model.adapter)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(params, optim, steps)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        weights = DeepSpeedWeights(engine, lm_loss)

        label = f"{stage} {defence.name}" if stage == "finetune" else stage
        if rank == 0:
            out(f"[{label}] {len(data.train)} training samples, {steps} steps of global batch {optim.batch_size} "
                f"on {world_size} workers (ZeRO-{zero_stage}), "
                f"{sum(torch.Size(getattr(p, 'ds_shape', p.shape)).numel() for p in params):,} trainable weights")
        progress = Progress(label, steps, every=optim.log_every, out=out if rank == 0 else (lambda line: None))
        history_file = (run_dir / "history.jsonl").open("w") if rank == 0 else None

        def step_done(step: int, metrics: dict[str, float]) -> None:
            metrics = {**metrics, "lr": scheduler.get_last_lr()[0]}
            if history_file is not None:
                history_file.write(json.dumps({"step": step, **metrics}) + "\n")
                history_file.flush()
            progress.update(step, metrics)
            on_step(step, metrics)

        try:
            history = train_steps(weights, defence, iter(stream), harmful_stream, steps, step_done)
        finally:
            if history_file is not None:
                history_file.close()

        # Held-out losses: forward passes on every rank (under ZeRO-3 each is collective).
        module = engine.module
        eval_harmful, eval_task = tokenize(data.eval_harmful), tokenize(data.eval_task)
        batch = optim.batch_size
        summary: dict[str, float] = {
            "final_task_loss": history[-1]["task_loss"],
            "heldout_harmful_loss": mean_loss(module, eval_harmful, batch, pad),
            "heldout_task_loss": mean_loss(module, eval_task, batch, pad),
        }
        perturbation = defence.final_perturbation(weights)
        if perturbation is not None:
            _save_adapter(module, weights, run_dir / "adapter_unperturbed", rank)
            if rank == 0:
                # eps is full on every rank (it is built from full gradients).
                save_perturbation(module, perturbation, run_dir / PERTURBATION_FILE)
            weights.add_to_weights(perturbation)
            summary["perturbation_norm"] = global_norm(perturbation).item()
            summary["released_heldout_harmful_loss"] = mean_loss(module, eval_harmful, batch, pad)
            summary["released_heldout_task_loss"] = mean_loss(module, eval_task, batch, pad)
        else:
            summary["released_heldout_harmful_loss"] = summary["heldout_harmful_loss"]
            summary["released_heldout_task_loss"] = summary["heldout_task_loss"]
        _save_adapter(module, weights, run_dir / "adapter", rank)
        if rank == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            out(f"[{label}] done: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        return summary, history
    finally:
        if engine is not None:
            engine.destroy()
        if hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (train_loop_per_worker) that run_distributed launches."""
    import ray.train

    # CPU workers over gloo by design (even on a node with GPUs): pick DeepSpeed's
    # CPU accelerator before DeepSpeed is first imported in this process.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config = config_from_dict(loop_config["config"])
    optim = config.optim if loop_config["stage"] == "finetune" else config.align_optim
    report_every = loop_config.get("report_every") or optim.log_every
    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % report_every == 0:
            # A barrier: every rank reports the same number of times; rank 0's metrics are kept.
            ray.train.report({"step": step, **metrics})

    summary, history = train_on_rank(
        config,
        loop_config["stage"],
        loop_config["zero_stage"],
        rank,
        world_size,
        micro_batch_size=loop_config.get("micro_batch_size"),
        zero_options=loop_config.get("zero_options"),
        on_step=on_step,
        out=print,
    )
    final = {"step": len(history), "done": True, **summary}
    if rank == 0:
        # The run folder is the final checkpoint: Ray copies it to storage_path (on a
        # cluster, rank 0's local folder is not the driver's), and Result.metrics is
        # only set when a checkpoint comes with the metrics.
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(config.run_dir())))
    else:
        ray.train.report(final)


def run_distributed(
    config: RunConfig | dict,
    stage: str = "finetune",
    num_workers: int = 2,
    zero_stage: int = 2,
    storage_path: str | Path | None = None,
    *,
    micro_batch_size: int | None = None,
    zero_options: dict[str, Any] | None = None,
    cpus_per_worker: float = 1,
    report_every: int | None = None,
    out: Callable[[str], None] = print,
) -> DistributedResult:
    """Train one stage on `num_workers` Ray Train workers under DeepSpeed ZeRO-`zero_stage`.

    The global batch is optim.batch_size (align_optim for stage 'align'),
    split evenly over the workers. Ray must be initialised (or is started with
    defaults). Artifacts land in config.run_dir() as with run_stage; Ray's own
    run records and the final checkpoint go to `storage_path` (default:
    <output_dir>/ray). MLflow tracking is not wired in yet.
    """
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = _as_config(config)
    # Fails here, before any worker starts, on a bad batch split or ZeRO stage.
    check_distributed(config, stage, num_workers, zero_stage, micro_batch_size, zero_options)
    storage = Path(storage_path) if storage_path is not None else Path(config.output_dir) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "stage": stage,
            "zero_stage": zero_stage,
            "micro_batch_size": micro_batch_size,
            "zero_options": zero_options,
            "report_every": report_every,
        },
        torch_config=TorchConfig(backend=CPU_BACKEND),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RayRunConfig(
            name=f"{config.run_name}-{stage}-zero{zero_stage}-{int(time.time() * 1000)}",
            storage_path=str(storage.resolve()),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    run_dir = config.run_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    unperturbed = run_dir / "adapter_unperturbed"
    from panacea_platform.models import PERTURBATION_FILE

    eps = run_dir / PERTURBATION_FILE
    out(f"[distributed] {stage} on {num_workers} workers (ZeRO-{zero_stage}) took {time.monotonic() - start:.0f}s")
    return DistributedResult(
        run_dir=run_dir,
        adapter_dir=run_dir / "adapter",
        unperturbed_adapter_dir=unperturbed if unperturbed.is_dir() else None,
        perturbation_path=eps if eps.is_file() else None,
        summary=summary,
        history=history,
        num_workers=num_workers,
        zero_stage=zero_stage,
        checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
        metrics=result.metrics,
    )


__all__ = [
    "DISTRIBUTED_FILE",
    "DeepSpeedConfigError",
    "DistributedResult",
    "check_distributed",
    "run_distributed",
    "skip_shm_comm_build",
    "train_on_rank",
    "train_worker",
]
