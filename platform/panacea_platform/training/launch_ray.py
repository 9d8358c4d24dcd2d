"""The Ray Train launcher: a stage on N Ray Train workers, each running one rank of the DeepSpeed strategy.

`run_distributed` (the driver) validates everything before any worker starts, opens or attaches the
MLflow run, launches a Ray Train (V2) `TorchTrainer`, and after the fit publishes the run (plots,
layer analysis, uploads: training/publish.py) while no worker waits. Each worker runs `train_worker`
-> `train_on_rank` -> loop.execute_stage with a DeepSpeedStrategy:

- every rank builds the same data, streams and seeds, so every rank holds the same *global* batch;
  the strategy's weights take this rank's micro-batches of it;
- the defence step (algorithms/) is the one the single-process loop runs, untouched;
- rank 0 writes the run folder (config.yaml, history.jsonl, adapter_unperturbed/,
  perturbation.safetensors, adapter/, summary.json), gathering the full LoRA weights under ZeRO-3,
  plus distributed.json, and reports the folder to Ray Train as the final checkpoint.

Checkpoints and failures: every `checkpoint_every` steps every rank writes its part of a checkpoint
(training/checkpointing.py) and reports it with `ray.train.report`; Ray Train merges the folders into
one checkpoint in storage and keeps the last `keep_checkpoints`. When a worker dies, Ray Train
(FailureConfig(max_failures)) restarts the worker group, and each rank resumes from
`ray.train.get_checkpoint()`. A run started again under the same Ray Train name and storage (a sweep
trial whose driver died) resumes from its last checkpoint the same way.

Ray and DeepSpeed are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panacea_platform import console
from panacea_platform.config import ConfigError, RunConfig, config_from_dict, save_config, with_changes
from panacea_platform.ray_instance import connect_ray
from panacea_platform.storage import Storage
from panacea_platform.tracking import default_tracking_uri
from panacea_platform.training.checkpointing import (
    Checkpoints,
    check_resume,
    check_settings,
    read_checkpoint_state,
    run_identity,
    run_settings,
)
from panacea_platform.training.loop import record_run
from panacea_platform.training.result import StageResult
from panacea_platform.training.strategy.deepspeed import check_distributed, comm_backend, skip_shm_comm_build

DISTRIBUTED_FILE = "distributed.json"
PLACEMENT_GROUP_TAG = "ray_placement_group"  # the MLflow tag naming a fit's placement group (hex id)
StepHook = Callable[[int, int], None]  # (rank, step), called on every worker after every step


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
    for key, value in (
        ("model.name", config.model.name),
        ("model.adapter", config.model.adapter),
        ("data.task_file", config.data.task_file),
        ("data.harmful_file", config.data.harmful_file),
        ("scaling.deepspeed_json", config.scaling.deepspeed_json),
    ):
        if value is not None and Path(value).expanduser().exists():
            changes[key] = str(Path(value).expanduser().resolve())
    return with_changes(config, changes)


def _as_config(config: RunConfig | dict) -> RunConfig:
    return config if isinstance(config, RunConfig) else config_from_dict(config)


class RayCheckpointSink:
    """Checkpoints through Ray Train: every rank writes a temporary folder and reports it (a barrier);
    Ray Train merges the ranks' folders into one checkpoint in its storage."""

    def __init__(self, report: Callable[..., None] | None = None) -> None:
        self._report = report

    def new_folder(self, step: int, rank: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"panacea-ckpt-step{step}-rank{rank}-"))

    def publish(self, folder: Path, step: int, metrics: dict[str, float]) -> None:
        from ray.train import Checkpoint

        report = self._report
        if report is None:
            import ray.train

            report = ray.train.report
        try:
            report(
                {"step": step, **metrics, "checkpoint_step": step}, checkpoint=Checkpoint.from_directory(str(folder))
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def train_on_rank(
    config: RunConfig | dict,
    stage: str,
    zero_stage: int,
    rank: int,
    world_size: int,
    *,
    zero_options: dict[str, Any] | None = None,
    mlflow_run_id: str | None = None,
    on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    out: Callable[[str], None] = print,
    checkpoint_every: int = 0,
    checkpoint: Any | None = None,
    sink: Any | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """One rank's share of a distributed stage; needs torch.distributed set up when world_size > 1.

    The stage body is loop.execute_stage, as in one process, with a DeepSpeedStrategy: same seeds,
    same data, same defence, so the result equals the single-process run's up to float rounding.
    Rank 0 writes the files under config.run_dir() and logs metrics to the MLflow run
    `mlflow_run_id` (opened, published and ended by the driver). `checkpoint` is a Ray Checkpoint to
    resume from. Returns (summary, history).
    """
    import deepspeed

    from panacea_platform.training.loop import execute_stage
    from panacea_platform.training.stage_data import prepare_data
    from panacea_platform.training.strategy.deepspeed import DeepSpeedStrategy

    config = _as_config(config)
    optim = config.optim if stage == "finetune" else config.align_optim
    ds_config = check_distributed(config, stage, world_size, zero_stage, zero_options)
    strategy = DeepSpeedStrategy(
        ds_config, zero_stage, rank, world_size, accumulation=optim.grad_accum_steps, base_dtype=config.model.dtype
    )
    with checkpoint.as_directory() if checkpoint is not None else nullcontext() as source:
        # A mismatched checkpoint is refused here, before any model is loaded.
        checkpoints = Checkpoints(
            checkpoint_every,
            run_identity(config, stage, world_size, zero_stage),
            stage,
            strategy,
            sink,
            source=Path(source) if source is not None else None,
            settings=run_settings(config),
        )
        resumed_from = checkpoints.resume_step
        if rank == 0:
            _record(
                config,
                {
                    "num_workers": world_size,
                    "zero_stage": zero_stage,
                    "deepspeed_config": ds_config,
                    "grad_accum_steps": optim.grad_accum_steps,
                    "checkpoint_every": checkpoint_every,
                    "resumed_from_step": resumed_from,
                },
            )
        skip_shm_comm_build()
        # Joins the process group the launcher made (Ray Train: gloo); creates none of its own.
        deepspeed.init_distributed(dist_backend=comm_backend(config.scaling.use_gpu))
        data = prepare_data(config, stage)
        tracker = _rank_tracker(config, mlflow_run_id, resumed_from) if rank == 0 else None
        try:
            # The driver logged the params: this rank's config may name its node's scratch folder.
            result = execute_stage(
                config, stage, data, strategy, tracker, out, on_step, checkpoints, record_params=False
            )
            if rank == 0:
                _record(config, {"rank0_local_weight_fraction": strategy.local_weight_fraction})
        finally:
            strategy.close()
    return result.summary, result.history


def _record(config: RunConfig, values: dict[str, Any]) -> None:
    """Adds to the run folder's distributed.json (rank 0)."""
    path = config.run_dir() / DISTRIBUTED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = json.loads(path.read_text()) if path.is_file() and "num_workers" not in values else {}
    path.write_text(json.dumps({**recorded, **values}, indent=2))


NODE_SCRATCH_ENV = "PANACEA_NODE_SCRATCH"


def _on_this_node(config: RunConfig) -> RunConfig:
    """Where this worker writes the run folder: the node's own scratch folder when the node names one
    (PANACEA_NODE_SCRATCH, on clusters whose nodes share no run folder), else the driver's output_dir.
    Nothing the driver needs stays there: the folder reaches it as Ray Train's final checkpoint."""
    scratch = os.environ.get(NODE_SCRATCH_ENV)
    if not scratch:
        return config
    return config.model_copy(update={"output_dir": str(Path(scratch).resolve() / "runs")})


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (train_loop_per_worker) that run_distributed launches."""
    import ray.train

    config = _on_this_node(config_from_dict(loop_config["config"]))
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
    # The latest checkpoint of this run (after a restart, or a rerun under the same name), else the
    # one run_distributed was asked to resume from.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint.from_directory(loop_config["resume_from"])
    if checkpoint is not None and _holds_finished_run(checkpoint):
        # The fit had ended when its driver died (a sweep trial cut short after training): its result stands.
        _report_finished_run(checkpoint, config, rank)
        return
    step_hook: StepHook | None = loop_config.get("step_hook")

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % report_every == 0 and not (checkpoint_every and step % checkpoint_every == 0):
            # A barrier: every rank reports the same number of times; rank 0's metrics are kept.
            # (A checkpoint step reports once, with the checkpoint, after on_step.)
            ray.train.report({"step": step, **metrics})
        if step_hook is not None:
            step_hook(rank, step)

    summary, history = train_on_rank(
        config,
        stage,
        loop_config["zero_stage"],
        rank,
        world_size,
        zero_options=loop_config.get("zero_options"),
        mlflow_run_id=loop_config.get("mlflow_run_id"),
        on_step=on_step,
        out=print,
        checkpoint_every=checkpoint_every,
        checkpoint=checkpoint,
        sink=RayCheckpointSink(),
    )
    final = {"step": len(history), "done": True, **summary}
    if rank == 0:
        # The run folder is the final checkpoint: Ray copies it to storage_path (on a
        # cluster, rank 0's local folder is not the driver's), and Result.metrics is
        # only set when a checkpoint comes with the metrics.
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(config.run_dir())))
    else:
        ray.train.report(final)


def _run_folder_from_storage(result: Any, run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The run folder as rank 0 reported it: Ray Train's final checkpoint, in its storage.

    Rank 0 wrote the folder on its own node; on a cluster that is not the driver's disk. The driver
    reads the run's record (summary, history, distributed.json) from the checkpoint Ray Train
    persisted, and copies the folder into its own run folder where that lacks it (a shared or
    same-machine run folder already has it). Returns (run folder, record).
    """
    if result.checkpoint is None:
        raise RuntimeError("Ray Train returned no final checkpoint: the run folder cannot be read back")
    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        record = {
            "summary": json.loads((folder / "summary.json").read_text()),
            "history": [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()],
            "distributed": json.loads((folder / DISTRIBUTED_FILE).read_text()),
        }
        if folder.resolve() != run_dir.resolve() and not (run_dir / "summary.json").is_file():
            shutil.copytree(folder, run_dir, dirs_exist_ok=True)
    return run_dir, record


def _holds_finished_run(checkpoint: Any) -> bool:
    """Whether a Ray checkpoint is a run's final one (its run folder) rather than a training checkpoint."""
    from panacea_platform.training.checkpointing import STATE_FILE

    with checkpoint.as_directory() as folder:
        return (Path(folder) / "summary.json").is_file() and not (Path(folder) / STATE_FILE).is_file()


def _report_finished_run(checkpoint: Any, config: RunConfig, rank: int) -> None:
    import ray.train

    with checkpoint.as_directory() as folder:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        steps = len((Path(folder) / "history.jsonl").read_text().splitlines())
        if rank == 0:
            shutil.copytree(folder, config.run_dir(), dirs_exist_ok=True)
    final = {"step": steps, "done": True, **summary}
    if rank == 0:
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(config.run_dir())))
    else:
        ray.train.report(final)


