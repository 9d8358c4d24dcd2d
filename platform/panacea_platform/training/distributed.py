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

Checkpoints and failures (RayCheckpoints): every `checkpoint_every` steps
every rank saves its DeepSpeed checkpoint (module, optimiser and lr-scheduler
state; under ZeRO each rank writes its own shard files) and its RNG state into
a local temporary folder, rank 0 adds the training state (step, history rows,
the defence's last eps, world size, ZeRO stage), and every rank reports its
folder with `ray.train.report`: Ray Train merges them into one checkpoint folder
in storage and keeps the last `keep_checkpoints`. When a worker dies, Ray Train
(FailureConfig(max_failures)) restarts the worker group; each rank then finds
the latest checkpoint with `ray.train.get_checkpoint()`, loads its shard,
fast-forwards the batch streams and carries on, and rank 0 rewrites
history.jsonl from the checkpoint's rows before appending. A checkpoint written
by another world size or ZeRO stage is refused (check_resume).

Ray and DeepSpeed are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from panacea_platform.config import RunConfig, config_from_dict, with_changes
from panacea_platform.tracking import default_tracking_uri
from panacea_platform.training.loop import StageResult
from panacea_platform.training.deepspeed_backend import (
    DeepSpeedConfigError,
    DeepSpeedWeights,
    deepspeed_config,
    user_deepspeed_config,
)

DISTRIBUTED_FILE = "distributed.json"
CPU_BACKEND = "gloo"
GPU_BACKEND = "nccl"


def comm_backend(config: RunConfig) -> str:
    return GPU_BACKEND if config.scaling.use_gpu else CPU_BACKEND

# What a training checkpoint folder holds (one folder, merged by Ray Train from every rank's files).
STATE_FILE = "panacea_state.json"  # rank 0: step, world size, ZeRO stage, history rows, ...
EPS_FILE = "panacea_eps.safetensors"  # rank 0: the defence's last eps, when it has one
DEEPSPEED_DIR = "deepspeed"  # engine.save_checkpoint: <tag>/mp_rank_00_model_states.pt, zero_pp_rank_<r>_*...
RNG_FILE = "rng_rank{rank}.pt"  # every rank: torch and Python RNG states
CHECKPOINT_FORMAT = 1


@dataclass
class DistributedResult(StageResult):
    """What run_stage returns, plus what the distributed run adds."""

    num_workers: int = 1
    zero_stage: int = 0
    checkpoint_path: str | None = None
    metrics: dict[str, Any] | None = None
    resumed_from_step: int | None = None
    kept_checkpoints: list[str] = field(default_factory=list)


def for_workers(config: RunConfig) -> RunConfig:
    """The config with every local path absolute and the tracking store named.

    Ray Train workers run in another working directory: a relative output
    folder, adapter or data file (and the SQLite store beside the runs) would
    point somewhere else there.
    """
    changes: dict[str, Any] = {"output_dir": str(Path(config.output_dir).resolve())}
    if config.tracking.tracking_uri is None:
        changes["tracking.tracking_uri"] = default_tracking_uri(config.output_dir)
    for key, value in (("model.name", config.model.name), ("model.adapter", config.model.adapter),
                       ("data.task_file", config.data.task_file), ("data.harmful_file", config.data.harmful_file),
                       ("scaling.deepspeed_json", config.scaling.deepspeed_json)):
        if value is not None and Path(value).expanduser().exists():
            changes[key] = str(Path(value).expanduser().resolve())
    return with_changes(config, changes)


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
    if config.scaling.deepspeed_json is not None:
        return user_deepspeed_config(config.scaling.deepspeed_json, optim, num_workers, zero_stage, dtype=config.model.dtype)
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
        self.local_weight_fraction = 1.0

    def load_model(self, config: RunConfig) -> torch.nn.Module:
        from panacea_platform.models import attach_lora, load_base_model

        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Must exist before from_pretrained: each worker then loads only its
            # partition, never the whole model (transformers keeps a weak reference).
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = attach_lora(load_base_model(config.model), config.lora, config.model.adapter)
        # The share of all weights (frozen ones included) this worker holds: about
        # 1 / num_workers under ZeRO-3, 1 otherwise. Recorded in distributed.json.
        full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.local_weight_fraction = sum(p.numel() for p in model.parameters()) / full
        return model

    def wrap(self, model, optimizer, scheduler, optim, loss_fn=None) -> DeepSpeedWeights:
        import deepspeed

        from panacea_platform.training.loop import lm_loss

        # Clipping is the engine's (gradient_clipping in ds_config, from optim.max_grad_norm).
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        return DeepSpeedWeights(self.engine, loss_fn or lm_loss)

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


class CheckpointMismatchError(ValueError):
    """A checkpoint that this run cannot resume from; the message names what differs."""


def check_resume(state: dict[str, Any], world_size: int, zero_stage: int, stage: str | None = None,
                 where: str = "the checkpoint") -> None:
    """Refuse to resume from a checkpoint written by another world size, ZeRO stage or stage.

    DeepSpeed's optimiser state is sharded per rank: a checkpoint written by N
    ranks cannot be loaded by M != N ranks (nor under another ZeRO stage).
    """
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{where} has checkpoint format {state.get('format')!r}; this version reads format {CHECKPOINT_FORMAT}"
        )
    saved_world, saved_zero = int(state["world_size"]), int(state["zero_stage"])
    if saved_world != world_size or saved_zero != zero_stage:
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it was written by {saved_world} workers under ZeRO-{saved_zero}, "
            f"but this run has {world_size} workers under ZeRO-{zero_stage}. DeepSpeed's optimizer state is "
            f"sharded per rank, so a run resumes only with the world size and ZeRO stage that wrote it: use "
            f"num_workers={saved_world} and zero_stage={saved_zero}, or start a new run without the checkpoint"
        )
    if stage is not None and state.get("stage") != stage:
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it is a checkpoint of stage {state.get('stage')!r}, not {stage!r}"
        )


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The training state (STATE_FILE) of a checkpoint folder; a clear error when it is not one."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointMismatchError(
            f"{directory} has no {STATE_FILE}: it is not a training checkpoint (the final checkpoint of a "
            "finished run holds the run folder, which cannot be resumed)"
        )
    return json.loads(path.read_text())


