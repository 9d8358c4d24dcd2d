"""Where silence comes from: the probability that a model ends its answer at the first token.

An empty answer is a model whose first new token is an end token (end of sequence, or the chat
template's end of turn). Its probability, read from one forward pass per prompt, is a continuous
measure of "goes silent" that greedy answers only show as a step: P(end first) = sum over the end
ids of softmax(logits at the prompt's last position).

`probe_run` reads it for a released model of the main job on the helpfulness, over-refusal and
harmful prompts, at w_T and, where a perturbation was added, at w_T + eps_T; and, per transformer
layer, with eps added to that layer's weights alone (which layers' eps carry the silence).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from panacea_platform.config import RunConfig

__all__ = ["FirstTokenProbe", "end_probabilities", "format_probes", "probe_run"]

# The suites probed, when the job evaluates them: where a muted model and a safe one differ.
PROBED_SUITES = ("helpfulness", "over_refusal", "harmful")
# Prompts of the per-layer pass (the first of the helpfulness suite): one forward over them per layer.
LAYER_PROMPTS = 16
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def end_probabilities(
    model: Any, tokenizer: Any, rendered: Sequence[str], end_ids: Sequence[int], batch_size: int = 16
) -> list[float]:
    """P(first answer token is an end token | prompt), one per rendered prompt, in fp32.

    Prompts are encoded as generation encodes them and left-padded, with position ids that skip the
    padding, so a prompt's probability does not depend on its batch-mates (tested to 1e-5).
    """
    from panacea_platform.evaluation.generation import encode_prompt

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    return end_probabilities_of_rows(
        model, [encode_prompt(tokenizer, text) for text in rendered], end_ids, pad, batch_size
    )


def end_probabilities_of_rows(
    model: Any, rows: Sequence[Sequence[int]], end_ids: Sequence[int], pad: int, batch_size: int = 16
) -> list[float]:
    """end_probabilities on prompts already encoded (token id rows)."""
    import torch

    device = model.get_input_embeddings().weight.device
    ends = torch.tensor(list(end_ids), dtype=torch.long, device=device)
    found: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in batch], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
            positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
            found += torch.softmax(logits.float(), dim=-1)[:, ends].sum(dim=-1).tolist()
    model.train(was_training)
    return found


def heldout_probe_rows(tokenizer: Any, template: str, count: int = LAYER_PROMPTS) -> list[list[int]]:
    """The prompts of the training-time probe (optim.eval_every): the first `count` held-out open requests
    (the helpfulness suite's), encoded as generation encodes them. Measured, never trained on."""
    from panacea_platform.data.prompt_sets import open_requests
    from panacea_platform.data.templates import render_prompt
    from panacea_platform.evaluation.generation import encode_prompt

    return [encode_prompt(tokenizer, render_prompt(template, e.prompt)) for e in open_requests("eval")[:count]]


@dataclass
class FirstTokenProbe:
    """Mean P(end first) per suite at w_T and at w_T + eps_T, and per layer with eps on that layer alone."""

    key: str
    method: str
    seed: int
    unperturbed: dict[str, float]  # suite -> mean P(end first) at w_T
    perturbed: dict[str, float] = field(default_factory=dict)  # at w_T + eps_T (empty without eps)
    layer_prompts: int = 0
    layer_base: float | None = None  # mean over the per-layer prompts at w_T
    by_layer: dict[int, float] = field(default_factory=dict)  # layer -> mean with eps on that layer only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: first_end/{suite}/unperturbed|released, first_end/layer_{l}_delta."""
        out = {f"first_end/{suite}/unperturbed": value for suite, value in self.unperturbed.items()}
        out.update({f"first_end/{suite}/released": value for suite, value in self.perturbed.items()})
        if self.layer_base is not None:
            out.update(
                {
                    f"first_end/layer_{layer:02d}_delta": value - self.layer_base
                    for layer, value in self.by_layer.items()
                }
            )
        return out


def _eps_by_layer(eps: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in eps.items():
        match = _LAYER.search(f".{name}.")
        if match:
            layers.setdefault(int(match.group(1)), {})[name] = tensor
    return layers


def _add(model: Any, delta: dict[str, torch.Tensor], sign: float) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in delta.items():
            params[name].add_(sign * tensor.to(params[name].dtype))


def probe_run(
    config: RunConfig, key: str, method: str, adapter_dir: Path, perturbation: Path | None, per_layer: bool = True
) -> FirstTokenProbe:
    """The probe of one released model: `adapter_dir` holds w_T (a run's adapter_unperturbed/, or the adapter
    when nothing was added), `perturbation` eps_T or None."""
    from safetensors.torch import load_file

    from panacea_platform.algorithms.convention import with_convention
    from panacea_platform.data.templates import render_prompt
    from panacea_platform.evaluation.pipeline import load_eval_model
    from panacea_platform.evaluation.suites import suite_examples
    from panacea_platform.models import end_token_ids, load_tokenizer

    config = with_convention(config)
    tokenizer = load_tokenizer(config.model)
    model = load_eval_model(config.model, adapter_dir)
    ends = end_token_ids(tokenizer, "the first-token probe (model.name)", model)
    suites = {s.name: s for s in config.evaluation.suites if s.name in PROBED_SUITES}
    prompts = {
        name: [render_prompt(config.data.prompt_template, e.prompt) for e in suite_examples(config, s)]
        for name, s in suites.items()
    }

    def mean_over(texts: list[str]) -> float:
        return statistics.fmean(end_probabilities(model, tokenizer, texts, ends))

    probe = FirstTokenProbe(key, method, config.seed, {name: mean_over(texts) for name, texts in prompts.items()})
    if perturbation is None:
        return probe
    eps = load_file(str(perturbation))
    _add(model, eps, 1.0)
    probe.perturbed = {name: mean_over(texts) for name, texts in prompts.items()}
    _add(model, eps, -1.0)
    layer_texts = prompts.get("helpfulness", next(iter(prompts.values()), []))[:LAYER_PROMPTS]
    if per_layer and layer_texts:
        probe.layer_prompts, probe.layer_base = len(layer_texts), mean_over(layer_texts)
        for layer, delta in sorted(_eps_by_layer(eps).items()):
            _add(model, delta, 1.0)
            probe.by_layer[layer] = mean_over(layer_texts)
            _add(model, delta, -1.0)
    return probe


def format_probes(probes: Sequence[FirstTokenProbe]) -> str:
    """P(end first) per method and suite, at w_T and as released (mean over seeds), and the layers whose eps
    alone raise it most."""
    if not probes:
        return ""
    by_method: dict[str, list[FirstTokenProbe]] = {}
    for probe in probes:
        by_method.setdefault(probe.method, []).append(probe)
    suites = list(dict.fromkeys(s for p in probes for s in p.unperturbed))
    label = max(28, *(len(m) + 2 for m in by_method))
    header = f"{'first token = end, %':<{label}}" + "".join(f"{s + ' w_T':>20}{s + ' released':>24}" for s in suites)
    lines = [header, "-" * len(header)]
    for method, members in by_method.items():
        cells: list[str] = []
        for suite in suites:
            for values in ([p.unperturbed.get(suite) for p in members], [p.perturbed.get(suite) for p in members]):
                present = [v for v in values if v is not None]
                width = 20 if len(cells) % 2 == 0 else 24
                cells.append(f"{100 * statistics.fmean(present):>{width}.2f}" if present else f"{'-':>{width}}")
        lines.append(f"{method:<{label}}" + "".join(cells))
    lines.append(
        "mean over seeds of the mean P(first new token is an end token) over each suite's prompts; "
        "released = w_T + eps_T where the method adds one, else w_T."
    )
    for method, members in by_method.items():
        layered = [p for p in members if p.by_layer and p.layer_base is not None]
        if not layered:
            continue
        deltas = {
            layer: statistics.fmean(p.by_layer[layer] - (p.layer_base or 0.0) for p in layered if layer in p.by_layer)
            for layer in layered[0].by_layer
        }
        top = sorted(deltas.items(), key=lambda item: -item[1])[:5]
        lines.append(
            f"{method}: eps on one layer alone, change in P(end first) on {layered[0].layer_prompts} "
            "helpfulness prompts (points, largest 5): "
            + ", ".join(f"layer {layer} {100 * delta:+.2f}" for layer, delta in top)
            + f"; all layers summed {100 * sum(deltas.values()):+.2f}"
        )
    return "\n".join(lines)


def save_probes(probes: Sequence[FirstTokenProbe], path: Path) -> Path:
    path.write_text(json.dumps([p.to_json() for p in probes], indent=2))
    return path