def _rank_tracker(config: RunConfig, mlflow_run_id: str | None, resumed_from: int | None):
    """Rank 0's handle on the run the driver opened (None without one), marked when it resumed and with
    the placement group that holds its workers."""
    import ray.util

    from panacea_platform.tracking import Tracker

    if mlflow_run_id is None:
        return None
    tracker = Tracker.attach(config.tracking.tracking_uri or default_tracking_uri(config.output_dir), mlflow_run_id)
    if resumed_from is not None:
        tracker.set_tags({"resumed_from_step": str(resumed_from)})
    group = ray.util.get_current_placement_group()
    if group is not None:
        # The workers' CPUs: a sweep's driver removes this group when it stops the trial (search/callbacks.py).
        tracker.set_tags({PLACEMENT_GROUP_TAG: group.id.hex()})
    return tracker


def run_distributed(
    config: RunConfig | dict,
    stage: str = "finetune",
    *,
    storage_path: str | Path | None = None,
    report_every: int | None = None,
    parent_run_id: str | None = None,
    track: bool = True,
    out: Callable[[str], None] = print,
    resume_from: str | Path | None = None,
    callbacks: list[Any] | None = None,
    mlflow_run_id: str | None = None,
    train_run_name: str | None = None,
    step_hook: StepHook | None = None,
) -> DistributedResult:
    """Train one stage on config.scaling's Ray Train workers under its DeepSpeed ZeRO stage.

    The global batch is optim.batch_size (align_optim for stage 'align'), split over the workers and
    optim.grad_accum_steps micro-batches each. Ray is RAY_ADDRESS's cluster, else this machine's one Ray.
    Artifacts land in config.run_dir() as with run_stage; Ray's run records, checkpoints and the final
    run folder go to `storage_path` (a folder or bucket URI; default: scaling.storage, else
    <output_dir>/ray) under `train_run_name` (default: a new name per call; the same name resumes it). The
    driver opens the MLflow run, publishes the run after the fit and ends it with its true status; rank 0
    logs the step metrics.

    Every scaling setting is read from config.scaling alone: the workers, the ZeRO stage and its
    options, the CPUs per worker, and checkpoints and failures: every `checkpoint_every` steps (0:
    never) the workers save a checkpoint; Ray keeps the last `keep_checkpoints` (null: all; the final
    run-folder checkpoint counts among them). A failed worker restarts the worker group from the latest
    checkpoint, at most `max_failures` times (null: 1 when checkpointing, else 0; -1: without limit).
    `resume_from` is a checkpoint folder of an earlier
    run to start from; it must match this run's world size, ZeRO stage, precision and accumulation,
    and be readable at that path by every worker. `callbacks` are Ray Train callbacks.
    `mlflow_run_id` makes rank 0 log into that existing run (a sweep's child run); its owner ends it.
    `step_hook(rank, step)` runs on every worker after every step (tests inject failures with it).
    """
    from panacea_platform.training.stage_data import prepare_data

    config = _checked_for_workers(_as_config(config), stage, resume_from)
    num_workers, zero_stage = config.scaling.num_workers, config.scaling.zero_stage
    checkpoint_every, keep_checkpoints, max_failures = _failure_settings(config)
    data = prepare_data(config, stage)
    storage = run_storage(config, storage_path)
    connect_ray()  # RAY_ADDRESS's cluster, else this machine's one Ray
    _check_cluster_reaches(config)
    tracker, owned = _tracker(config, stage, mlflow_run_id, parent_run_id, track)
    with tracker if owned else nullcontext():
        if tracker is not None:
            tracker.set_tags({"num_workers": str(num_workers), "zero_stage": str(zero_stage)})
            record_run(config, stage, data.fingerprints, tracker)
        loop_config = {
            "config": config.to_dict(),
            "stage": stage,
            "zero_stage": zero_stage,
            "zero_options": config.scaling.zero_options,
            "report_every": report_every,
            "mlflow_run_id": tracker.run_id if tracker is not None else None,
            "checkpoint_every": checkpoint_every,
            "step_hook": step_hook,  # Ray Train V2 has no resume_from_checkpoint: the workers open it themselves.
            "resume_from": str(Path(resume_from).resolve()) if resume_from is not None else None,
        }
        name = train_run_name or f"{config.run_name}-{stage}-zero{zero_stage}-{int(time.time() * 1000)}"
        result = _fit(config, loop_config, storage, name, keep_checkpoints, max_failures, callbacks, out)
        from panacea_platform.training.publish import publish_stage

        # After the last collective, on the driver: no worker waits while it runs.
        publish_stage(config, stage, result, tracker, out)
        return result


