"""One strategy object per backend (OpenRLHF's pattern): it prepares the model and optimiser, runs the
passes and the step through the TrainableWeights it returns, gathers, saves and loads checkpoints, and
knows its rank. The loop and the defences see only a strategy and TrainableWeights.

- strategy/torch.py: plain PyTorch in one process (CPU or one GPU);
- strategy/deepspeed.py: DeepSpeed ZeRO 0-3, one rank of a data-parallel group.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from panacea_platform.algorithms.interface import TrainableWeights


class Strategy(Protocol):
    rank: int
    world_size: int
    forward_is_collective: bool  # every rank must run every forward pass (ZeRO-3)

    def load_model(self, config: Any) -> torch.nn.Module:
        """The base model with its LoRA adapter, placed (or partitioned) for this backend."""

    def prepare(self, model: torch.nn.Module, optim: Any, steps: int,
                loss_fn: Callable[[Any, Any], torch.Tensor]) -> TrainableWeights:
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
