"""GPU check: the Panacea step against the SFT step under DeepSpeed ZeRO-2 on one GPU, and the
evaluation decoder against HF generate(), on a model of Llama-2-7B's shape with random weights.

    python -m panacea_platform.diagnostics.gpu_check [--json PATH]            # CUDA, paper sizes
    python -m panacea_platform.diagnostics.gpu_check --cpu-smoke [--model DIR]  # same code, tiny sizes, CPU

Only the model's shape is used (weights are always random), so nothing is downloaded. It measures:
a. median time of a Panacea step and an SFT step (DeepSpeed ZeRO-2, world size 1, bf16 base
   weights, fp32 LoRA), their ratio, and each one's peak GPU memory against memory_plan's plan;
b. greedy agreement and tokens/s of `evaluation.generation.generate` (the platform's KV-cache
   decoder, which generate() takes whenever greedy is a plain argmax) against HF's generate().
Progress lines go to stdout as it runs, then one table; `--json` writes the figures.

It imports what a PyTorch + transformers + peft + accelerate machine has, plus DeepSpeed, pydantic and
PyYAML (scripts/gpu_check.sh installs those): never mlflow or Ray (the table says so).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GIB = 1024**3
PAPER_MODEL = "meta-llama/Llama-2-7b-hf"
FIRST_ORDINARY_TOKEN = 4  # ids below are <unk>, <s>, </s>, <pad> in Llama-style vocabularies
EOS_MARK = -1  # stands for "the answer ended with EOS" when comparing answers


@dataclass
class Settings:
    model: str = PAPER_MODEL
    device: str = "cuda"
    dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    batch: int = 10
    harmful_batch: int = 10
    seq_len: int = 512
    grad_accum: int = 1
    warmup: int = 2
    timed: int = 5
    prompts: int = 16
    new_tokens: int = 64
    gen_repeats: int = 2
    prompt_min: int = 32
    prompt_max: int = 160
    shared_prefix: int = 24
    lora_rank: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    seed: int = 0
    budget_s: float = 360.0
    json: str | None = None


# What --cpu-smoke changes: a tiny model on CPU in float32, a few rows, a few tokens.
CPU_SMOKE = dict(
    device="cpu",
    dtype="float32",
    compute_dtype="float32",
    batch=4,
    harmful_batch=4,
    seq_len=32,
    warmup=1,
    timed=2,
    prompts=6,
    new_tokens=12,
    prompt_min=12,
    prompt_max=30,
    shared_prefix=10,
)


def parse_args(argv: list[str] | None = None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m panacea_platform.diagnostics.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on CPU in float32 (default model: a built-in tiny Llama)"
    )
    parser.add_argument("--model", help=f"architecture: shipped name, local dir or hub id (default {PAPER_MODEL})")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="base weights (LoRA stays fp32)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="training matmuls (default: --dtype)")
    for name in (
        "batch",
        "harmful_batch",
        "seq_len",
        "grad_accum",
        "warmup",
        "timed",
        "prompts",
        "new_tokens",
        "gen_repeats",
        "prompt_min",
        "prompt_max",
        "shared_prefix",
        "lora_rank",
        "seed",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, dest=name, help=f"default {getattr(defaults, name)}"
        )
    parser.add_argument(
        "--budget-s",
        type=float,
        dest="budget_s",
        help="soft time budget in seconds: past it, timed loops stop early and generation is "
        f"skipped (default {defaults.budget_s:.0f})",
    )
    parser.add_argument("--json", help="write the figures here as JSON")
    args = vars(parser.parse_args(argv))
    smoke = args.pop("cpu_smoke")
    given = {k: v for k, v in args.items() if v is not None}
    settings = Settings(**{**(CPU_SMOKE if smoke else {}), **given})
    if "compute_dtype" not in given and "dtype" in given:
        settings.compute_dtype = settings.dtype
    problem = settings_problem(settings)
    if problem:
        parser.error(problem)
    if smoke and "model" not in given:
        settings.model = str(tiny_architecture_dir())
    return settings


def settings_problem(s: Settings) -> str | None:
    """What is wrong with the sizes, before minutes go into building a model; None if nothing."""
    positive = (
        "batch",
        "harmful_batch",
        "seq_len",
        "grad_accum",
        "timed",
        "prompts",
        "new_tokens",
        "gen_repeats",
        "prompt_min",
        "lora_rank",
    )
    small = [n for n in positive if getattr(s, n) < 1] + [n for n in ("warmup", "shared_prefix") if getattr(s, n) < 0]
    if small:
        return f"--{small[0].replace('_', '-')} = {getattr(s, small[0])}: too small"
    if s.seq_len < 2:
        return "--seq-len must be at least 2 (a prompt token and an answer token)"
    if not s.shared_prefix < s.prompt_min <= s.prompt_max:
        return "need --shared-prefix < --prompt-min <= --prompt-max"
    return None


def tiny_architecture_dir() -> Path:
    """A config.json of a tiny Llama, so --cpu-smoke runs the same code path as a model directory."""
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    config = {
        "model_type": "llama",
        "vocab_size": 400,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def say(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the model and the one-rank group ----------------------------------------------------------------


def build_model(settings: Settings):
    """Random weights of the architecture, base in settings.dtype, LoRA attached (PEFT keeps it fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from panacea_platform.config import LoraConfig
    from panacea_platform.diagnostics.memory_plan import load_architecture
    from panacea_platform.models import attach_lora, silence_peft_deprecation

    config, source = load_architecture(settings.model)
    torch.manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    # Built straight on the device: a 7B model in bf16 never passes through host memory.
    with torch.device(settings.device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    silence_peft_deprecation()
    model = attach_lora(base, LoraConfig(rank=settings.lora_rank, target_modules=settings.lora_targets))
    count = sum(p.numel() for p in model.parameters())
    size = f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.2f} M"
    say(f"model {settings.model} ({source}), {size} weights, random init on {settings.device}")
    return model


@contextmanager
def one_rank_group(device: str) -> Iterator[None]:
    """A one-process torch.distributed group (nccl on CUDA, gloo on CPU), as a launcher would give."""
    from panacea_platform.training.strategy.deepspeed import single_rank_group

    with single_rank_group(device == "cuda"):
        yield


def deepspeed_weights(model, settings: Settings):
    """DeepSpeedWeights on a ZeRO-2 engine, built as DeepSpeedStrategy.prepare builds it."""
    import deepspeed

    from panacea_platform.config import ModelConfig, OptimConfig, RunConfig
    from panacea_platform.training.losses import training_loss
    from panacea_platform.training.schedule import make_optimizer
    from panacea_platform.training.strategy.deepspeed import DeepSpeedWeights, deepspeed_config

    steps = 2 * (settings.warmup + settings.timed)
    optim = OptimConfig(
        max_steps=steps,
        batch_size=settings.batch,
        harmful_batch_size=settings.harmful_batch,
        grad_accum_steps=settings.grad_accum,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, optim, steps)
    config = deepspeed_config(optim, 1, 2, dtype=settings.dtype, accumulation=settings.grad_accum)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    # training_loss reads model.compute_dtype: bf16 autocast around lm_loss, or lm_loss itself.
    run = RunConfig(model=ModelConfig(dtype=settings.dtype, compute_dtype=settings.compute_dtype))
    return DeepSpeedWeights(engine, training_loss(run), accumulation=settings.grad_accum)


# -- a. Panacea against SFT -------------------------------------------------------------------------


def random_batch(generator, rows: int, seq_len: int, vocab: int, device: str) -> dict:
    """Random token ids; the first quarter of each row is a prompt (label -100), the rest the answer."""
    import torch

    input_ids = torch.randint(FIRST_ORDINARY_TOKEN, vocab, (rows, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : max(1, seq_len // 4)] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class StepTiming:
    seconds: list[float]
    peak_gib: float | None
    losses: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_steps(step: Callable[[], float], settings: Settings, deadline: float) -> StepTiming:
    """Warm-up steps, then timed ones (at least one; no new one once past the deadline), with the
    peak memory of the whole block (reset at its start)."""
    import torch

    cuda = settings.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [step() for _ in range(settings.warmup)]
    seconds: list[float] = []
    for index in range(settings.timed):
        if index and time.monotonic() > deadline:
            say(f"time budget reached: {index} timed steps instead of {settings.timed}")
            break
        synchronize(settings.device)
        started = time.perf_counter()
        losses.append(step())
        synchronize(settings.device)
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    return StepTiming(seconds, peak, losses)


def measure_training(model, settings: Settings, deadline: float) -> dict[str, Any]:
    import torch

    from panacea_platform.config import RunConfig
    from panacea_platform.diagnostics.steps import registered_step

    config = RunConfig()  # each defence's default settings, as the registry builds it
    panacea = config.panacea
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(settings.seed)
    batch = random_batch(generator, settings.batch, settings.seq_len, vocab, settings.device)
    harmful = random_batch(generator, settings.harmful_batch, settings.seq_len, vocab, settings.device)
    weights = deepspeed_weights(model, settings)
    lora_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in weights.params})
    say(f"DeepSpeed ZeRO-{weights.stage} engine ready; LoRA weights {', '.join(lora_dtypes)}")
    try:
        say(
            f"SFT: {settings.warmup} warm-up + {settings.timed} timed steps, "
            f"batch {settings.batch} x {settings.seq_len} tokens"
        )
        sft_step = registered_step(config, "sft", weights, batch, harmful, settings.warmup + settings.timed)
        sft = time_steps(lambda: sft_step()["task_loss"], settings, deadline)
        say(f"SFT median {sft.median:.3f} s")
        say(f"Panacea (rho {panacea.rho}, lambda {panacea.lam}, clamp {panacea.harmful_loss_clamp}): same counts")
        last: list[dict[str, float]] = []
        panacea_step = registered_step(config, "panacea", weights, batch, harmful, settings.warmup + settings.timed)

        def step() -> float:
            last[:] = [panacea_step()]
            return last[0]["task_loss"]

        pan = time_steps(step, settings, deadline)
        # A random model's harmful loss (about ln vocab) is above the clamp: the third pass then gives a zero
        # gradient, but it is computed all the same, so the timing holds.
        r = last[0]
        say(
            f"Panacea median {pan.median:.3f} s; last step: task loss {r['task_loss']:.3f}, harmful loss "
            f"{r['harmful_loss']:.3f}, at w + eps {r['harmful_loss_perturbed']:.3f}, |eps| {r['eps_norm']:.3f}"
        )
    finally:
        weights.engine.destroy()
    return {"sft": sft, "panacea": pan, "lora_dtypes": lora_dtypes}


def planned_memory(settings: Settings) -> tuple[float, float]:
    """memory_plan's GiB for one GPU under ZeRO-2: (SFT, Panacea). The plan's micro-batch is the rows
    of one pass (batch / grad_accum); SFT's leaves out Panacea's extra copies of the LoRA weights."""
    from panacea_platform.diagnostics.memory_plan import count_model, plan

    counts = count_model(settings.model, settings.lora_targets, settings.lora_rank)
    micro = math.ceil(settings.batch / settings.grad_accum)
    row = plan(counts, gpus=1, stage=2, global_batch=micro, seq_len=settings.seq_len)
    return row.total_gb - row.panacea_extra_gb, row.total_gb


# -- b. the evaluation decoder against HF generate() ------------------------------------------------


class IdTokenizer:
    """Text is token ids written out ("5 17 9"): generate() runs as evaluation calls it, and its
    answers' text gives back the exact ids the decoder chose."""

    bos_token_id = None  # so encode_prompt adds no BOS: the ids are the prompt

    def __init__(self, eos_token_id: int, pad_token_id: int | None) -> None:
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(token) for token in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(token)) for token in ids)


