"""The plain PyTorch strategy: one process, CPU or one GPU; also the reference the DeepSpeed strategy
is tested against."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from panacea_platform.algorithms.interface import Objective, Tensors, global_norm
from panacea_platform.training.microbatch import answer_token_count, batch_rows, micro_batches

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
TokenCount = Callable[[Any], int]
STATE_FILE = "torch_state.pt"


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchWeights:
    """TrainableWeights on a module in this process.

    With `accumulation` > 1 each pass runs over that many micro-batches of the batch and sums their
    gradients, each weighted by its share of the batch's answer tokens (`token_count`): the result is
    the gradient of the whole batch's token mean, as one pass gives, with the activations of one
    micro-batch at a time.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = None,
        *,
        accumulation: int = 1,
        token_count: TokenCount = answer_token_count,
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.accumulation = accumulation
        self.token_count = token_count
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable weights")

    def loss_and_gradient(
        self, batch: Any, clamp_max: float | None = None, objective: Objective | None = None
    ) -> tuple[float, Tensors]:
        for p in self.params:
            p.grad = None
        if self.accumulation == 1:
            loss = self._loss(batch, objective)
            value = loss.item()
            loss.backward()
        else:
            value = self._accumulate(batch, objective)
        # Take ownership of each .grad and detach it from the parameter, so the
        # next backward allocates fresh tensors instead of accumulating into ours.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        if clamp_max is not None and value > clamp_max:
            # d/dw min(h, c) = 0 where h > c (torch's clamp); the loss returned is h itself.
            grads = [torch.zeros_like(g) for g in grads]
        return value, grads

    def _loss(self, batch: Any, objective: Objective | None) -> torch.Tensor:
        return (
            self.loss_fn(self.module, batch) if objective is None else objective.loss(self.module, batch, self.loss_fn)
        )

    def _parts(self, batch: Any, objective: Objective | None) -> tuple[list[Any], list[int]]:
        parts = [part for part in micro_batches(batch, 0, 1, self.accumulation) if batch_rows(part)]
        count = self.token_count if objective is None else objective.count
        return parts, [count(part) for part in parts]

    def _accumulate(self, batch: Any, objective: Objective | None) -> float:
        parts, counts = self._parts(batch, objective)
        total = sum(counts)
        if total == 0:
            raise ValueError("the batch has no loss terms (no answer tokens): its mean loss is undefined")
        value = 0.0
        for part, count in zip(parts, counts):
            if count:
                loss = self._loss(part, objective)
                value += loss.item() * count / total
                (loss * (count / total)).backward()  # .grad sums over the micro-batches
        return value

    @torch.no_grad()
    def forward(self, batch: Any, objective: Objective) -> float:
        was_training = self.module.training
        self.module.eval()
        try:
            parts, counts = self._parts(batch, objective)
            total = max(sum(counts), 1)
            return sum(
                self._loss(part, objective).item() * count / total for part, count in zip(parts, counts) if count
            )
        finally:
            self.module.train(was_training)

    def sum_over_ranks(self, tensors: Sequence[torch.Tensor]) -> Tensors:
        return list(tensors)

    def values(self) -> Tensors:
        return [p.detach().clone() for p in self.params]

    def weight_names(self) -> list[str]:
        return [name for name, p in self.module.named_parameters() if p.requires_grad]

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
            norm = global_norm([p.grad for p in self.params if p.grad is not None]).item()  # all set above
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


class TorchStrategy:
    """Plain PyTorch in this process: the model on training_device(), torch's AdamW, checkpoints as one file."""

    rank = 0
    world_size = 1
    forward_is_collective = False

    def __init__(self, accumulation: int = 1) -> None:
        self.accumulation = accumulation

    def load_model(self, config: Any) -> torch.nn.Module:
        from panacea_platform.models import attach_lora, load_base_model, training_adapter

        model = attach_lora(load_base_model(config.model), config.lora, training_adapter(config.model))
        return model.to(training_device())

    def prepare(self, model: torch.nn.Module, optim: Any, steps: int, loss_fn: LossFn) -> TorchWeights:
        from panacea_platform.training.schedule import make_optimizer

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(params, optim, steps)
        return TorchWeights(model, loss_fn, optimizer, scheduler, optim.max_grad_norm, accumulation=self.accumulation)

    def full_weights(self, weights: TorchWeights):
        return nullcontext([p.detach() for p in weights.params])

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def save_checkpoint(self, folder: Path, weights: TorchWeights) -> None:
        torch.save(
            {
                "params": [p.detach().cpu().clone() for p in weights.params],
                "optimizer": weights.optimizer.state_dict(),
                "scheduler": weights.scheduler.state_dict() if weights.scheduler is not None else None,
            },
            folder / STATE_FILE,
        )

    def load_checkpoint(self, folder: Path, weights: TorchWeights) -> None:
        state = torch.load(folder / STATE_FILE, weights_only=True)
        with torch.no_grad():
            for p, saved in zip(weights.params, state["params"], strict=True):
                p.copy_(saved.to(device=p.device, dtype=p.dtype))
        weights.optimizer.load_state_dict(state["optimizer"])
        if weights.scheduler is not None and state["scheduler"] is not None:
            weights.scheduler.load_state_dict(state["scheduler"])

    def describe(self) -> str:
        accumulation = f", {self.accumulation} accumulation steps" if self.accumulation > 1 else ""
        return f"on {training_device()}{accumulation}"

    def close(self) -> None:
        pass
