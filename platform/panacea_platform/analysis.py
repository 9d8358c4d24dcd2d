"""Layer-wise analysis of a Panacea perturbation: where does eps go?

The paper observes that the optimised eps is not spread evenly: some layers
("safety-affine" ones) receive much more of it than others. For each LoRA
module of a run this module reports

- ||eps|| / ||w||: the perturbation against the LoRA weights it is added to;
- ||dW|| / ||W_base||: the change eps makes to the merged weight,
  dW = s((B + eB)(A + eA) - BA) with s = alpha / r, against the frozen base
  weight (when the base model's safetensors can be read locally),

and aggregates both per layer and per module type, as a table, a CSV and a plot.
Everything is read from files (adapter_unperturbed/, perturbation.safetensors
and the base model's safetensors), so it works for any run of any model.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$")
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ModuleNorms:
    module: str  # base-model module path, e.g. model.layers.3.self_attn.q_proj
    layer: int | None  # transformer block index (None for modules outside the blocks)
    kind: str  # module type: q_proj, down_proj, ...
    eps_norm: float
    lora_norm: float
    relative_to_lora: float  # ||eps|| / ||w_lora||
    merged_change: float | None  # ||dW|| (None without base weights)
    relative_to_base: float | None  # ||dW|| / ||W_base||


def _module_path(key: str) -> tuple[str, str] | None:
    """(base-model module path, 'A' or 'B') of a LoRA weight key, else None.

    Keys come as PEFT names them in memory (...q_proj.lora_A.default.weight) or in a
    saved adapter (...q_proj.lora_A.weight), both under "base_model.model.".
    """
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    module = match["module"]
    if module.startswith("base_model.model."):
        module = module[len("base_model.model.") :]
    return module, match["which"]


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _module_path(key)
        if parsed is not None:
            out.setdefault(parsed[0], {})[parsed[1]] = tensor.float()
    return out


def module_norms(
    eps: dict[str, torch.Tensor],
    lora: dict[str, torch.Tensor],
    scale: float,
    base_weight: Callable[[str], torch.Tensor | None] | None = None,
) -> list[ModuleNorms]:
    """Norms of eps per LoRA module; `base_weight(module_path)` returns W_base or None."""
    eps_by_module, lora_by_module = _pairs(eps), _pairs(lora)
    missing = sorted(set(eps_by_module) - set(lora_by_module))
    if missing:
        raise ValueError(f"the perturbation names LoRA modules the adapter lacks, e.g. {missing[0]}")
    rows = []
    for module in sorted(eps_by_module, key=_sort_key):
        e, w = eps_by_module[module], lora_by_module[module]
        eps_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in e.values()))
        lora_norm = math.sqrt(sum(float(w[k].pow(2).sum()) for k in e))
        merged = relative_base = None
        base = base_weight(module) if base_weight is not None else None
        if base is not None and {"A", "B"} <= set(w):
            a, b = w["A"], w["B"]
            a_new, b_new = a + e.get("A", 0 * a), b + e.get("B", 0 * b)
            change = scale * (b_new @ a_new - b @ a)
            merged = float(change.norm())
            relative_base = merged / max(float(base.float().norm()), 1e-12)
        layer = _LAYER.search(f".{module}.")
        rows.append(
            ModuleNorms(
                module=module,
                layer=int(layer.group(1)) if layer else None,
                kind=module.rsplit(".", 1)[-1],
                eps_norm=eps_norm,
                lora_norm=lora_norm,
                relative_to_lora=eps_norm / max(lora_norm, 1e-12),
                merged_change=merged,
                relative_to_base=relative_base,
            )
        )
    return rows


def _sort_key(module: str) -> tuple[int, str]:
    layer = _LAYER.search(f".{module}.")
    return (int(layer.group(1)) if layer else 1 << 30, module)


@dataclass(frozen=True)
class GroupNorms:
    group: str  # "layer 3" or a module type
    eps_norm: float
    relative_to_lora: float
    relative_to_base: float | None


def aggregate(rows: list[ModuleNorms], by: str) -> list[GroupNorms]:
    """Group norms per layer ('layer') or per module type ('kind'): sqrt of summed squares, then ratios."""
    if by not in ("layer", "kind"):
        raise ValueError(f"by must be 'layer' or 'kind', got {by!r}")
    groups: dict[object, list[ModuleNorms]] = {}
    for row in rows:
        groups.setdefault(getattr(row, by), []).append(row)

    def order(key: object) -> tuple[int, str]:
        return (key if isinstance(key, int) else 1 << 30, str(key))

    out = []
    for key in sorted(groups, key=order):
        members = groups[key]
        eps = math.sqrt(sum(r.eps_norm**2 for r in members))
        lora = math.sqrt(sum(r.lora_norm**2 for r in members))
        base = None
        measured = [(r.merged_change, r.relative_to_base) for r in members]
        if all(change is not None and ratio is not None for change, ratio in measured):
            # Group ratio ||dW|| / ||W_base|| over the group's matrices together.
            pairs = [(float(change or 0.0), float(ratio or 0.0)) for change, ratio in measured]
            changes = math.sqrt(sum(change**2 for change, _ in pairs))
            bases = math.sqrt(sum((change / ratio) ** 2 for change, ratio in pairs if ratio))
            base = changes / bases if bases else 0.0
        label = f"layer {key}" if by == "layer" and key is not None else str(key if key is not None else "other")
        out.append(GroupNorms(label, eps, eps / max(lora, 1e-12), base))
    return out


def _base_weight_reader(model_path: str | Path | None):
    """module path -> base weight tensor, from a local model folder's safetensors; None if unreadable."""
    if model_path is None or not Path(model_path).is_dir():
        return None
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    handles = [safe_open(str(f), framework="pt") for f in files]
    index = {key: handle for handle in handles for key in handle.keys()}

    def read(module: str):
        # A LoRA on model.layers.0.self_attn.q_proj perturbs model.layers.0.self_attn.q_proj.weight.
        handle = index.get(f"{module}.weight")
        return handle.get_tensor(f"{module}.weight") if handle is not None else None

    return read


