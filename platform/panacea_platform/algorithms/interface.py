"""The narrow interface every defence step is written against.

A backend owns the model, the optimiser and whatever distributed engine runs
them; the step functions only see gradients and weights as lists of tensors in
a fixed order (the trainable weights). Each training strategy implements it:
training/strategy/torch.py (TorchWeights) and training/strategy/deepspeed.py
(DeepSpeedWeights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

Tensors = list[torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]


class Objective(Protocol):
    """What a pass computes when it is not just the run's language-model loss: the one extension
    of the interface that gives a defence the model's hidden states (forward hooks inside `loss`,
    algorithms/activations.py) or a loss of its own (RepNoise).

    The backend calls `loss` once per micro-batch, in the same order on every pass over the same
    batch, with the model it runs (a module, or a DeepSpeed engine: `unwrap` gives the module to
    hook) and the run's loss function (`lm_loss` under the run's precision). `count` is the number
    of terms `loss` averages over, so that micro-batches and ranks combine into the global mean.
    """

    def loss(self, model: Any, batch: Any, lm_loss: LossFn) -> torch.Tensor: ...

    def count(self, batch: Any) -> int: ...


def unwrap(model: Any) -> Any:
    """The module a backend runs: a DeepSpeed engine holds it as .module. Typed Any: it is a Hugging Face
    causal LM (PEFT-wrapped or not), whose methods torch.nn.Module's annotations would make `Tensor | Module`."""
    return getattr(model, "module", model)


class TrainableWeights(Protocol):
    def loss_and_gradient(
        self, batch: Any, clamp_max: float | None = None, objective: Objective | None = None
    ) -> tuple[float, Tensors]:
        """Loss on `batch` at the current weights and its gradient over the trainable weights.

        With clamp_max, the gradient is that of min(loss, clamp_max): zero when the
        loss is above it. The returned loss is the unclamped value. The gradient
        tensors belong to the caller (no aliasing of buffers a later pass reuses).
        With `objective`, the pass computes the objective's loss instead of the run's.
        """

    def forward(self, batch: Any, objective: Objective) -> float:
        """A no-grad forward of `objective` over this rank's share of `batch` (Antidote's calibration);
        the loss, a global mean over ranks."""

    def sum_over_ranks(self, tensors: Sequence[torch.Tensor]) -> Tensors:
        """Element-wise sums over the data-parallel ranks (the tensors themselves in one process):
        for statistics of activations, which each rank holds only for its rows."""

    def values(self) -> Tensors:
        """Copies of the full (unsharded) trainable weights, in order."""

    def weight_names(self) -> list[str]:
        """The trainable weights' parameter names, in order (e.g. '...q_proj.lora_A.default.weight')."""

    def perturbed(self, delta: Sequence[torch.Tensor]) -> AbstractContextManager[None]:
        """Within the block the trainable weights are w + delta; on exit they are w again, bit for bit."""

    def apply_update(self, direction: Sequence[torch.Tensor]) -> float:
        """Hand `direction` to the optimiser in place of the gradient (clipping, step, schedule).

        Returns the direction's global norm before clipping.
        """

    def add_to_weights(self, delta: Sequence[torch.Tensor]) -> None:
        """Permanently add delta to the trainable weights (w_T + eps_T for release)."""

    def weight_shapes(self) -> list[torch.Size]:
        """Full (unsharded) shapes of the trainable weights, in order."""


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors together (not per tensor, not per layer)."""
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))
