"""Training checkpoints on every path: the format, saving after a step, resuming, and the checks that
refuse a checkpoint this run cannot continue from.

A checkpoint is one folder:
- the strategy's part, written by every rank (DeepSpeed: its shard files under deepspeed/; plain
  PyTorch: torch_state.pt with the trainable weights, optimiser and schedule);
- rng_rank<r>.pt: every rank's torch and Python RNG states;
- panacea_state.json (rank 0): step, stage, the run's identity (backend, world size, ZeRO stage,
  precision, accumulation), the history rows so far, and the MLflow run it logs into;
- panacea_eps.safetensors (rank 0): the defence's last eps, when it has one.

Where a checkpoint goes is a sink's business: LocalCheckpoints keeps the last few in the run folder
(one process); on Ray Train every rank reports its folder and Ray merges them in its storage
(launch_ray.RayCheckpointSink).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from panacea_platform.config import ConfigError, RunConfig

STATE_FILE = "panacea_state.json"
EPS_FILE = "panacea_eps.safetensors"
RNG_FILE = "rng_rank{rank}.pt"
CHECKPOINT_FORMAT = 2
IDENTITY_FIELDS = {  # identity key -> the setting a user changes to match it
    "backend": "scaling.zero_stage (null = plain PyTorch)",
    "world_size": "scaling.num_workers",
    "zero_stage": "scaling.zero_stage",
    "precision": "model.dtype / model.compute_dtype",
    "accumulation": "optim.grad_accum_steps",
}


# Settings a resumed run may change: where it writes and logs, how often, how it is launched (the
# launch's shape is the identity's to check), and how the released model is evaluated.
FREE_TO_CHANGE = (
    "run_name",
    "output_dir",
    "tracking.",
    "scaling.",
    "evaluation.",
    "optim.log_every",
    "optim.eval_every",
)


class CheckpointMismatchError(ConfigError):
    """A checkpoint that this run cannot resume from; the message names what differs."""


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The settings that decide what the steps compute, as flat dotted keys."""
    return {k: v for k, v in config.flat().items() if not k.startswith(FREE_TO_CHANGE)}


def check_settings(state: dict[str, Any], settings: dict[str, Any], where: str) -> None:
    """Refuse to continue a run under other settings (another rho, lr, data...) than the ones it started with."""
    saved = state.get("settings")
    if saved is None:
        return
    differ = sorted(k for k in set(saved) | set(settings) if str(saved.get(k)) != str(settings.get(k)))
    if differ:
        shown = ", ".join(f"{k} = {saved.get(k)!r} there, {settings.get(k)!r} here" for k in differ[:3])
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it was written under other settings ({shown}"
            f"{', ...' if len(differ) > 3 else ''}). Run with its settings, or start a new run (another run_name, "
            "or delete the checkpoint)"
        )


