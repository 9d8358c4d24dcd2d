"""The DeepSpeed strategy: one rank of a data-parallel group under ZeRO stages 0 to 3.

Every rank holds the same *global* batch (the loop's batch streams are seeded
identically on every rank); `DeepSpeedWeights` takes this rank's micro-batches
of it (training/microbatch.py), runs each pass through the engine (forward,
`engine.backward`), and reads the full gradient back with
`deepspeed.utils.safe_get_full_grad`. The defence step (algorithms/) therefore
sees exactly what it sees in one process: full gradients and full weights, in
the same order, and the same loss.

Why each micro-batch's loss is re-weighted: `lm_loss` is a mean over the
micro-batch's answer tokens, and `engine.backward` averages the ranks'
gradients. Each rank backpropagates `loss_m * world_size * tokens_m /
tokens_total` for each of its micro-batches and sums the gradients (in fp32,
by hand: a defence step takes three full gradients per step, which DeepSpeed's
own accumulation cannot give); the engine's average of these sums is the
gradient of the global token mean, exactly as in one process, whatever the
split (10 rows on 8 ranks, an empty rank). The loss reported is the
token-weighted global mean as well, and the clamp min(h, c) of Panacea's third
pass is decided on that global loss.

Precision: DeepSpeed's own bf16 mode is never switched on, because it would
keep the LoRA weights, their gradients and the reduction in bf16. With
model.dtype = bfloat16 the frozen base weights are bf16 and the LoRA weights
stay fp32 (PEFT keeps adapters in fp32): the gradients, their reduction and
accumulation, eps and the update are all fp32; compute_dtype = bfloat16 adds
autocast to the matrix products.

Not supported: model or pipeline parallelism.

Only this module and training/launch_ray.py import DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from panacea_platform.algorithms.interface import Objective, Tensors, global_norm
from panacea_platform.config import ConfigError
from panacea_platform.training.microbatch import (
    answer_token_count,
    batch_rows,
    micro_batches,
    select_rows,
)

LossFn = Callable[[Any, Any], torch.Tensor]
TokenCount = Callable[[Any], int]

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
    accumulation: int = 1,
    zero_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for one stage's optimisation settings.

    `optim` is an OptimConfig (or anything with `batch_size` and
    `max_grad_norm`): its batch_size is the *global* batch, split over
    `world_size` workers and `accumulation` micro-batches each, unevenly where
    it must (microbatch.py). DeepSpeedWeights accumulates by hand, so
    DeepSpeed's gradient_accumulation_steps is 1 and its micro-batch is the
    largest one; these keys only inform DeepSpeed's logs.

    The optimiser is the platform's torch AdamW (passed to
    `deepspeed.initialize`), so `zero_allow_untested_optimizer` is on and no
    C++ Adam is compiled. Gradient clipping is DeepSpeed's, at max_grad_norm.
    DeepSpeed's bf16 stays off whatever `dtype` is (see the module's note).
    `zero_options` is merged into `zero_optimization` (e.g.
    `{"stage3_param_persistence_threshold": 0}` to partition even tiny tensors).
    """
    from panacea_platform.training.microbatch import check_accumulation

    global_batch = int(optim.batch_size)
    if zero_stage not in ZERO_STAGES:
        raise DeepSpeedConfigError(f"zero_stage = {zero_stage!r}: expected one of {ZERO_STAGES}")
    if dtype not in DTYPES:
        raise DeepSpeedConfigError(f"model.dtype = {dtype!r}: expected one of {DTYPES} (fp16 is not offered)")
    if world_size < 1:
        raise DeepSpeedConfigError(f"num_workers = {world_size!r}: expected at least 1")
    try:
        check_accumulation(global_batch, accumulation, "optim.batch_size")
    except ConfigError as exc:
        raise DeepSpeedConfigError(str(exc)) from None
    micro_batch_size = max(1, -(-global_batch // (world_size * accumulation)))
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # Saving gathers the full (16-bit or fp32) weights on rank 0, so the adapter is never empty.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    zero.update(zero_options or {})
    max_grad_norm = getattr(optim, "max_grad_norm", None)
    return {
        "train_batch_size": micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm is not None else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
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
    path: str, optim: Any, world_size: int, zero_stage: int, *, dtype: str = "float32", accumulation: int = 1
) -> dict[str, Any]:
    """A user's DeepSpeed JSON, checked against the run: batch split, stage, precision, clipping.

    Batch keys it leaves out come from the run; ones that contradict it are errors, never silently replaced.
    """
    import json

    try:
        user = json.loads(open(path).read())
    except OSError as exc:
        raise DeepSpeedConfigError(f"scaling.deepspeed_json = {path!r}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json = {path!r}: not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(user, dict):
        raise DeepSpeedConfigError(f"scaling.deepspeed_json = {path!r}: expected a JSON object")
    for key, why in FORBIDDEN_USER_KEYS.items():
        if key in user:
            raise DeepSpeedConfigError(f"scaling.deepspeed_json {path!r} sets '{key}': {why}")
    if user.get("fp16", {}).get("enabled"):
        raise DeepSpeedConfigError(f"scaling.deepspeed_json {path!r} enables fp16: use model.dtype bfloat16 instead")
    if user.get("bf16", {}).get("enabled"):
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} enables DeepSpeed's bf16, which keeps the LoRA weights, their "
            "gradients and their reduction in bf16: remove it and set model.dtype bfloat16 (bf16 base weights, "
            "fp32 adapter math)"
        )
    user_stage = user.get("zero_optimization", {}).get("stage", zero_stage)
    if user_stage != zero_stage:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has zero_optimization.stage {user_stage} but scaling.zero_stage is "
            f"{zero_stage}: make them agree"
        )
    try:
        base = deepspeed_config(
            optim,
            world_size,
            zero_stage,
            dtype=dtype,
            accumulation=accumulation,
            zero_options={k: v for k, v in user.get("zero_optimization", {}).items() if k != "stage"},
        )
    except DeepSpeedConfigError as exc:
        raise DeepSpeedConfigError(f"scaling.deepspeed_json {path!r}: {exc}") from None
    _check_user_batch(user, path, int(optim.batch_size), world_size, accumulation)
    clip = user.get("gradient_clipping", base["gradient_clipping"])
    if clip != base["gradient_clipping"]:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has gradient_clipping {clip} but optim.max_grad_norm gives "
            f"{base['gradient_clipping']}: make them agree"
        )
    # The user's other keys (communication, logging, offload...) stand as written.
    return {**user, **base, "zero_optimization": base["zero_optimization"]}