class RayCheckpoints:
    """Periodic checkpoints of a distributed stage through Ray Train, and resuming from the latest.

    The `checkpoints` hook of loop.execute_stage. Build it on every rank before
    the model (a mismatched checkpoint is refused before any loading); `checkpoint`
    is the Ray Checkpoint to resume from (ray.train.get_checkpoint()) or None.
    `every` = 0 or None saves nothing (a given checkpoint is still resumed).
    """

    def __init__(self, every: int | None, rank: int, world_size: int, zero_stage: int, stage: str,
                 checkpoint: Any | None = None, report: Callable[..., None] | None = None) -> None:
        self.every = int(every or 0)
        self.rank, self.world_size, self.zero_stage, self.stage = rank, world_size, zero_stage, stage
        self._report = report
        self._dir_context = None
        self.directory: Path | None = None
        self.state: dict[str, Any] | None = None
        self.resume_step: int | None = None
        if checkpoint is not None:
            # A local path as it is; on remote storage a download to a temporary folder.
            self._dir_context = checkpoint.as_directory()
            self.directory = Path(self._dir_context.__enter__())
            try:
                self.state = read_checkpoint_state(self.directory)
                check_resume(self.state, world_size, zero_stage, stage, where=f"the checkpoint {self.directory}")
            except Exception:
                self.close()
                raise
            self.resume_step = int(self.state["step"])

    def restore(self, weights: Any, defence: Any) -> tuple[int, list[dict[str, Any]]] | None:
        """Load this rank's shard (module, optimiser, lr scheduler), the defence's eps and the RNG state."""
        if self.state is None:
            return None
        engine = weights.engine
        load_path, _ = engine.load_checkpoint(
            str(self.directory / DEEPSPEED_DIR), tag=self.state["tag"], load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(
                f"DeepSpeed found no checkpoint {self.state['tag']!r} in {self.directory / DEEPSPEED_DIR}"
            )
        scheduler = engine.lr_scheduler
        if scheduler is not None:
            # The step after the checkpoint runs at the restored schedule's lr, whatever
            # the optimiser state carried.
            for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        if self.state.get("has_eps"):
            from safetensors.torch import load_file

            tensors = load_file(str(self.directory / EPS_FILE))
            defence.last_eps = [tensors[str(i)] for i in range(len(tensors))]
        rng = torch.load(self.directory / RNG_FILE.format(rank=self.rank), weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        return self.resume_step, list(self.state["history"])

    def after_step(self, step: int, rows: list[dict[str, Any]], metrics: dict[str, float], weights: Any,
                   defence: Any) -> None:
        """Every `every` steps: save this rank's part of a checkpoint and report it to Ray Train."""
        if not self.every or step % self.every:
            return
        from ray.train import Checkpoint

        report = self._report
        if report is None:
            import ray.train

            report = ray.train.report
        folder = Path(tempfile.mkdtemp(prefix=f"panacea-ckpt-step{step}-rank{self.rank}-"))
        try:
            tag = f"step{step}"
            # DeepSpeed makes the folder on rank 0 only; every rank writes into its own.
            (folder / DEEPSPEED_DIR).mkdir()
            # Frozen base weights are not saved: they are reloaded from the model.
            weights.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=tag, exclude_frozen_parameters=True)
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
                       folder / RNG_FILE.format(rank=self.rank))
            if self.rank == 0:
                eps = getattr(defence, "last_eps", None)
                if eps is not None:
                    from safetensors.torch import save_file

                    save_file({str(i): t.detach().cpu().contiguous().clone() for i, t in enumerate(eps)},
                              str(folder / EPS_FILE))
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "stage": self.stage,
                    "world_size": self.world_size,
                    "zero_stage": self.zero_stage,
                    "tag": tag,
                    "has_eps": eps is not None,
                    "history": rows,
                }
                (folder / STATE_FILE).write_text(json.dumps(state))
            # A barrier: every rank reports; Ray Train merges the folders into one checkpoint.
            report({"step": step, **metrics, "checkpoint_step": step},
                   checkpoint=Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        if self._dir_context is not None:
            self._dir_context.__exit__(None, None, None)
            self._dir_context = None


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
    checkpoints: RayCheckpoints | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """One rank's share of a distributed stage; needs torch.distributed set up when world_size > 1.

    The stage body is loop.execute_stage, as in one process, with DeepSpeedBackend:
    same seeds, same data, same defence, so the result equals the single-process
    run's up to float rounding. Rank 0 writes the files under config.run_dir()
    and logs to the MLflow run `mlflow_run_id` (opened and ended by the driver).
    `checkpoints` saves periodic checkpoints and resumes from one (RayCheckpoints).
    Returns (summary, history).
    """
    import deepspeed

    from panacea_platform.training.loop import execute_stage, prepare_data
    from panacea_platform.tracking import Tracker

    config = _as_config(config)
    ds_config = check_distributed(config, stage, world_size, zero_stage, micro_batch_size, zero_options)
    resumed_from = checkpoints.resume_step if checkpoints is not None else None
    if rank == 0:
        config.run_dir().mkdir(parents=True, exist_ok=True)
        (config.run_dir() / DISTRIBUTED_FILE).write_text(
            json.dumps({
                "num_workers": world_size, "zero_stage": zero_stage, "deepspeed_config": ds_config,
                "checkpoint_every": checkpoints.every if checkpoints is not None else 0,
                "resumed_from_step": resumed_from,
            }, indent=2)
        )
    skip_shm_comm_build()
    # Joins the process group the launcher made (Ray Train: gloo); creates none of its own.
    deepspeed.init_distributed(dist_backend=comm_backend(config))
    data = prepare_data(config, stage)
    tracker = None
    if rank == 0 and mlflow_run_id is not None:
        tracker = Tracker.attach(config.tracking.tracking_uri or default_tracking_uri(config.output_dir), mlflow_run_id)
        if resumed_from is not None:
            tracker.set_tags({"resumed_from_step": str(resumed_from)})
    backend = DeepSpeedBackend(ds_config, zero_stage, rank)
    try:
        result = execute_stage(config, stage, data, backend, tracker, out, on_step, checkpoints)
        if rank == 0:
            record = config.run_dir() / DISTRIBUTED_FILE
            recorded = json.loads(record.read_text())
            recorded["rank0_local_weight_fraction"] = backend.local_weight_fraction
            record.write_text(json.dumps(recorded, indent=2))
    finally:
        backend.close()
        if checkpoints is not None:
            checkpoints.close()
    return result.summary, result.history


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (train_loop_per_worker) that run_distributed launches."""
    import ray.train

    config = config_from_dict(loop_config["config"])
    if not config.scaling.use_gpu:
        # CPU workers over gloo (even on a node with GPUs): pick DeepSpeed's CPU
        # accelerator before DeepSpeed is first imported in this process.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    stage = loop_config["stage"]
    optim = config.optim if stage == "finetune" else config.align_optim
    report_every = loop_config.get("report_every") or optim.log_every
    checkpoint_every = int(loop_config.get("checkpoint_every") or 0)
    # The latest checkpoint of this run (after a restart), else the one run_distributed was asked to resume from.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint.from_directory(loop_config["resume_from"])
    checkpoints = RayCheckpoints(checkpoint_every, rank, world_size, loop_config["zero_stage"], stage, checkpoint)
    crash = loop_config.get("crash")

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % report_every == 0 and not (checkpoint_every and step % checkpoint_every == 0):
            # A barrier: every rank reports the same number of times; rank 0's metrics are kept.
            # (A checkpoint step reports once, with the checkpoint: RayCheckpoints.after_step.)
            ray.train.report({"step": step, **metrics})
        if crash and rank == crash["rank"] and step == crash["after_step"] and not os.path.exists(crash["marker"]):
            # Test-only fault injection: this worker process dies once, as a crashed node would.
            _wait_for_reports_collected()
            Path(crash["marker"]).touch()
            os.kill(os.getpid(), signal.SIGKILL)

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
        checkpoints=checkpoints,
    )
    final = {"step": len(history), "done": True, **summary}
    if rank == 0:
        # The run folder is the final checkpoint: Ray copies it to storage_path (on a
        # cluster, rank 0's local folder is not the driver's), and Result.metrics is
        # only set when a checkpoint comes with the metrics.
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(config.run_dir())))
    else:
        ray.train.report(final)


def _wait_for_reports_collected(settle_s: float = 1.0) -> None:
    """Test-only: return once Ray's controller has collected this worker's reports.

    `ray.train.report` returns once its result is queued, before the controller
    polls it; a worker that dies before the poll after a checkpoint's report loses
    that checkpoint (the restart then resumes from the one before: still correct,
    but not what a test of resuming from a given step wants). Waits on Ray Train
    V2's internal result queue, then `settle_s` more for the other ranks' reports
    of the same round; falls back to a sleep if those internals move.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().execution_context.result_queue.join()
    except Exception:  # noqa: BLE001 - internals of another package; the sleep below still helps
        time.sleep(3 * settle_s)
    time.sleep(settle_s)


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
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = None,
    max_failures: int | None = None,
    resume_from: str | Path | None = None,
    callbacks: list[Any] | None = None,
    mlflow_run_id: str | None = None,
    _crash: dict[str, Any] | None = None,
) -> DistributedResult:
    """Train one stage on `num_workers` Ray Train workers under DeepSpeed ZeRO-`zero_stage`.

    The global batch is optim.batch_size (align_optim for stage 'align'),
    split evenly over the workers. Ray must be initialised (or is started with
    defaults). Artifacts land in config.run_dir() as with run_stage; Ray's own
    run records and the final checkpoint go to `storage_path` (default:
    <output_dir>/ray). The driver opens the MLflow run and ends it with its true
    status; rank 0 alone logs into it.

    Checkpoints and failures (each defaults to config.scaling's field of the same name): every `checkpoint_every` steps (0/None: never) the
    workers save a checkpoint; Ray keeps the last `keep_checkpoints` (None: all;
    the final run-folder checkpoint counts among them). A failed worker restarts
    the worker group from the latest checkpoint, at most `max_failures` times
    (default 1 when checkpointing, else 0; -1: without limit). `resume_from` is a
    checkpoint folder of an earlier run (e.g. one whose driver died) to start
    from; it must come from the same world size and ZeRO stage, and be readable
    at that path by every worker (shared storage on a cluster).
    `callbacks` are Ray Train callbacks (e.g. the Train-to-Tune report callback of
    a sweep's trial). `mlflow_run_id` makes rank 0 log into that existing run
    (a sweep's child run) instead of a run opened here; its owner ends it.
    `_crash` is for tests only: {"rank", "after_step", "marker"} makes that rank's
    process kill itself after that step, once (while the marker file is absent).
    """
    from panacea_platform.training.loop import open_tracker, prepare_data

    config = for_workers(_as_config(config))
    scaling = config.scaling
    if checkpoint_every is None:
        checkpoint_every = scaling.checkpoint_every
    if keep_checkpoints is None:
        keep_checkpoints = scaling.keep_checkpoints
    if max_failures is None:
        max_failures = scaling.max_failures
    checkpoint_every = int(checkpoint_every or 0)
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every = {checkpoint_every}: expected 0 (off) or a positive number of steps")
    if keep_checkpoints is not None and keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints = {keep_checkpoints}: expected at least 1, or None to keep all")
    if max_failures is None:
        max_failures = 1 if checkpoint_every else 0
    if max_failures < -1:
        raise ValueError(f"max_failures = {max_failures}: expected -1 (no limit), 0 or more")
    # Fails here, before any worker starts, on a bad batch split or ZeRO stage, or bad data.
    check_distributed(config, stage, num_workers, zero_stage, micro_batch_size, zero_options)
    if resume_from is not None:
        check_resume(read_checkpoint_state(resume_from), num_workers, zero_stage, stage,
                     where=f"the checkpoint {resume_from}")
    prepare_data(config, stage)
    ensure_ray()
    storage = Path(storage_path) if storage_path is not None else Path(config.output_dir) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    if mlflow_run_id is not None:
        from panacea_platform.tracking import Tracker

        tracker = Tracker.attach(config.tracking.tracking_uri or default_tracking_uri(config.output_dir), mlflow_run_id)
        owned = False
    else:
        tracker = open_tracker(config, stage, parent_run_id) if track else None
        owned = tracker is not None
    with tracker if owned else nullcontext():
        if tracker is not None:
            tracker.set_tags({"num_workers": str(num_workers), "zero_stage": str(zero_stage)})
        return _fit(config, stage, num_workers, zero_stage, storage, micro_batch_size, zero_options,
                    cpus_per_worker, report_every, tracker.run_id if tracker is not None else None, out,
                    checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                    max_failures=max_failures, resume_from=resume_from, crash=_crash, callbacks=callbacks)