def decoder_prompts(settings: Settings, vocab: int) -> list[list[int]]:
    """A shared preamble (as a prompt template gives) and rows of different lengths after it."""
    import torch

    generator = torch.Generator().manual_seed(settings.seed + 1)

    def draw(n: int) -> list[int]:
        return torch.randint(FIRST_ORDINARY_TOKEN, vocab, (n,), generator=generator).tolist()

    preamble = draw(settings.shared_prefix)
    lengths = torch.randint(settings.prompt_min, settings.prompt_max + 1, (settings.prompts,), generator=generator)
    return [preamble + draw(max(1, int(n) - settings.shared_prefix)) for n in lengths]


def hf_greedy(model, rows: list[list[int]], max_new_tokens: int, eos_ids: list[int], pad_id: int) -> list[list[int]]:
    """HF's generate(), greedy, on left-padded rows (the evaluation's own reference path), cut at the end token."""
    from panacea_platform.evaluation.generation import hf_generate

    return [cut_at_eos(row, eos_ids) for row in hf_generate(model, rows, max_new_tokens, eos_ids, pad_id)]


def cut_at_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position] + [EOS_MARK]
    return ids


def platform_greedy(model, tokenizer, rows: list[list[int]], max_new_tokens: int, max_batch_tokens) -> list[list[int]]:
    """evaluation.generation.generate as the evaluation actor calls it (one batch of all prompts)."""
    from panacea_platform.evaluation.generation import generate

    prompts = [" ".join(map(str, row)) for row in rows]
    answers = generate(
        model, tokenizer, prompts, max_new_tokens, batch_size=len(prompts), max_batch_tokens=max_batch_tokens
    )
    return [[int(t) for t in a.text.split()] + ([] if a.truncated else [EOS_MARK]) for a in answers]


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of prompts with identical answers, mean common-prefix share of the longer answer)."""
    identical = sum(a == b for a, b in zip(ours, reference)) / len(reference)
    shares = []
    for a, b in zip(ours, reference):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(common / max(len(a), len(b)) if (a or b) else 1.0)
    return identical, statistics.mean(shares)


def timed(device: str, run: Callable[[], Any]) -> tuple[Any, float]:
    synchronize(device)
    started = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - started


def measure_generation(model, settings: Settings) -> dict[str, Any]:
    import gc

    import torch

    from panacea_platform.config import EvaluationConfig
    from panacea_platform.evaluation.generation import eos_token_ids, plain_cache_layers, plain_greedy

    model.eval()
    if settings.device == "cuda":
        gc.collect()  # whatever training left (all of it, after an out-of-memory error) goes first
        torch.cuda.empty_cache()
    config = model.config
    eos_ids = eos_token_ids(model, IdTokenizer(config.eos_token_id, None))
    tokenizer = IdTokenizer(eos_ids[0], config.pad_token_id)
    pad_id = config.pad_token_id if config.pad_token_id is not None else eos_ids[0]
    max_batch_tokens = EvaluationConfig.model_fields["generation_max_batch_tokens"].default
    # generate() takes the platform's decoder only for plain greedy on plain cache layers; otherwise
    # it falls back to HF generate() and this comparison would be HF against itself.
    ours_path = plain_greedy(model) and plain_cache_layers(model)
    path = "platform KV-cache decoder" if ours_path else "HF generate() fallback"
    rows = decoder_prompts(settings, config.vocab_size)
    say(
        f"generation: {len(rows)} prompts of {min(map(len, rows))}-{max(map(len, rows))} tokens x "
        f"{settings.new_tokens} new tokens; generate() takes the {path}"
    )
    # One short call of each first: CUDA kernels and caches are set up outside the timing.
    platform_greedy(model, tokenizer, rows[:4], 4, max_batch_tokens)
    hf_greedy(model, rows[:4], 4, eos_ids, pad_id)
    # Alternating repeats, fastest kept: a one-time cost of the first full-size call counts against neither.
    ours_s, theirs_s = math.inf, math.inf
    new = settings.new_tokens
    for _ in range(settings.gen_repeats):
        ours, seconds = timed(settings.device, lambda: platform_greedy(model, tokenizer, rows, new, max_batch_tokens))
        ours_s = min(ours_s, seconds)
        theirs, seconds = timed(settings.device, lambda: hf_greedy(model, rows, new, eos_ids, pad_id))
        theirs_s = min(theirs_s, seconds)
    identical, prefix = agreement(ours, theirs)
    ours_tokens, theirs_tokens = sum(map(len, ours)), sum(map(len, theirs))
    say(
        f"platform {ours_tokens / ours_s:.1f} tokens/s, HF {theirs_tokens / theirs_s:.1f} tokens/s, "
        f"identical answers {identical:.3f}"
    )
    return {
        "path": path,
        "prompts": len(rows),
        "identical": identical,
        "common_prefix": prefix,
        "platform_tokens": ours_tokens,
        "platform_s": ours_s,
        "platform_tokens_per_s": ours_tokens / ours_s,
        "hf_tokens": theirs_tokens,
        "hf_s": theirs_s,
        "hf_tokens_per_s": theirs_tokens / theirs_s,
    }


# -- the report --------------------------------------------------------------------------------------


def environment(settings: Settings) -> dict[str, str]:
    import deepspeed
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if settings.device == "cuda" else "cpu"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, deepspeed {deepspeed.__version__}",
    }


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def gib(value: float | None) -> str:
    # A tiny model's plan is a few MiB: more digits there, so it never reads as 0.00.
    return number(value, 2 if value is None or value >= 1 else 4)


def figures(
    settings: Settings,
    env: dict,
    training: dict | None,
    plan: tuple[float, float] | None,
    gen: dict | None,
    errors: dict[str, str],
) -> dict:
    """Every figure of the run, as the JSON file holds them; a failed phase's figures are None."""
    out: dict[str, Any] = {**env, "settings": asdict(settings), "errors": errors}
    out["lora_dtypes"] = training["lora_dtypes"] if training else []
    for index, name in enumerate(("sft", "panacea")):
        timing, planned = training[name] if training else None, plan[index] if plan else None
        measured = timing.peak_gib if timing else None
        out[name] = {
            "seconds": timing.seconds if timing else [],
            "median_s": timing.median if timing else None,
            "losses": timing.losses if timing else [],
            "peak_gib": measured,
            "planned_gib": planned,
            "measured_over_planned": measured / planned if measured is not None and planned else None,
        }
    medians = (out["sft"]["median_s"], out["panacea"]["median_s"])
    out["panacea_over_sft"] = medians[1] / medians[0] if None not in medians else None
    losses = out["sft"]["losses"] + out["panacea"]["losses"]
    out["losses_finite"] = all(math.isfinite(x) for x in losses) if losses else None
    out["generation"] = gen
    out["mlflow_or_ray_imported"] = unwanted_imported()
    return out