def run_identity(
    config: RunConfig, stage: str, world_size: int | None = None, zero_stage: int | None = None
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run: DeepSpeed's optimiser state is sharded
    per rank and per stage, and precision or accumulation would change what the steps compute.
    `world_size` and `zero_stage` are the launch's when it overrides config.scaling (run_distributed)."""
    optim = config.optim if stage == "finetune" else config.align_optim
    scaling = config.scaling
    zero_stage = scaling.zero_stage if zero_stage is None else zero_stage
    return {
        "backend": "torch" if zero_stage is None else "deepspeed",
        "world_size": scaling.num_workers if world_size is None else world_size,
        "zero_stage": zero_stage,
        "precision": f"{config.model.dtype}/{config.model.compute_dtype}",
        "accumulation": optim.grad_accum_steps,
    }


def check_resume(
    state: dict[str, Any], identity: dict[str, Any], stage: str | None = None, where: str = "the checkpoint"
) -> None:
    """Refuse a checkpoint of another format, stage, backend, world size, ZeRO stage, precision or accumulation."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{where} has checkpoint format {state.get('format')!r}; this version reads format {CHECKPOINT_FORMAT}"
        )
    if stage is not None and state.get("stage") != stage:
        raise CheckpointMismatchError(
            f"cannot resume from {where}: it is a checkpoint of stage {state.get('stage')!r}, not {stage!r}"
        )
    saved = state.get("identity", {})
    for key, field in IDENTITY_FIELDS.items():
        if saved.get(key) != identity.get(key):
            raise CheckpointMismatchError(
                f"cannot resume from {where}: it was written with {key} = {saved.get(key)!r}, but this run has "
                f"{key} = {identity.get(key)!r}. Set {field} to match it, or start a new run without the checkpoint"
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


class CheckpointSink(Protocol):
    def new_folder(self, step: int, rank: int) -> Path:
        """An empty folder this rank writes its part of the step's checkpoint into."""

    def publish(self, folder: Path, step: int, metrics: dict[str, float]) -> None:
        """Make the written folder the latest checkpoint (every rank calls it; it may be a barrier)."""


class Checkpoints:
    """Periodic checkpoints of a stage on any strategy, and resuming from one.

    Build it on every rank before the model, so a mismatched checkpoint is refused before any loading;
    `source` is the checkpoint folder to resume from, or None. `every` = 0 saves nothing (a given
    checkpoint is still resumed). `extra_state` is kept in the state file (the MLflow run id).
    """

    def __init__(
        self,
        every: int,
        identity: dict[str, Any],
        stage: str,
        strategy: Any,
        sink: CheckpointSink | None,
        source: Path | None = None,
        extra_state: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.every, self.identity, self.stage = int(every or 0), identity, stage
        self.strategy, self.sink, self.extra_state = strategy, sink, dict(extra_state or {})
        if settings is not None:
            self.extra_state["settings"] = settings
        self.directory = Path(source) if source is not None else None
        self.state: dict[str, Any] | None = None
        self.resume_step: int | None = None
        if self.directory is not None:
            self.state = read_checkpoint_state(self.directory)
            where = f"the checkpoint {self.directory}"
            check_resume(self.state, identity, stage, where=where)
            if settings is not None:
                check_settings(self.state, settings, where)
            self.resume_step = int(self.state["step"])

    def restore(self, weights: Any, defence: Any) -> tuple[int, list[dict[str, Any]]] | None:
        """Load this rank's part (weights, optimiser, schedule), the defence's eps and the RNG state."""
        if self.state is None or self.directory is None or self.resume_step is None:
            return None
        self.strategy.load_checkpoint(self.directory, weights)
        if self.state.get("has_eps"):
            from safetensors.torch import load_file

            tensors = load_file(str(self.directory / EPS_FILE))
            defence.restore_tensors([tensors[str(i)] for i in range(len(tensors))], self.resume_step)
        else:
            defence.restore_tensors([], self.resume_step)
        rng = torch.load(self.directory / RNG_FILE.format(rank=self.strategy.rank), weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        return self.resume_step, list(self.state["history"])

    def after_step(
        self, step: int, rows: list[dict[str, Any]], metrics: dict[str, float], weights: Any, defence: Any
    ) -> bool:
        """Every `every` steps: write this rank's part of a checkpoint and publish it; True when it did."""
        if not self.every or step % self.every or self.sink is None:
            return False
        rank = self.strategy.rank
        folder = self.sink.new_folder(step, rank)
        self.strategy.save_checkpoint(folder, weights)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, folder / RNG_FILE.format(rank=rank))
        if rank == 0:
            eps = defence.checkpoint_tensors()
            if eps is not None:
                from safetensors.torch import save_file

                save_file(
                    {str(i): t.detach().cpu().contiguous().clone() for i, t in enumerate(eps)}, str(folder / EPS_FILE)
                )
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "stage": self.stage,
                "identity": self.identity,
                "has_eps": eps is not None,
                "history": rows,
                **self.extra_state,
            }
            # Written last: a folder without it is not a checkpoint (read_checkpoint_state).
            (folder / STATE_FILE).write_text(json.dumps(state))
        self.sink.publish(folder, step, metrics)
        return True


class LocalCheckpoints:
    """A sink in the run folder (one process): checkpoints/step_<N>, the last `keep` of them.

    A checkpoint is written under a temporary name and renamed when whole, so a run killed while
    writing leaves the previous one as the latest.
    """

    def __init__(self, root: Path, keep: int | None = 2) -> None:
        self.root, self.keep = Path(root), keep

    def new_folder(self, step: int, rank: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".partial-step{step}-", dir=self.root))

    def publish(self, folder: Path, step: int, metrics: dict[str, float]) -> None:
        target = self.root / f"step_{step:08d}"
        if target.exists():
            shutil.rmtree(target)
        folder.rename(target)
        for old in self.checkpoints()[: -self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file())

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
