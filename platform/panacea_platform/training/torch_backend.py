"""TrainableWeights for plain PyTorch (one process; also the reference for DeepSpeed)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from panacea_platform.algorithms.interface import Tensors, global_norm

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class TorchWeights:
    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable weights")

    def loss_and_gradient(self, batch: Any, clamp_max: float | None = None) -> tuple[float, Tensors]:
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.module, batch)
        objective = loss.clamp(max=clamp_max) if clamp_max is not None else loss
        objective.backward()
        # Take ownership of each .grad and detach it from the parameter, so the
        # next backward allocates fresh tensors instead of accumulating into ours.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        return loss.item(), grads

    @contextmanager
    def perturbed(self, delta: Sequence[torch.Tensor]) -> Iterator[None]:
        # Restore from a copy, not by subtracting: (w + d) - d is not w in floating point.
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, d in zip(self.params, delta, strict=True):
                    p.add_(d.to(device=p.device, dtype=p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def apply_update(self, direction: Sequence[torch.Tensor]) -> float:
        for p, d in zip(self.params, direction, strict=True):
            p.grad = d.to(device=p.device, dtype=p.dtype)
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm).item()
        else:
            norm = global_norm([p.grad for p in self.params]).item()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for p in self.params:
            p.grad = None
        return norm

    def add_to_weights(self, delta: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, d in zip(self.params, delta, strict=True):
                p.add_(d.to(device=p.device, dtype=p.dtype))

    def weight_shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]