def table_rows(f: dict) -> list[tuple[str, str, str]]:
    s = f["settings"]
    # Words go in the note column, so the value column stays a narrow column of figures.
    rows = [
        ("date", "", f["date"]),
        ("device", "", f["device"]),
        ("versions", "", f["versions"]),
        (
            "model (random weights)",
            "",
            f"{s['model']}: {s['dtype']} base, LoRA r{s['lora_rank']} "
            f"{'/'.join(s['lora_targets'])} in {'/'.join(f['lora_dtypes']) or '?'}, compute {s['compute_dtype']}",
        ),
        (
            "training",
            "",
            f"DeepSpeed ZeRO-2, 1 rank; batch {s['batch']} (harmful {s['harmful_batch']}) x "
            f"{s['seq_len']} tokens, grad_accum {s['grad_accum']}",
        ),
    ]
    for name, label in (("sft", "SFT"), ("panacea", "Panacea")):
        part = f[name]
        rows += [
            (f"{label} step, median of {len(part['seconds'])}", number(part["median_s"]), "s"),
            (f"{label} peak memory, measured", gib(part["peak_gib"]), "GiB (max_memory_allocated)"),
            (f"{label} peak memory, planned", gib(part["planned_gib"]), "GiB (memory_plan, ZeRO-2, 1 GPU)"),
            (f"{label} peak memory, measured/planned", number(part["measured_over_planned"], 2), ""),
        ]
    rows += [
        ("Panacea / SFT step time", number(f["panacea_over_sft"], 2), "x"),
        ("step losses finite", "", {True: "yes", False: "NO", None: "n/a"}[f["losses_finite"]]),
    ]
    rows += generation_rows(f["generation"], s, failed="generation" in f["errors"])
    imported = f["mlflow_or_ray_imported"]
    rows += [("mlflow or ray imported", "", ("YES: " + ", ".join(imported)) if imported else "no")]
    rows += [(f"FAILED: {phase}", "", message) for phase, message in f["errors"].items()]
    rows += [("wall time", number(f["wall_s"], 0), "s")]
    return rows


