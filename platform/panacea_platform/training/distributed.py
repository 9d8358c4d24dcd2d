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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from panacea_platform.config import RunConfig, config_from_dict
from panacea_platform.tracking import default_tracking_uri
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
    mlflow_run_id: str | None = None


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


class DeepSpeedBackend:
    """The distributed counterpart of loop.LocalBackend: model and weights on a DeepSpeed engine."""

    def __init__(self, ds_config: dict[str, Any], zero_stage: int, rank: int) -> None:
        self.ds_config = ds_config
        self.zero_stage = zero_stage
        self.rank = rank
        self.engine = None
        self._hf_ds_config = None

    def load_model(self, config: RunConfig) -> torch.nn.Module:
        from panacea_platform.models import attach_lora, load_base_model

        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Must exist before from_pretrained: each worker then loads only its
            # partition, never the whole model (transformers keeps a weak reference).
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return attach_lora(load_base_model(config.model), config.lora, config.model.adapter)

    def wrap(self, model, optimizer, scheduler, optim) -> DeepSpeedWeights:
        import deepspeed

        from panacea_platform.training.loop import lm_loss

        # Clipping is the engine's (gradient_clipping in ds_config, from optim.max_grad_norm).
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        return DeepSpeedWeights(self.engine, lm_loss)

    def full_weights(self, weights: DeepSpeedWeights):
        # Under ZeRO-3 every rank joins the gather; rank 0 then saves whole tensors, never an empty adapter.
        return weights.full_weights()

    def describe(self) -> str:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return f"over {world} workers (ZeRO-{self.zero_stage})"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


def train_on_rank(
    config: RunConfig | dict,
    stage: str,
    zero_stage: int,
    rank: int,
    world_size: int,
    *,
    micro_batch_size: int | None = None,
    zero_options: dict[str, Any] | None = None,
    mlflow_run_id: str | None = None,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    out: Callable[[str], None] = print,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """One rank's share of a distributed stage; needs torch.distributed set up when world_size > 1.

    The stage body is loop.execute_stage, as in one process, with DeepSpeedBackend:
    same seeds, same data, same defence, so the result equals the single-process
    run's up to float rounding. Rank 0 writes the files under config.run_dir()
    and logs to the MLflow run `mlflow_run_id` (opened and ended by the driver).
    Returns (summary, history).
    """
    import deepspeed

    from panacea_platform.training.loop import execute_stage, prepare_data
    from panacea_platform.tracking import Tracker

    config = _as_config(config)
    ds_config = check_distributed(config, stage, world_size, zero_stage, micro_batch_size, zero_options)
    if rank == 0:
        config.run_dir().mkdir(parents=True, exist_ok=True)
        (config.run_dir() / DISTRIBUTED_FILE).write_text(
            json.dumps({"num_workers": world_size, "zero_stage": zero_stage, "deepspeed_config": ds_config}, indent=2)
        )
    skip_shm_comm_build()
    # Joins the process group the launcher made (Ray Train: gloo); creates none of its own.
    deepspeed.init_distributed(dist_backend=CPU_BACKEND)
    data = prepare_data(config, stage)
    tracker = None
    if rank == 0 and mlflow_run_id is not None:
        tracker = Tracker.attach(config.tracking.tracking_uri or default_tracking_uri(config.output_dir), mlflow_run_id)
    backend = DeepSpeedBackend(ds_config, zero_stage, rank)
    try:
        result = execute_stage(config, stage, data, backend, tracker, out, on_step)
    finally:
        backend.close()
    return result.summary, result.history


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
        mlflow_run_id=loop_config.get("mlflow_run_id"),
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
    parent_run_id: str | None = None,
    track: bool = True,
    out: Callable[[str], None] = print,
) -> DistributedResult:
    """Train one stage on `num_workers` Ray Train workers under DeepSpeed ZeRO-`zero_stage`.

    The global batch is optim.batch_size (align_optim for stage 'align'),
    split evenly over the workers. Ray must be initialised (or is started with
    defaults). Artifacts land in config.run_dir() as with run_stage; Ray's own
    run records and the final checkpoint go to `storage_path` (default:
    <output_dir>/ray). The driver opens the MLflow run and ends it with its true
    status; rank 0 alone logs into it.
    """
    from panacea_platform.training.loop import open_tracker, prepare_data

    config = _as_config(config)
    # Fails here, before any worker starts, on a bad batch split or ZeRO stage, or bad data.
    check_distributed(config, stage, num_workers, zero_stage, micro_batch_size, zero_options)
    prepare_data(config, stage)
    ensure_ray()
    storage = Path(storage_path) if storage_path is not None else Path(config.output_dir) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    tracker = open_tracker(config, stage, parent_run_id) if track else None
    with tracker if tracker is not None else nullcontext():
        if tracker is not None:
            tracker.set_tags({"num_workers": str(num_workers), "zero_stage": str(zero_stage)})
        return _fit(config, stage, num_workers, zero_stage, storage, micro_batch_size, zero_options,
                    cpus_per_worker, report_every, tracker.run_id if tracker is not None else None, out)


def ensure_ray() -> None:
    """Start an embedded Ray unless one is running or RAY_ADDRESS points at a cluster."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train's controller polls every 2 s by default and each report waits for it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def _fit(config, stage, num_workers, zero_stage, storage, micro_batch_size, zero_options, cpus_per_worker,
         report_every, mlflow_run_id, out) -> DistributedResult:
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
            "mlflow_run_id": mlflow_run_id,
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
        mlflow_run_id=mlflow_run_id,
    )


__all__ = [
    "DISTRIBUTED_FILE",
    "DeepSpeedConfigError",
    "DistributedResult",
    "check_distributed",
    "ensure_ray",
    "run_distributed",
    "skip_shm_comm_build",
    "train_on_rank",
    "train_worker",
]
