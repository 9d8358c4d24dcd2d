"""One strategy object per backend (OpenRLHF's pattern): it prepares the model and optimiser, runs the
passes and the step through the TrainableWeights it returns, gathers, saves and loads checkpoints, and
knows its rank. The loop and the defences see only a strategy and TrainableWeights.

- strategy/torch.py: plain PyTorch in one process (CPU or one GPU);
- strategy/deepspeed.py: DeepSpeed ZeRO 0-3, one rank of a data-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from panacea_platform.algorithms.interface import TrainableWeights
from panacea_platform.config import ConfigError


def check_precision(config: Any, use_gpu: bool) -> None:
    """bf16 where the device cannot run it is refused before any work. CPUs run bf16 (torch emulates
    what the hardware lacks); GPUs before compute capability 8.0 (V100, T4) do not."""
    if "bfloat16" not in (config.model.dtype, config.model.compute_dtype) or not use_gpu:
        return
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        field = "model.dtype" if config.model.dtype == "bfloat16" else "model.compute_dtype"
        raise ConfigError(
            f"{field} = 'bfloat16': this machine's GPU ({torch.cuda.get_device_name(0)}) has no bf16 (it needs "
            "compute capability 8.0 or newer, e.g. A100, H100); set model.dtype and model.compute_dtype to float32"
        )


class Strategy(Protocol):
    rank: int
    world_size: int
    forward_is_collective: bool  # every rank must run every forward pass (ZeRO-3)

    def load_model(self, config: Any) -> torch.nn.Module:
        """The base model with its LoRA adapter, placed (or partitioned) for this backend."""

    def prepare(
        self, model: torch.nn.Module, optim: Any, steps: int, loss_fn: Callable[[Any, Any], torch.Tensor]
    ) -> TrainableWeights:
        """The optimiser and lr schedule for `steps` steps, and the TrainableWeights that run the passes."""

    def full_weights(self, weights: TrainableWeights) -> AbstractContextManager[Any]:
        """A block in which the trainable weights are whole on every rank (for saving)."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over ranks (the identity in one process)."""

    def save_checkpoint(self, folder: Path, weights: TrainableWeights) -> None:
        """This rank's part of the training state (weights, optimiser, schedule) into `folder`."""

    def load_checkpoint(self, folder: Path, weights: TrainableWeights) -> None:
        """Load what save_checkpoint wrote."""

    def describe(self) -> str: ...

    def close(self) -> None: ...