def generation_rows(gen: dict | None, s: dict, failed: bool) -> list[tuple[str, str, str]]:
    if gen is None:
        return [("generation", "", "failed (below)" if failed else "skipped: time budget reached")]
    best = f"best of {s['gen_repeats']}"
    return [
        ("generate() decoder", "", f"{gen['path']}; {gen['prompts']} prompts x {s['new_tokens']} new tokens"),
        ("greedy answers identical to HF", number(gen["identical"]), "share of prompts"),
        ("mean common prefix with HF", number(gen["common_prefix"]), "share of the longer answer"),
        (
            "platform decoder",
            number(gen["platform_tokens_per_s"], 1),
            f"tokens/s ({gen['platform_tokens']} in {gen['platform_s']:.2f} s, {best})",
        ),
        (
            "HF generate()",
            number(gen["hf_tokens_per_s"], 1),
            f"tokens/s ({gen['hf_tokens']} in {gen['hf_s']:.2f} s, {best})",
        ),
        ("platform / HF speed", number(gen["platform_tokens_per_s"] / gen["hf_tokens_per_s"], 2), "x"),
    ]


def format_table(rows: list[tuple[str, str, str]]) -> str:
    header = ("figure", "value", "unit / note")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(2)]

    def line(r: tuple[str, ...]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}".rstrip()

    rule = "-" * (widths[0] + widths[1] + 2 + 2 + max(len(r[2]) for r in [header, *rows]))
    return "\n".join([rule, line(header), rule, *map(line, rows), rule])