def _checked_for_workers(config: RunConfig, stage: str, resume_from: str | Path | None) -> RunConfig:
    """The config the workers run (fine-tuning under its convention, algorithms/convention.py), checked
    before any worker starts: the ZeRO stage, the batch split, and the checkpoint to resume from."""
    from panacea_platform.algorithms.convention import with_convention

    config = for_workers(with_convention(config) if stage == "finetune" else config)
    scaling = config.scaling
    if scaling.zero_stage is None:
        raise ConfigError(
            "scaling.zero_stage = None: training on Ray Train workers runs under DeepSpeed; "
            "set scaling.zero_stage to 0-3 (or train in this process, without run_distributed)"
        )
    check_distributed(config, stage, scaling.num_workers, scaling.zero_stage, scaling.zero_options)
    if resume_from is not None:
        state, where = read_checkpoint_state(resume_from), f"the checkpoint {resume_from}"
        check_resume(state, run_identity(config, stage, scaling.num_workers, scaling.zero_stage), stage, where=where)
        check_settings(state, run_settings(config), where)
    return config


def _check_cluster_reaches(config: RunConfig) -> None:
    """Before any worker starts: a cluster of several machines cannot log to one machine's SQLite file."""
    import ray

    from panacea_platform.ray_instance import machines_problem

    uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    problem = machines_problem(ray.nodes(), uri)
    if problem:
        raise ConfigError(f"tracking.tracking_uri = {uri!r}: {problem}")


