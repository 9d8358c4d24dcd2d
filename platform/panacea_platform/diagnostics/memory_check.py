"""The memory plan checked against a measurement: one Panacea step of the job's model under the
DeepSpeed strategy (ZeRO-2, world size 1) on this machine's device.

Measured: the bytes of every live tensor once the engine has taken a step (weights, the LoRA weights'
optimiser states and DeepSpeed's buffers: what the plan calls model states), plus the peak a Panacea
step allocates above that (activations, the three gradients and eps: the plan's activations and
Panacea's extra). Planned: memory_plan.plan for one GPU at the same batch, sequence and precision.
The batch is the plan's worst case: every position an answer, so the loss needs the logits of every
position (the plan counts them all).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from panacea_platform.config import RunConfig

AGREEMENT = 0.25  # the plan must be within 25% of the measurement


@dataclass
class MemoryCheck:
    model: str
    batch: int
    seq_len: int
    device: str
    measured_states_gb: float
    measured_step_gb: float
    planned_states_gb: float
    planned_step_gb: float

    @property
    def measured_gb(self) -> float:
        return self.measured_states_gb + self.measured_step_gb

    @property
    def planned_gb(self) -> float:
        return self.planned_states_gb + self.planned_step_gb

    @property
    def ratio(self) -> float:
        return self.planned_gb / self.measured_gb

    @property
    def agrees(self) -> bool:
        return abs(self.ratio - 1) <= AGREEMENT


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor alive in this process, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some tensor subclasses have no plain storage
            continue
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


MARK_BYTES = 7_777_777  # a one-off allocation of a size nothing else has, between two profiled steps


def step_peak_bytes(step: Callable[[], Any]) -> int:
    """The peak the second of two steps allocates above the level at its start: the first is the
    warm-up, at which the optimiser's states appear.

    CUDA: the allocator's own peak. CPU: torch's profiler's allocation and free events, summed. The
    profiler drops the frees of blocks allocated before it started (the previous step's leftovers,
    freed early in the next), which would count as never freed: so both steps are profiled, a marker
    allocation between them, and only the second, whose every block is known, is read.
    """
    if torch.cuda.is_available():
        from panacea_platform.diagnostics.bench_step import peak_tensor_memory_mb

        step()
        return int(peak_tensor_memory_mb(step) * 2**20)  # the allocator's own peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        marker = torch.empty(MARK_BYTES, dtype=torch.uint8)
        del marker
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    after_marker = next(i for i, e in enumerate(events) if e.nbytes() == -MARK_BYTES) + 1
    level = peak = 0
    for event in events[after_marker:]:
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def worst_case_batch(rows: int, seq_len: int, vocab: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (rows, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, 0] = -100  # the first token has no prediction of its own
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }


def check_memory(config: RunConfig, out: Callable[[str], None] = print) -> MemoryCheck:
    """Measure one Panacea step of config.model under ZeRO-2 on one rank and plan the same step."""
    from panacea_platform.diagnostics.memory_plan import GB, count_model, plan
    from panacea_platform.diagnostics.steps import registered_step
    from panacea_platform.training.losses import training_loss
    from panacea_platform.training.strategy.deepspeed import (
        DeepSpeedStrategy,
        deepspeed_config,
        single_rank_group,
    )

    use_gpu = torch.cuda.is_available()
    optim = config.optim
    seq_len = config.data.max_length
    micro_batch = -(-optim.batch_size // optim.grad_accum_steps)
    with single_rank_group(use_gpu):
        gc.collect()
        before = live_tensor_bytes()
        strategy = DeepSpeedStrategy(
            deepspeed_config(optim, 1, 2, dtype=config.model.dtype, accumulation=optim.grad_accum_steps),
            2,
            0,
            1,
            accumulation=optim.grad_accum_steps,
            base_dtype=config.model.dtype,
        )
        model: Any = strategy.load_model(config)  # a Hugging Face causal LM
        if use_gpu:
            model = model.cuda()
        weights = strategy.prepare(model, optim, 3, training_loss(config))
        device = model.get_input_embeddings().weight.device
        vocab = model.config.vocab_size
        batch = worst_case_batch(optim.batch_size, seq_len, vocab, config.seed, device)
        harmful = worst_case_batch(optim.batch_size, seq_len, vocab, config.seed + 1, device)

        step = registered_step(config, "panacea", weights, batch, harmful, 2)
        out(
            f"[memory] {config.model.name}: two Panacea steps, the second measured (the optimiser's states "
            "appear at the first)"
        )
        peak_step = step_peak_bytes(step)
        gc.collect()
        states = (
            live_tensor_bytes()
            - before
            - sum(t.numel() * t.element_size() for t in (*batch.values(), *harmful.values()))
        )
        strategy.close()
    counts = count_model(config.model.name, config.lora.target_modules, config.lora.rank)
    row = plan(
        counts, 1, 2, micro_batch, seq_len, weight_dtype=config.model.dtype, compute_dtype=config.model.compute_dtype
    )
    return MemoryCheck(
        config.model.name,
        micro_batch,
        seq_len,
        "cuda" if use_gpu else "cpu",
        states / GB,
        peak_step / GB,
        row.params_gb + row.grads_gb + row.optimizer_gb,
        row.activations_gb + row.panacea_extra_gb,
    )


def format_check(check: MemoryCheck) -> str:
    lines = [
        f"plan against measurement: {check.model}, one Panacea step on {check.device} under ZeRO-2, "
        f"micro-batch {check.batch} x {check.seq_len} tokens, GiB:",
        f"{'':<34}{'measured':>10}{'planned':>10}{'planned/measured':>18}",
    ]
    for name, measured, planned in (
        ("weights and model states", check.measured_states_gb, check.planned_states_gb),
        ("step (activations, G, H, eps)", check.measured_step_gb, check.planned_step_gb),
        ("total", check.measured_gb, check.planned_gb),
    ):
        lines.append(f"{name:<34}{measured:>10.3f}{planned:>10.3f}{planned / measured:>18.2f}")
    verdict = "agree" if check.agrees else "DISAGREE"
    lines.append(f"plan and measurement {verdict} within {AGREEMENT:.0%} (total: {check.ratio:.2f}x)")
    return "\n".join(lines)
