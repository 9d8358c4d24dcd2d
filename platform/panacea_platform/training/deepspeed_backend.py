"""TrainableWeights on a DeepSpeed engine: data parallel over ranks, ZeRO stages 0 to 3.

Every rank holds the same *global* batch (the loop's batch streams are seeded
identically on every rank); `DeepSpeedWeights` takes this rank's share of it,
runs the pass through the engine (forward, `engine.backward`), and reads the
full gradient back with `deepspeed.utils.safe_get_full_grad`. The defence step
(algorithms/) therefore sees exactly what it sees in one process: full
gradients and full weights, in the same order, and the same loss.

Why each rank's loss is re-weighted: `lm_loss` is a mean over the batch's
answer tokens, and `engine.backward` averages the ranks' gradients. With
shards of unequal token counts, the plain average of the shards' means is not
the mean over the global batch. Each rank therefore backpropagates
`loss_r * world_size * tokens_r / tokens_total`; the engine's average of these
is the gradient of the global token mean, exactly as in one process, whatever
the split. The loss reported is the token-weighted global mean as well, and the
clamp min(h, c) of Panacea's third pass is decided on that global loss.

Not supported: gradient accumulation > 1 (each of Panacea's three passes would
have to be summed over micro-batches by hand), model or pipeline parallelism.

Only this module and training/distributed.py import DeepSpeed.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch

from panacea_platform.algorithms.interface import Tensors, global_norm
from panacea_platform.config import ConfigError

LossFn = Callable[[Any, Any], torch.Tensor]
TokenCount = Callable[[Any], int]

IGNORE_INDEX = -100
ZERO_STAGES = (0, 1, 2, 3)
DTYPES = ("float32", "bfloat16")


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed setting that cannot be used; the message names the field and the fix."""