# -- main --------------------------------------------------------------------------------------------


UNWANTED_MODULES = ("mlflow", "ray")


def block_unwanted_imports() -> None:
    """Make `import mlflow` / `import ray` fail in this process, unless already imported.

    `import deepspeed` imports mlflow wherever it is installed (deepspeed/autotuning/autotuner.py
    tries it; the package's __init__ loads the autotuner), so on a machine with mlflow any DeepSpeed
    import pulls it in. DeepSpeed only tries it (ImportError -> has_mlflow False), and nothing here
    needs either package: blocking them keeps this process the same with or without them installed,
    and an unconditional import of them on this check's path fails loudly instead of passing unseen.
    """
    for name in UNWANTED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None in sys.modules: import raises ImportError


def unwanted_imported() -> list[str]:
    return [name for name in UNWANTED_MODULES if sys.modules.get(name) is not None]


def prepare_environment(settings: Settings) -> None:
    """Before transformers or DeepSpeed load: nothing online, DeepSpeed on the chosen device."""
    block_unwanted_imports()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", settings.device)
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: CUDA is not available (torch.cuda.is_available() is False); "
            "use --cpu-smoke or --device cpu to run on the CPU"
        )
    import logging

    # DeepSpeed logs every engine setting at INFO; the progress lines say what matters.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def run_phase(name: str, errors: dict[str, str], run: Callable[[], Any]) -> Any:
    """One part of the check; a failure is reported and recorded, and the other parts still run
    (a GPU is lent briefly: one failing part should not cost the figures of the others)."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - any failure of a part is a finding, not a reason to stop
        traceback.print_exc()
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        say(f"{name} FAILED: {errors[name]}")
        return None


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.monotonic()
    deadline = started + settings.budget_s
    prepare_environment(settings)
    say(f"start: {settings.model} on {settings.device}, {settings.dtype} base weights")
    env = environment(settings)
    errors: dict[str, str] = {}
    plan = run_phase("memory plan", errors, lambda: planned_memory(settings))
    model = build_model(settings)

    def training() -> dict[str, Any]:
        with one_rank_group(settings.device):
            return measure_training(model, settings, deadline)

    trained = run_phase("training steps", errors, training)
    gen = None
    if time.monotonic() < deadline:
        gen = run_phase("generation", errors, lambda: measure_generation(model, settings))
    else:
        say("time budget reached: generation skipped")
    result = figures(settings, env, trained, plan, gen, errors)
    result["wall_s"] = time.monotonic() - started
    if settings.json:
        Path(settings.json).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.json).write_text(json.dumps(result, indent=2))
        say(f"figures written to {settings.json}")
    print(format_table(table_rows(result)), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
