"""The narrow interface every defence step is written against.

A backend owns the model, the optimiser and whatever distributed engine runs
them; the step functions only see gradients and weights as lists of tensors in
a fixed order (the trainable weights). Each training strategy implements it:
training/strategy/torch.py (TorchWeights) and training/strategy/deepspeed.py
(DeepSpeedWeights).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, Sequence

import torch

Tensors = list[torch.Tensor]


class TrainableWeights(Protocol):
    def loss_and_gradient(self, batch: Any, clamp_max: float | None = None) -> tuple[float, Tensors]:
        """Loss on `batch` at the current weights and its gradient over the trainable weights.

        With clamp_max, the gradient is that of min(loss, clamp_max): zero when the
        loss is above it. The returned loss is the unclamped value. The gradient
        tensors belong to the caller (no aliasing of buffers a later pass reuses).
        """

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