def _check_user_batch(user: dict[str, Any], path: str, global_batch: int, world_size: int, accumulation: int) -> None:
    """A user's batch keys may restate the run's split, never contradict it."""
    if user.get("train_batch_size", global_batch) != global_batch:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has train_batch_size {user['train_batch_size']} but optim.batch_size "
            f"(the global batch) is {global_batch}: make them agree"
        )
    user_accumulation = user.get("gradient_accumulation_steps", accumulation)
    if user_accumulation != accumulation:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r} has gradient_accumulation_steps {user_accumulation} but "
            f"optim.grad_accum_steps is {accumulation}: set optim.grad_accum_steps and remove the key"
        )
    micro = user.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro * world_size * accumulation != global_batch:
        raise DeepSpeedConfigError(
            f"scaling.deepspeed_json {path!r}: train_micro_batch_size_per_gpu ({micro}) x num_workers "
            f"({world_size}) x grad_accum_steps ({accumulation}) = {micro * world_size * accumulation}, but "
            f"optim.batch_size (the global batch) = {global_batch}: remove the key (uneven splits are handled) "
            "or make them agree"
        )


class DeepSpeedWeights:
    """The TrainableWeights protocol (algorithms/interface.py) on a DeepSpeed engine.

    `loss_fn(engine, batch)` must run the model through the engine (call the
    engine, not the module) and return a scalar mean loss. `token_count(batch)`
    is the number of terms that mean averages (answer tokens for `lm_loss`);
    with None every micro-batch counts equally (exact only for equal shards).
    With `shard=True` (default) every rank is handed the same global batch and
    takes its share; with False each rank's batch is already its own share.
    Each pass runs over `accumulation` micro-batches of this rank's share.
    """

    def __init__(
        self,
        engine: Any,
        loss_fn: LossFn,
        *,
        token_count: TokenCount | None = answer_token_count,
        shard: bool = True,
        accumulation: int = 1,
    ) -> None:
        import deepspeed.comm as dist

        self.engine = engine
        self.loss_fn = loss_fn
        self.token_count = token_count
        self.shard = shard
        self.accumulation = accumulation
        self._dist = dist
        if engine.gradient_accumulation_steps() != 1:
            raise DeepSpeedConfigError(
                f"gradient_accumulation_steps = {engine.gradient_accumulation_steps()} in the DeepSpeed config: "
                "DeepSpeedWeights accumulates by hand (optim.grad_accum_steps); DeepSpeed's must be 1"
            )
        if engine.bfloat16_enabled() or engine.fp16_enabled():
            raise DeepSpeedConfigError(
                "DeepSpeed's bf16/fp16 mode would keep the LoRA gradients in 16 bits: leave it off and set "
                "model.dtype bfloat16 (bf16 base weights, fp32 adapter math)"
            )
        self.stage = int(engine.zero_optimization_stage())
        self.world_size = int(dist.get_world_size()) if dist.is_initialized() else 1
        self.rank = int(dist.get_rank()) if dist.is_initialized() else 0
        dp_world = int(getattr(engine, "dp_world_size", self.world_size))
        if dp_world != self.world_size:
            raise ValueError(
                f"data-parallel world {dp_world} != world size {self.world_size}: model parallelism is not supported"
            )
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
        if self.stage in (1, 2):
            # ZeRO-1/2 keep the last pass's flat gradient partition until their optimiser step; every pass's
            # gradient is cloned out before the next, so a step of several passes (Panacea's three) would
            # carry a stale copy of all trainable weights through each (measured: a fifth copy in Panacea's
            # third pass, `panacea bench step --zero-stage 2`). The last pass's stays for apply_update.
            averaged = getattr(self.engine.optimizer, "averaged_gradients", None)
            if isinstance(averaged, dict):
                for group in averaged:
                    averaged[group] = None

    def _count(self, part: Any, objective: Objective | None = None) -> int:
        if not batch_rows(part):
            return 0
        if objective is not None:
            return objective.count(part)
        return self.token_count(part) if self.token_count is not None else 1

    def _parts(self, batch: Any) -> list[Any]:
        if self.shard:
            return micro_batches(batch, self.rank, self.world_size, self.accumulation)
        return micro_batches(batch, 0, 1, self.accumulation)

    # -- the protocol --------------------------------------------------------

    def loss_and_gradient(
        self, batch: Any, clamp_max: float | None = None, objective: Objective | None = None
    ) -> tuple[float, Tensors]:
        parts = self._parts(batch)
        counts = [self._count(part, objective) for part in parts]
        (total,) = self._all_reduce_sum([float(sum(counts))])
        if total == 0:
            raise ValueError("the batch has no loss terms (no answer tokens on any rank): its mean loss is undefined")
        if self.shard is False and sum(counts) == 0:
            raise ValueError(f"rank {self.rank}'s batch has no loss terms; with shard=False every rank needs some")
        summed: Tensors | None = None
        local_loss = 0.0
        for part, count in zip(parts, counts):
            # Every rank runs `accumulation` backward passes (the engine's are collective); an empty
            # micro-batch runs the plain loss on a row of the global batch that has loss terms, with
            # weight zero (and no objective, so its hooks never see a row that is not this rank's).
            weight = count / total
            loss, grads = (
                self._weighted_pass(part, weight, objective)
                if count
                else self._weighted_pass(self._row_with_terms(batch), 0.0, None)
            )
            local_loss += loss * weight
            summed = grads if summed is None else [a.add_(g) for a, g in zip(summed, grads)]
        (global_loss,) = self._all_reduce_sum([local_loss])
        if summed is None:
            raise RuntimeError("no micro-batch ran: accumulation must be at least 1")
        if clamp_max is not None and global_loss > clamp_max:
            # d/dw min(h, c) = 0 where h > c (as torch's clamp); the loss returned is h itself.
            summed = [torch.zeros_like(g) for g in summed]
        self._grads_ready = True
        return global_loss, summed

    def _weighted_pass(self, part: Any, weight: float, objective: Objective | None) -> tuple[float, Tensors]:
        """One forward and backward; the engine averages over ranks, so world_size * weight makes the
        average the global token mean. Returns the micro-batch's loss and the full fp32 gradient."""
        from deepspeed.utils import safe_get_full_grad

        self._zero_grads()
        loss = self.loss_fn(self.engine, part) if objective is None else objective.loss(self.engine, part, self.loss_fn)
        self.engine.backward(loss * (weight * self.world_size))
        grads = []
        for p in self.params:
            grad = safe_get_full_grad(p)
            grads.append(
                torch.zeros(self._full_shape(p), device=p.device, dtype=torch.float32)
                if grad is None
                else grad.detach().to(torch.float32).clone()
            )
        return loss.item(), grads

    def _row_with_terms(self, batch: Any) -> Any:
        for row in range(batch_rows(batch)):
            candidate = select_rows(batch, row, row + 1)
            if self.token_count is None or self.token_count(candidate) > 0:
                return candidate
        raise ValueError("the batch has no loss terms")

    @torch.no_grad()
    def forward(self, batch: Any, objective: Objective) -> float:
        parts = self._parts(batch)
        counts = [self._count(part, objective) for part in parts]
        (total,) = self._all_reduce_sum([float(sum(counts))])
        was_training = self.engine.module.training
        self.engine.module.eval()
        local = 0.0
        try:
            for part, count in zip(parts, counts):
                if count:
                    local += objective.loss(self.engine, part, self.loss_fn).item() * count / max(total, 1.0)
                elif self.stage == 3:  # every forward gathers weights from every rank: take part, weight zero
                    self.loss_fn(self.engine, self._row_with_terms(batch))
        finally:
            self.engine.module.train(was_training)
        (value,) = self._all_reduce_sum([local])
        return value

    def sum_over_ranks(self, tensors: Sequence[torch.Tensor]) -> Tensors:
        summed = [t.detach().to(device=self.params[0].device).clone() for t in tensors]
        if self.world_size > 1:
            for tensor in summed:
                self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return summed

    def values(self) -> Tensors:
        with self.full_weights() as weights:
            return [w.detach().to(torch.float32).clone() for w in weights]

    def weight_names(self) -> list[str]:
        return [name for name, p in self.engine.module.named_parameters() if p.requires_grad]

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
        # The optimiser's fp32 copy of the weights (ZeRO 1-3 keep one) must move too, or the next
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