def analyse_run(run_dir: str | Path, model_path: str | Path | None = None) -> list[ModuleNorms]:
    """Module norms of a finished run with a perturbation (adapter_unperturbed/ + perturbation.safetensors)."""
    from safetensors.torch import load_file

    from panacea_platform.models import PERTURBATION_FILE

    run_dir = Path(run_dir)
    eps_file, adapter = run_dir / PERTURBATION_FILE, run_dir / "adapter_unperturbed"
    if not eps_file.is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{run_dir}: no {PERTURBATION_FILE} with adapter_unperturbed/ (only defences that add eps after "
            "training, e.g. panacea and random_perturbation, have a layer-wise analysis)"
        )
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    scale = float(adapter_config.get("lora_alpha", 1)) / float(adapter_config.get("r", 1))
    return module_norms(
        load_file(str(eps_file)),
        load_file(str(adapter / "adapter_model.safetensors")),
        scale,
        _base_weight_reader(model_path),
    )


def format_layer_table(rows: list[ModuleNorms]) -> str:
    """Per layer and per module type: ||eps||, ||eps||/||w_lora||, ||dW||/||W_base||."""
    lines = [f"{'group':<14}{'||eps||':>12}{'/||w_lora||':>14}{'||dW||/||W||':>16}"]
    for title, by in (("per layer", "layer"), ("per module type", "kind")):
        lines.append(f"-- {title}")
        for group in aggregate(rows, by):
            base = f"{group.relative_to_base:>16.3e}" if group.relative_to_base is not None else f"{'-':>16}"
            lines.append(f"{group.group:<14}{group.eps_norm:>12.4f}{group.relative_to_lora:>14.4f}{base}")
    return "\n".join(lines)


def write_layer_analysis(rows: list[ModuleNorms], out_dir: str | Path, title: str) -> list[Path]:
    """layerwise_eps.csv (every module), layerwise_eps.txt (the grouped table) and layerwise_eps.png."""
    from panacea_platform.plots import plot_layerwise_perturbation

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "layerwise_eps.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ModuleNorms.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    table_path = out_dir / "layerwise_eps.txt"
    table_path.write_text(format_layer_table(rows) + "\n")
    plot_path = plot_layerwise_perturbation(rows, title, out_dir / "layerwise_eps.png")
    return [csv_path, table_path, plot_path]
