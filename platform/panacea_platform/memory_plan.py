"""Per-GPU memory of LoRA fine-tuning with the Panacea step under ZeRO-2 and ZeRO-3.

Model states come from DeepSpeed's own estimators, applied where they hold: to
the trainable (LoRA) weights, which carry 16-bit weights and gradients, fp32
master weights and Adam's two moments. They assume every weight trains, so the
frozen base model is added separately: 16-bit weights only, replicated under
ZeRO-2, partitioned under ZeRO-3 (plus the largest layer gathered at a time,
which the ZeRO-3 estimator reports). Activations follow a per-token count for a
pre-norm decoder with SwiGLU MLP and fused (SDPA) attention, so no s^2 term.
Panacea adds G, H and eps as full fp32 tensors and a 16-bit copy of the
trainable weights to restore them from: a few copies of the LoRA weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources

GB = 1024**3


@dataclass
class ModelCounts:
    name: str
    total_params: int
    trainable_params: int
    largest_layer_params: int
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    vocab: int
    source: str


@dataclass
class PlanRow:
    stage: int
    gpus: int
    micro_batch: int
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    panacea_extra_gb: float

    @property
    def total_gb(self) -> float:
        return self.params_gb + self.grads_gb + self.optimizer_gb + self.activations_gb + self.panacea_extra_gb


def load_architecture(name: str):
    """The model's config: the architecture shipped for a paper model, else a local dir or the hub.

    A published model's architecture does not change, and shipping the three paper
    models' configs lets the plan be computed where the hub is unreachable.
    """
    from transformers import AutoConfig

    from panacea_platform.models import resolve_model_path

    shipped = resources.files("panacea_platform") / "architectures" / f"{name.replace('/', '--')}.json"
    if shipped.is_file():
        return AutoConfig.for_model(**json.loads(shipped.read_text())), "architecture shipped with the platform"
    return AutoConfig.from_pretrained(resolve_model_path(name)), "model config"


def count_model(name: str, target_modules: list[str], rank: int) -> ModelCounts:
    import torch
    from transformers import AutoModelForCausalLM

    config, source = load_architecture(name)
    # The meta device allocates nothing: a 9B model is counted in a second.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    trainable = 0
    largest = 0
    for module_name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, own)
        if module_name.split(".")[-1] in target_modules and hasattr(module, "in_features"):
            trainable += rank * (module.in_features + module.out_features)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelCounts(
        name=name,
        total_params=total + trainable,
        trainable_params=trainable,
        largest_layer_params=largest,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        kv_dim=kv_heads * head_dim,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        source=source,
    )


def activation_bytes(counts: ModelCounts, micro_batch: int, seq_len: int) -> int:
    """16-bit activations kept for backward, plus the logits and their fp32 loss copies."""
    h, i, kv = counts.hidden, counts.intermediate, counts.kv_dim
    # Per token and layer: norm inputs and outputs, q/k/v, attention output, o_proj input,
    # gate, up, act(gate) and their product: all 16-bit.
    per_token_layer = 2 * (6 * h + 2 * kv + 4 * i)
    layers = per_token_layer * counts.layers * micro_batch * seq_len
    # bf16 logits, their fp32 upcast for the loss, and the fp32 gradient of the logits.
    logits = micro_batch * seq_len * counts.vocab * (2 + 4 + 4)
    return layers + logits


def plan(counts: ModelCounts, gpus: int, stage: int, global_batch: int, seq_len: int) -> PlanRow:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    trainable = counts.trainable_params
    frozen = counts.total_params - trainable
    micro_batch = math.ceil(global_batch / gpus)
    if stage == 2:
        _, states = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=False)
        params = 2 * frozen + 2 * trainable  # every 16-bit weight on every GPU
    elif stage == 3:
        _, states, largest_layer = estimate_zero3_model_states_mem_needs(
            trainable, counts.largest_layer_params, num_gpus_per_node=gpus, cpu_offload=False
        )
        states -= largest_layer  # counted with the weights below
        params = math.ceil(2 * (frozen + trainable) / gpus) + largest_layer
    else:
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    # The estimators' 18 bytes per trainable weight, split as DeepSpeed's comment does:
    # 2 + 4 bytes of gradients (16-bit and fp32) and 4 + 8 of fp32 master weights and Adam moments.
    partitioned = states - (2 * trainable if stage == 2 else 0)
    grads = partitioned * 6 / 18
    optimizer = partitioned * 12 / 18
    panacea_extra = 3 * 4 * trainable + 2 * trainable
    return PlanRow(
        stage=stage,
        gpus=gpus,
        micro_batch=micro_batch,
        params_gb=params / GB,
        grads_gb=grads / GB,
        optimizer_gb=optimizer / GB,
        activations_gb=activation_bytes(counts, micro_batch, seq_len) / GB,
        panacea_extra_gb=panacea_extra / GB,
    )


# Each Panacea step runs three forward-backward passes (harmful gradient at w, harmful loss at w + eps,
# task loss at w); ZeRO-3 gathers the partitioned weights once for each forward and each backward.
GATHERS_PER_STEP = {"panacea": 6, "sft": 2}


def recommendation(rows: list[PlanRow], gpu_gb: float) -> str:
    """Which ZeRO stage to run and why: stage 2 wherever it fits, since LoRA's frozen weights are what
    stage 3 partitions, and stage 3 buys that memory with a gather of every layer on every pass."""
    fits = [r for r in rows if r.total_gb < gpu_gb * 0.9]
    zero2 = sorted((r for r in fits if r.stage == 2), key=lambda r: r.gpus)
    if zero2:
        smallest = zero2[0]
        return (f"recommended: ZeRO-2 (fits from {smallest.gpus} GPU{'s' if smallest.gpus > 1 else ''}). With LoRA the "
                f"frozen 16-bit weights ({smallest.params_gb:.1f} GiB) are the largest share of the memory, and ZeRO-3 would save "
                f"them only by gathering every layer for each forward and backward: {GATHERS_PER_STEP['panacea']} "
                f"gathers per Panacea step ({GATHERS_PER_STEP['sft']} per SFT step).")
    zero3 = sorted((r for r in fits if r.stage == 3), key=lambda r: r.gpus)
    if zero3:
        return (f"recommended: ZeRO-3 from {zero3[0].gpus} GPUs: ZeRO-2 does not fit on {gpu_gb:.0f} GB at any GPU "
                f"count shown; expect {GATHERS_PER_STEP['panacea']} gathers of the weights per Panacea step.")
    return f"recommended: none fits on {gpu_gb:.0f} GB; shorten the sequence, lower the batch or add GPUs."


def format_plan(counts: ModelCounts, rows: list[PlanRow], global_batch: int, seq_len: int, gpu_gb: float) -> str:
    lines = [
        f"{counts.name}: {counts.total_params / 1e9:.2f} B weights, {counts.trainable_params / 1e6:.1f} M trainable "
        f"(LoRA), largest layer {counts.largest_layer_params / 1e6:.0f} M ({counts.source})",
        f"global batch {global_batch}, sequence {seq_len} tokens, bf16 weights, fp32 Adam states; per GPU, GiB:",
        f"{'ZeRO':>4} {'GPUs':>4} {'micro':>5} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} "
        f"{'panacea+':>8} {'total':>7}  fits {gpu_gb:.0f} GB",
    ]
    for r in rows:
        fits = "yes" if r.total_gb < gpu_gb * 0.9 else "NO"
        lines.append(
            f"{r.stage:>4} {r.gpus:>4} {r.micro_batch:>5} {r.params_gb:>8.2f} {r.grads_gb:>7.3f} {r.optimizer_gb:>7.3f} "
            f"{r.activations_gb:>7.2f} {r.panacea_extra_gb:>8.3f} {r.total_gb:>7.2f}  {fits}"
        )
    uneven = sorted({r.gpus for r in rows if global_batch % r.gpus})
    if uneven:
        lines.append(
            f"note: batch {global_batch} does not split evenly over {uneven} GPUs; micro-batch shown is the "
            "largest shard (set optim.batch_size to a multiple of the GPU count)"
        )
    lines.append("'fits' leaves 10% for the CUDA context, allocator fragmentation and communication buffers.")
    lines.append(recommendation(rows, gpu_gb))
    return "\n".join(lines)