# -- the strategy ------------------------------------------------------------------------------------

CPU_BACKEND = "gloo"
GPU_BACKEND = "nccl"
DEEPSPEED_DIR = "deepspeed"  # engine.save_checkpoint: <tag>/mp_rank_00_model_states.pt, zero_pp_rank_<r>_*...


def comm_backend(use_gpu: bool) -> str:
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def check_distributed(
    config: Any, stage: str, num_workers: int, zero_stage: int, zero_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Validate before any worker starts; returns the DeepSpeed config the workers will use."""
    from panacea_platform.training.stage_data import STAGES

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    from panacea_platform.training.strategy import check_precision

    # On the driver this sees the driver's GPU; each worker checks its own (DeepSpeedStrategy.load_model).
    check_precision(config, config.scaling.use_gpu)
    optim = config.optim if stage == "finetune" else config.align_optim
    if config.scaling.deepspeed_json is not None:
        return user_deepspeed_config(
            config.scaling.deepspeed_json,
            optim,
            num_workers,
            zero_stage,
            dtype=config.model.dtype,
            accumulation=optim.grad_accum_steps,
        )
    return deepspeed_config(
        optim,
        num_workers,
        zero_stage,
        dtype=config.model.dtype,
        accumulation=optim.grad_accum_steps,
        zero_options=zero_options,
    )


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory comm op (about 50 s on 2 cores).

    That op only serves DeepSpeed-inference's all-reduce; training collectives go
    through torch.distributed (gloo). DeepSpeed caches its op-compatibility table
    in `deepspeed.ops.__compatible_ops__` and reads it before building the op.
    Set PANACEA_DS_BUILD_SHM_COMM=1 to build it anyway (cached in TORCH_EXTENSIONS_DIR).
    """
    import os

    if os.environ.get("PANACEA_DS_BUILD_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextmanager
def single_rank_group(use_gpu: bool) -> Iterator[None]:
    """A one-process torch.distributed group (nccl on CUDA, gloo on CPU), as a launcher would give, for
    a DeepSpeed engine in this process (measurements, checks, tests)."""
    import os
    import socket

    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; launchers set it
    skip_shm_comm_build()
    if use_gpu:
        torch.cuda.set_device(0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    forget_deepspeed_groups()
    dist.init_process_group(comm_backend(use_gpu), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        forget_deepspeed_groups()


def forget_deepspeed_groups() -> None:
    """DeepSpeed keeps handles on the process groups it has seen (its comm backend, and the groups
    module's data-parallel, sequence-parallel... groups): a later group in this process needs them gone."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name, value in vars(groups).items():
        if not (name.startswith("_") and name.isupper()):
            continue
        if isinstance(value, torch.distributed.ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict):
            value.clear()


class DeepSpeedStrategy:
    """The model on a DeepSpeed engine, this rank's share of every pass, checkpoints as DeepSpeed shards."""

    def __init__(
        self,
        ds_config: dict[str, Any],
        zero_stage: int,
        rank: int,
        world_size: int,
        *,
        accumulation: int = 1,
        base_dtype: str = "float32",
    ) -> None:
        self.ds_config = ds_config
        self.zero_stage = zero_stage
        self.rank, self.world_size = rank, world_size
        self.accumulation, self.base_dtype = accumulation, base_dtype
        self.engine: Any = None  # the DeepSpeed engine, from prepare()
        self._hf_ds_config: Any = None
        self.local_weight_fraction = 1.0

    def load_model(self, config: Any) -> torch.nn.Module:
        from panacea_platform.models import attach_lora, load_base_model, training_adapter
        from panacea_platform.training.strategy import check_precision

        check_precision(config, config.scaling.use_gpu)
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Must exist before from_pretrained: each worker then loads only its partition, never the
            # whole model (transformers keeps a weak reference). zero.Init partitions in the config's
            # dtype: bf16 there keeps the frozen base weights bf16 (the engine itself runs in fp32).
            init_config = {**self.ds_config, "bf16": {"enabled": self.base_dtype == "bfloat16"}}
            self._hf_ds_config = HfDeepSpeedConfig(init_config)
        model = attach_lora(load_base_model(config.model), config.lora, training_adapter(config.model))
        # The share of all weights (frozen ones included) this worker holds: about
        # 1 / num_workers under ZeRO-3, 1 otherwise. Recorded in distributed.json.
        full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.local_weight_fraction = sum(p.numel() for p in model.parameters()) / full
        return model

    def prepare(self, model: torch.nn.Module, optim: Any, steps: int, loss_fn: LossFn) -> DeepSpeedWeights:
        import deepspeed

        from panacea_platform.training.schedule import make_optimizer

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(params, optim, steps)
        # Clipping is the engine's (gradient_clipping in ds_config, from optim.max_grad_norm).
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self._sized_buckets(params),
            dist_init_required=False,
        )
        return DeepSpeedWeights(self.engine, loss_fn, accumulation=self.accumulation)

    def _sized_buckets(self, params: list[torch.nn.Parameter]) -> dict[str, Any]:
        """DeepSpeed's default buckets hold 5e8 elements (2 GiB in fp32), allocated on every backward under
        ZeRO-1/2: sized for training every weight. LoRA's trainable weights fill a bucket of their own
        size, so that is the size used, unless the user set one (scaling.zero_options, deepspeed_json)."""
        zero = dict(self.ds_config["zero_optimization"])
        trainable = max(sum(p.numel() for p in params), 1)
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            zero.setdefault(key, trainable)
        return {**self.ds_config, "zero_optimization": zero}

    def full_weights(self, weights: DeepSpeedWeights):
        # Under ZeRO-3 every rank joins the gather; rank 0 then saves whole tensors, never an empty adapter.
        return weights.full_weights()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        import deepspeed.comm as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device if self.engine else "cpu")
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def save_checkpoint(self, folder: Path, weights: DeepSpeedWeights) -> None:
        # DeepSpeed makes the folder on rank 0 only; every rank writes into its own.
        (folder / DEEPSPEED_DIR).mkdir(exist_ok=True)
        # Frozen base weights are not saved: they are reloaded from the model.
        self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)

    def load_checkpoint(self, folder: Path, weights: DeepSpeedWeights) -> None:
        engine = self.engine
        load_path, _ = engine.load_checkpoint(
            str(folder / DEEPSPEED_DIR),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / DEEPSPEED_DIR}")
        if engine.lr_scheduler is not None:
            # The step after the checkpoint runs at the restored schedule's lr, whatever the optimiser state carried.
            for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr

    @property
    def forward_is_collective(self) -> bool:
        # Under ZeRO-3 every forward pass gathers the partitioned weights from every rank.
        return self.zero_stage == 3

    def describe(self) -> str:
        accumulation = f", {self.accumulation} accumulation steps" if self.accumulation > 1 else ""
        return f"over {self.world_size} workers (ZeRO-{self.zero_stage}{accumulation})"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
