"""Per-GPU memory of LoRA fine-tuning with the Panacea step under ZeRO-2 and ZeRO-3.

The platform's mixed precision (training/strategy/deepspeed.py): the frozen base weights in
model.dtype (bf16 for the paper's jobs), replicated under ZeRO-2 and partitioned under ZeRO-3 (plus
the largest layer gathered at a time); the LoRA weights in fp32, with fp32 gradients, and ZeRO's
fp32 partition of them plus Adam's two moments (12 bytes) partitioned over the GPUs. Activations
follow a per-token count for a pre-norm decoder with SwiGLU MLP and fused (SDPA) attention, so no
s^2 term, in the compute dtype. Panacea adds G, H and eps as full fp32 tensors and an fp32 copy of
the trainable weights to restore them from: a few copies of the LoRA weights.
memory_check.py measures one step and compares it with this plan.
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


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def activation_bytes(
    counts: ModelCounts, micro_batch: int, seq_len: int, weight_bytes: int = 2, compute_bytes: int = 2
) -> int:
    """Activations kept for backward, plus the logits and their fp32 loss copies.

    Per token and layer: the two norms' inputs and outputs (4h) stay in the residual stream's dtype
    (the weights'); q, the attention output, k and v, gate, up, act(gate) and their product
    (2h + 2kv + 4i) come out of matrix products in the compute dtype. Under autocast with fp32
    weights the norms' outputs are also kept as compute-dtype copies for the products' backward (2h).
    """
    h, i, kv = counts.hidden, counts.intermediate, counts.kv_dim
    per_token_layer = 4 * h * weight_bytes + (2 * h + 2 * kv + 4 * i) * compute_bytes
    if compute_bytes != weight_bytes:
        per_token_layer += 2 * h * compute_bytes
    layers = per_token_layer * counts.layers * micro_batch * seq_len
    # Logits in the compute dtype, their fp32 upcast for the loss, and the fp32 gradient of the logits.
    logits = micro_batch * seq_len * counts.vocab * (compute_bytes + 4 + 4)
    return layers + logits


def plan(
    counts: ModelCounts,
    gpus: int,
    stage: int,
    global_batch: int,
    seq_len: int,
    *,
    weight_dtype: str = "bfloat16",
    compute_dtype: str = "bfloat16",
    accumulation: int = 1,
) -> PlanRow:
    """One GPU's share; the micro-batch is the global batch over gpus x accumulation (the largest share)."""
    trainable = counts.trainable_params
    frozen = counts.total_params - trainable
    micro_batch = math.ceil(global_batch / (gpus * accumulation))
    weight = DTYPE_BYTES[weight_dtype]
    params: float
    grads: float
    if stage == 2:
        params = weight * frozen + 4 * trainable  # every weight on every GPU
        grads = 4 * trainable  # a full gradient before it is reduced into this GPU's partition
    elif stage == 3:
        params = math.ceil((weight * frozen + 4 * trainable) / gpus) + weight * counts.largest_layer_params
        grads = 4 * trainable / gpus
    else:
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    optimizer = 12 * trainable / gpus  # ZeRO's fp32 partition of the LoRA weights and Adam's two moments
    panacea_extra = 3 * 4 * trainable + 4 * trainable  # G, H, eps and the copy perturbed() restores from
    # bf16 weights compute in bf16 whatever compute_dtype says (autocast only lowers precision).
    compute = 2 if compute_dtype == "bfloat16" or weight_dtype == "bfloat16" else 4
    return PlanRow(
        stage=stage,
        gpus=gpus,
        micro_batch=micro_batch,
        params_gb=params / GB,
        grads_gb=grads / GB,
        optimizer_gb=optimizer / GB,
        activations_gb=activation_bytes(counts, micro_batch, seq_len, weight, compute) / GB,
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
        return (
            f"recommended: ZeRO-2 (fits from {smallest.gpus} GPU{'s' if smallest.gpus > 1 else ''}). With LoRA the "
            f"frozen base weights ({smallest.params_gb:.1f} GiB) are the largest share of the memory, and ZeRO-3 "
            "would save "
            f"them only by gathering every layer for each forward and backward: {GATHERS_PER_STEP['panacea']} "
            f"gathers per Panacea step ({GATHERS_PER_STEP['sft']} per SFT step)."
        )
    zero3 = sorted((r for r in fits if r.stage == 3), key=lambda r: r.gpus)
    if zero3:
        return (
            f"recommended: ZeRO-3 from {zero3[0].gpus} GPUs: ZeRO-2 does not fit on {gpu_gb:.0f} GB at any GPU "
            f"count shown; expect {GATHERS_PER_STEP['panacea']} gathers of the weights per Panacea step."
        )
    return f"recommended: none fits on {gpu_gb:.0f} GB; shorten the sequence, lower the batch or add GPUs."


def format_plan(
    counts: ModelCounts,
    rows: list[PlanRow],
    global_batch: int,
    seq_len: int,
    gpu_gb: float,
    weight_dtype: str = "bfloat16",
) -> str:
    lines = [
        f"{counts.name}: {counts.total_params / 1e9:.2f} B weights, {counts.trainable_params / 1e6:.1f} M trainable "
        f"(LoRA), largest layer {counts.largest_layer_params / 1e6:.0f} M ({counts.source})",
        f"global batch {global_batch}, sequence {seq_len} tokens, {weight_dtype} base weights, fp32 LoRA weights, "
        "gradients and Adam states; per GPU, GiB:",
        f"{'ZeRO':>4} {'GPUs':>4} {'micro':>5} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} "
        f"{'panacea+':>8} {'total':>7}  fits {gpu_gb:.0f} GB",
    ]
    for r in rows:
        fits = "yes" if r.total_gb < gpu_gb * 0.9 else "NO"
        lines.append(
            f"{r.stage:>4} {r.gpus:>4} {r.micro_batch:>5} {r.params_gb:>8.2f} {r.grads_gb:>7.3f} "
            f"{r.optimizer_gb:>7.3f} "
            f"{r.activations_gb:>7.2f} {r.panacea_extra_gb:>8.3f} {r.total_gb:>7.2f}  {fits}"
        )
    uneven = sorted({r.gpus for r in rows if global_batch % r.gpus})
    if uneven:
        lines.append(
            f"note: batch {global_batch} splits unevenly over {uneven} GPUs (shares weighted by their tokens, "
            "so the step is the same); micro-batch shown is the largest share"
        )
    lines.append(
        "'fits' leaves 10% for the CUDA context and allocator fragmentation. `panacea plan memory --measure` "
        "checks the plan against one measured step on this machine."
    )
    lines.append(recommendation(rows, gpu_gb))
    return "\n".join(lines)