def deepspeed_config(
    optim: Any,
    world_size: int,
    zero_stage: int,
    *,
    dtype: str = "float32",
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    zero_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for one stage's optimisation settings.

    `optim` is an OptimConfig (or anything with `batch_size` and
    `max_grad_norm`): its batch_size is the *global* batch, split over
    `world_size` data-parallel workers. micro_batch_size defaults to
    batch_size / world_size and must satisfy
    micro_batch_size x world_size x gradient_accumulation_steps = batch_size.

    The optimiser is the platform's torch AdamW (passed to
    `deepspeed.initialize`), so `zero_allow_untested_optimizer` is on and no
    C++ Adam is compiled. Gradient clipping is DeepSpeed's, at max_grad_norm.
    `zero_options` is merged into `zero_optimization` (e.g.
    `{"stage3_param_persistence_threshold": 0}` to partition even tiny tensors).
    """
    global_batch = int(optim.batch_size)
    if zero_stage not in ZERO_STAGES:
        raise DeepSpeedConfigError(f"zero_stage = {zero_stage!r}: expected one of {ZERO_STAGES}")
    if dtype not in DTYPES:
        raise DeepSpeedConfigError(f"model.dtype = {dtype!r}: expected one of {DTYPES} (fp16 is not offered on CPU)")
    if dtype == "bfloat16" and zero_stage == 0:
        raise DeepSpeedConfigError(
            "model.dtype = 'bfloat16' with zero_stage = 0: not supported; DeepSpeed's stage-0 bf16 optimiser keeps "
            "an fp32 master copy that gradients and weights cannot be written to. Use zero_stage 1, 2 or 3 for bf16"
        )
    if world_size < 1:
        raise DeepSpeedConfigError(f"num_workers = {world_size!r}: expected at least 1")
    if gradient_accumulation_steps != 1:
        raise DeepSpeedConfigError(
            f"gradient_accumulation_steps = {gradient_accumulation_steps!r}: only 1 is supported; each of the "
            "defence's passes would have to be summed over micro-batches by hand. Use more workers or a "
            "smaller optim.batch_size instead"
        )
    if micro_batch_size is None:
        if global_batch % world_size:
            raise DeepSpeedConfigError(
                f"optim.batch_size = {global_batch} is not divisible by num_workers = {world_size}: "
                "the global batch is split evenly over the workers; choose a multiple of the worker count"
            )
        micro_batch_size = global_batch // world_size
    if micro_batch_size < 1 or micro_batch_size * world_size * gradient_accumulation_steps != global_batch:
        raise DeepSpeedConfigError(
            f"train_micro_batch_size_per_gpu ({micro_batch_size}) x num_workers ({world_size}) x "
            f"gradient_accumulation_steps ({gradient_accumulation_steps}) = "
            f"{micro_batch_size * world_size * gradient_accumulation_steps}, but optim.batch_size (the global "
            f"batch) = {global_batch}: they must be equal"
        )
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Saving gathers the full (16-bit or fp32) weights on rank 0, so the adapter is never empty.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    zero.update(zero_options or {})
    max_grad_norm = getattr(optim, "max_grad_norm", None)
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm is not None else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# Sections a user's DeepSpeed JSON may not set: the platform passes its own torch
# AdamW and lr schedule, and fp16 (loss scaling) is not what this path implements.
FORBIDDEN_USER_KEYS = {
    "optimizer": "the platform passes its own AdamW (optim.lr, optim.weight_decay); remove the section",
    "scheduler": "the platform passes its own schedule (optim.schedule, optim.warmup_steps); remove the section",
}


def user_deepspeed_config(
    path: str, optim: Any, world_size: int, zero_stage: int, *, dtype: str = "float32"
) -> dict[str, Any]:
    """A user's DeepSpeed JSON, checked against the run: batch split, stage, precision, clipping.

    Missing batch keys are filled from the run; conflicting ones are errors, never silently replaced.
    """
    import json

    try:
        user = json.loads(open(path).read())
    except OSError as exc:
        raise DeepSpeedConfigError(f"scaling.deepspeed_json = {path!r}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"scaling.deepspeed_json = {path!r}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(user, dict):
        raise DeepSpeedConfigError(f"scaling.deepspeed_json = {path!r}: expected a JSON object")
    for key, why in FORBIDDEN_USER_KEYS.items():
        if key in user:
            raise DeepSpeedConfigError(f"scaling.deepspeed_json {path!r} sets '{key}': {why}")
    if user.get("fp16", {}).get("enabled"):
        raise DeepSpeedConfigError(f"scaling.deepspeed_json {path!r} enables fp16: use model.dtype bfloat16 instead")
    user_stage = user.get("zero_optimization", {}).get("stage", zero_stage)
    if user_stage != zero_stage:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has zero_optimization.stage {user_stage} but scaling.zero_stage is "
            f"{zero_stage}: make them agree"
        )
    try:
        base = deepspeed_config(
            optim, world_size, zero_stage, dtype=dtype,
            micro_batch_size=user.get("train_micro_batch_size_per_gpu"),
            gradient_accumulation_steps=user.get("gradient_accumulation_steps", 1),
            zero_options={k: v for k, v in user.get("zero_optimization", {}).items() if k != "stage"},
        )
    except DeepSpeedConfigError as exc:
        raise DeepSpeedConfigError(f"scaling.deepspeed_json {path!r}: {exc}") from None
    if user.get("train_batch_size", base["train_batch_size"]) != base["train_batch_size"]:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has train_batch_size {user['train_batch_size']} but optim.batch_size "
            f"(the global batch) is {base['train_batch_size']}: make them agree"
        )
    bf16 = user.get("bf16", {}).get("enabled", base["bf16"]["enabled"])
    if bf16 != base["bf16"]["enabled"]:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has bf16.enabled {bf16} but model.dtype is {dtype}: make them agree"
        )
    clip = user.get("gradient_clipping", base["gradient_clipping"])
    if clip != base["gradient_clipping"]:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has gradient_clipping {clip} but optim.max_grad_norm gives "
            f"{base['gradient_clipping']}: make them agree"
        )
    # The user's other keys (communication, logging, offload...) stand as written.
    return {**user, **base, "zero_optimization": base["zero_optimization"]}


def answer_token_count(batch: Any) -> int:
    """Tokens `lm_loss` averages over: labels other than -100, after the one-token shift."""
    if not isinstance(batch, dict) or "labels" not in batch:
        raise TypeError("answer_token_count needs a batch dict with 'labels'; pass token_count= for other batches")
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def batch_rows(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(iter(batch.values())).shape[0])
    return int(batch.shape[0])


def select_rows(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of this rank: contiguous, sizes differing by at most one."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous share of a global batch (may be empty when rows < world_size)."""
    return select_rows(batch, *shard_bounds(batch_rows(batch), rank, world_size))