def ensure_ray() -> None:
    """Start an embedded Ray unless one is running or RAY_ADDRESS points at a cluster."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train's controller polls every 2 s by default and each report waits for it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Ray Train V2 routes workers' print() through a logger that also reaches the
    # driver, so every progress line showed twice; plain stdout shows it once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def _fit(config, stage, num_workers, zero_stage, storage, micro_batch_size, zero_options, cpus_per_worker,
         report_every, mlflow_run_id, out, *, checkpoint_every=0, keep_checkpoints=None, max_failures=0,
         resume_from=None, crash=None, callbacks=None) -> DistributedResult:
    from ray.train import CheckpointConfig, FailureConfig
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
            "checkpoint_every": checkpoint_every,
            # Ray Train V2 has no resume_from_checkpoint: the workers open it themselves.
            "resume_from": str(Path(resume_from).resolve()) if resume_from is not None else None,
            "crash": crash,
        },
        torch_config=TorchConfig(backend=comm_backend(config)),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if config.scaling.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=f"{config.run_name}-{stage}-zero{zero_stage}-{int(time.time() * 1000)}",
            storage_path=str(storage.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks or []),
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
    recorded = json.loads((run_dir / DISTRIBUTED_FILE).read_text())
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
        resumed_from_step=recorded.get("resumed_from_step"),
        # The checkpoints Ray Train holds (at most keep_checkpoints), oldest first; the last is the run folder.
        kept_checkpoints=[checkpoint.path for checkpoint, _ in (result.best_checkpoints or [])],
    )


__all__ = [
    "CheckpointMismatchError",
    "DISTRIBUTED_FILE",
    "RayCheckpoints",
    "check_resume",
    "read_checkpoint_state",
    "DeepSpeedConfigError",
    "DistributedResult",
    "check_distributed",
    "ensure_ray",
    "run_distributed",
    "skip_shm_comm_build",
    "train_on_rank",
    "train_worker",
]