def run_storage(config: RunConfig, storage_path: str | Path | None = None) -> Storage:
    """Ray Train's storage for this run: `storage_path`, else scaling.storage, else <output_dir>/ray."""
    return Storage.at(storage_path or config.scaling.storage or Path(config.output_dir) / "ray")


def _tracker(
    config: RunConfig, stage: str, mlflow_run_id: str | None, parent_run_id: str | None, track: bool
) -> tuple[Any, bool]:
    """(tracker, owned): the existing run `mlflow_run_id` (its owner ends it), or one opened here."""
    from panacea_platform.training.loop import open_tracker

    if mlflow_run_id is not None:
        from panacea_platform.tracking import Tracker

        uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
        return Tracker.attach(uri, mlflow_run_id), False
    tracker = open_tracker(config, stage, parent_run_id) if track else None
    return tracker, tracker is not None


def _failure_settings(config: RunConfig) -> tuple[int, int | None, int]:
    """(checkpoint_every, keep_checkpoints, max_failures) from config.scaling, with max_failures' default."""
    scaling = config.scaling
    max_failures = scaling.max_failures
    if max_failures is None:
        max_failures = 1 if scaling.checkpoint_every else 0
    return scaling.checkpoint_every, scaling.keep_checkpoints, max_failures


def _fit(
    config: RunConfig,
    loop_config: dict[str, Any],
    storage: Storage,
    name: str,
    keep_checkpoints: int | None,
    max_failures: int,
    callbacks: list[Any] | None,
    out: Callable[[str], None],
) -> DistributedResult:
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    start = time.monotonic()
    stage, scaling = loop_config["stage"], config.scaling
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=comm_backend(config.scaling.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=name,
            storage_path=storage.uri,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks or []),
            # Ray Train V2's RunConfig takes it; mypy reads ray.train's V1 export.
            worker_runtime_env={"env_vars": console.worker_env()},  # type: ignore[call-arg]
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    run_dir, record = _run_folder_from_storage(result, config.run_dir())
    # Rank 0's copy names its node's scratch folder as output_dir; the folder records the run as launched.
    save_config(config, run_dir / "config.yaml")
    summary, history, recorded = record["summary"], record["history"], record["distributed"]
    unperturbed = run_dir / "adapter_unperturbed"
    from panacea_platform.models import PERTURBATION_FILE

    eps = run_dir / PERTURBATION_FILE
    out(
        f"[distributed] {stage} on {scaling.num_workers} workers (ZeRO-{scaling.zero_stage}) took "
        f"{time.monotonic() - start:.0f}s"
    )
    return DistributedResult(
        run_dir=run_dir,
        adapter_dir=run_dir / "adapter",
        unperturbed_adapter_dir=unperturbed if unperturbed.is_dir() else None,
        perturbation_path=eps if eps.is_file() else None,
        summary=summary,
        history=history,
        num_workers=scaling.num_workers,
        zero_stage=scaling.zero_stage or 0,  # a distributed run always has one (scaling.distributed)
        checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
        metrics=result.metrics,
        mlflow_run_id=loop_config["mlflow_run_id"],
        resumed_from_step=recorded.get("resumed_from_step"),
        # The checkpoints Ray Train holds (at most keep_checkpoints), oldest first; the last is the run folder.
        kept_checkpoints=[checkpoint.path for checkpoint, _ in (result.best_checkpoints or [])],
    )