class DeepSpeedWeights:
    """The TrainableWeights protocol (algorithms/interface.py) on a DeepSpeed engine.

    `loss_fn(engine, batch)` must run the model through the engine (call the
    engine, not the module) and return a scalar mean loss. `token_count(batch)`
    is the number of terms that mean averages (answer tokens for `lm_loss`);
    with None every rank's loss counts equally (exact only for equal shards).
    With `shard=True` (default) every rank is handed the same global batch and
    takes its share; with False each rank's batch is already its own share.
    """

    def __init__(
        self,
        engine: Any,
        loss_fn: LossFn,
        *,
        token_count: TokenCount | None = answer_token_count,
        shard: bool = True,
    ) -> None:
        import deepspeed.comm as dist

        self.engine = engine
        self.loss_fn = loss_fn
        self.token_count = token_count
        self.shard = shard
        self._dist = dist
        if engine.gradient_accumulation_steps() != 1:
            raise DeepSpeedConfigError(
                f"gradient_accumulation_steps = {engine.gradient_accumulation_steps()}: the DeepSpeed backend "
                "supports only 1 (each pass of a defence step would need its own accumulation)"
            )
        self.stage = int(engine.zero_optimization_stage())
        if self.stage == 0 and (engine.bfloat16_enabled() or engine.fp16_enabled()):
            raise DeepSpeedConfigError(
                "bf16/fp16 with ZeRO stage 0 is not supported by the DeepSpeed backend (its fp32 master copy "
                "cannot be written to): use ZeRO stage 1, 2 or 3"
            )
        self.world_size = int(dist.get_world_size()) if dist.is_initialized() else 1
        self.rank = int(dist.get_rank()) if dist.is_initialized() else 0
        dp_world = int(getattr(engine, "dp_world_size", self.world_size))
        if dp_world != self.world_size:
            raise ValueError(f"data-parallel world {dp_world} != world size {self.world_size}: model parallelism is not supported")
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable weights")
        self._grads_ready = False

    # -- helpers -------------------------------------------------------------

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        # NCCL reduces only tensors on the GPU; gloo only on the CPU: follow the weights.
        tensor = torch.tensor(values, dtype=torch.float64, device=self.params[0].device)
        if self.world_size > 1:
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor.tolist()

    def _gathered(self, modify: bool):
        """Full trainable weights inside the block (ZeRO-3); a no-op at other stages."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        # modifier_rank=0: on exit rank 0's values are partitioned back to every rank
        # (every rank makes the same change, so nothing is lost).
        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=0 if modify else None)

    def _zero_grads(self) -> None:
        if self.engine.zero_optimization():
            self.engine.optimizer.zero_grad(set_to_none=True)
        else:
            self.engine.zero_grad()

    # -- the protocol --------------------------------------------------------

    def loss_and_gradient(self, batch: Any, clamp_max: float | None = None) -> tuple[float, Tensors]:
        from deepspeed.utils import safe_get_full_grad

        local = shard_batch(batch, self.rank, self.world_size) if self.shard else batch
        rows = batch_rows(local)
        if self.token_count is not None:
            count = self.token_count(local) if rows else 0
        else:
            count = 1 if rows else 0
        (total,) = self._all_reduce_sum([float(count)])
        if total == 0:
            raise ValueError("the batch has no loss terms (no answer tokens on any rank): its mean loss is undefined")
        weight = count / total
        if count == 0:
            # This rank's share is empty (fewer rows than ranks, or no answer
            # tokens): it still takes part in the engine's collective passes, on
            # a row of the global batch that has loss terms, with weight zero.
            if not self.shard:
                raise ValueError(f"rank {self.rank}'s batch has no loss terms; with shard=False every rank needs some")
            local = self._row_with_terms(batch)

        self._zero_grads()
        loss = self.loss_fn(self.engine, local)
        (global_loss,) = self._all_reduce_sum([loss.item() * weight])
        # The engine averages over ranks: world_size * weight makes that average the global token mean.
        objective = loss * (weight * self.world_size)
        if clamp_max is not None and global_loss > clamp_max:
            # d/dw min(h, c) = 0 where h > c (as torch's clamp); the backward still runs on every rank.
            objective = objective * 0.0
        self.engine.backward(objective)
        grads = []
        for p in self.params:
            grad = safe_get_full_grad(p)
            grads.append(
                torch.zeros(self._full_shape(p), device=p.device) if grad is None else grad.detach().clone()
            )
        self._grads_ready = True
        return global_loss, grads

    def _row_with_terms(self, batch: Any) -> Any:
        for row in range(batch_rows(batch)):
            candidate = select_rows(batch, row, row + 1)
            if self.token_count is None or self.token_count(candidate) > 0:
                return candidate
        raise ValueError("the batch has no loss terms")

    @contextmanager
    def perturbed(self, delta: Sequence[torch.Tensor]) -> Iterator[None]:
        # Restore from a copy, not by subtracting: (w + d) - d is not w in floating point.
        with torch.no_grad(), self._gathered(modify=True):
            saved = [p.detach().clone() for p in self.params]
            for p, d in zip(self.params, delta, strict=True):
                p.add_(d.to(device=p.device, dtype=p.dtype))
        try:
            yield
        finally:
            with torch.no_grad(), self._gathered(modify=True):
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def apply_update(self, direction: Sequence[torch.Tensor]) -> float:
        from deepspeed.utils import safe_set_full_grad

        if not self._grads_ready:
            raise RuntimeError(
                "apply_update needs a loss_and_gradient pass before it on the DeepSpeed backend "
                "(the engine's gradient buffers only exist after a backward)"
            )
        direction = list(direction)
        if len(direction) != len(self.params):
            raise ValueError(f"{len(direction)} direction tensors for {len(self.params)} trainable weights")
        norm = global_norm(direction).item()
        for p, d in zip(self.params, direction):
            value = d.detach().to(dtype=torch.float32).reshape(self._full_shape(p))
            if self.stage == 0 and p.grad is None:
                p.grad = value.to(dtype=p.dtype).clone()
            else:
                safe_set_full_grad(p, value if p.grad is None else value.to(p.grad.dtype))
        # Clipping (gradient_clipping), the optimiser step and the lr schedule happen here.
        self.engine.step()
        self._grads_ready = False
        return norm

    def add_to_weights(self, delta: Sequence[torch.Tensor]) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        delta = list(delta)
        if len(delta) != len(self.params):
            raise ValueError(f"{len(delta)} delta tensors for {len(self.params)} trainable weights")
        # The optimiser's fp32 master copy (ZeRO 1-3, bf16) must move too, or the next
        # step would copy the old master back. It is *set* (not added to), so a master
        # that shares storage with the working weights is not moved twice.
        masters = [safe_get_full_fp32_param(p) for p in self.params]
        with torch.no_grad(), self._gathered(modify=True):
            for p, d in zip(self.params, delta):
                p.add_(d.to(device=p.device, dtype=p.dtype))
        for p, d, master in zip(self.params, delta, masters):
            if master is not None:
                safe_set_full_fp32_param(p, master + d.to(dtype=master.dtype).reshape(master.shape))

    def weight_shapes(self) -> list[torch.Size]:
        return [self._full_shape(p) for p in self.params]

    @staticmethod
    def _full_shape(p: torch.nn.Parameter) -> torch.Size:
        # Under ZeRO-3 p.shape is that of the local partition (often empty); ds_shape is the whole tensor.
        return torch.Size(getattr(p, "ds_shape", p.shape))

    @contextmanager
    def full_weights(self) -> Iterator[Tensors]:
        """The full trainable weights (gathered under ZeRO-3), read-only, on every rank."""
        with torch.no_grad(), self._gathered(modify=False):
            yield [p.detach() for p in self.params]
