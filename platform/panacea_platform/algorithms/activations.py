"""Where defences read and change a model's hidden states: forward hooks on named kinds of block.

Vaccine perturbs each attention block's output, RepNoise reads each MLP's output, Antidote reads the
input of each LoRA factor. Blocks are found by their names in the module tree (Llama, Qwen2, Gemma2,
Mistral and SmolLM all name them `layers.N.self_attn` and `layers.N.mlp`), so no model class is
imported: the authors' code matched attention classes and failed on a model it did not list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from panacea_platform.algorithms.interface import unwrap

BLOCK_PATTERNS = {
    "attention": re.compile(r"(^|\.)layers\.\d+\.self_attn$"),
    "mlp": re.compile(r"(^|\.)layers\.\d+\.mlp$"),
}


def blocks(model: Any, kind: str) -> list[torch.nn.Module]:
    """The model's blocks of `kind` ('attention' or 'mlp'), in layer order; an error if there are none."""
    pattern = BLOCK_PATTERNS[kind]
    found = [module for name, module in unwrap(model).named_modules() if pattern.search(name)]
    if not found:
        raise ValueError(
            f"no {kind} blocks found (module names matching {pattern.pattern}): this model's "
            "layout is not one the hidden-state defences know"
        )
    return found


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    # A new tuple (not output[0].data = ...): autograd sees the addition.
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def hooked(modules: Sequence[torch.nn.Module], hook: Callable[[int, torch.nn.Module, Any, Any], Any]) -> Iterator[None]:
    """`hook(index, module, inputs, output)` on each module's forward inside the block; removed on exit
    (the original RepNoise never removed its hooks, and they piled up every step)."""
    handles = [
        module.register_forward_hook(lambda m, i, o, index=index: hook(index, m, i, o))
        for index, module in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_outputs(modules: Sequence[torch.nn.Module], keep_gradients: bool = False) -> Iterator[list[torch.Tensor]]:
    """The output (its first element, for blocks returning tuples) of each module, in order, filled in as
    the forward runs. With keep_gradients, each captured tensor's gradient is kept in its .grad after
    the backward (a tensor hook, not the deprecated module backward hook the authors used)."""
    captured: list[torch.Tensor] = [None] * len(modules)  # type: ignore[list-item]

    def keep(index: int, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        hidden = _first(output)
        if keep_gradients and hidden.requires_grad:
            hidden.retain_grad()
        captured[index] = hidden

    with hooked(modules, keep):
        yield captured


@contextmanager
def add_to_outputs(modules: Sequence[torch.nn.Module], deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Each module's output (first element) is output + delta inside the block; delta is a constant."""

    def add(index: int, module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        hidden = _first(output)
        return _replace_first(output, hidden + deltas[index].to(device=hidden.device, dtype=hidden.dtype))

    with hooked(modules, add):
        yield


@contextmanager
def input_square_sums(
    modules: dict[str, torch.nn.Module], mask: torch.Tensor | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Per module, the sum over rows and (masked) tokens of its input squared, per input feature."""
    sums: dict[str, torch.Tensor] = {}
    names = list(modules)

    def add(index: int, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        x = inputs[0].detach().float()
        if mask is not None:
            x = x * mask.to(x.device, x.dtype).unsqueeze(-1)
        squared = (x * x).reshape(-1, x.shape[-1]).sum(dim=0)
        name = names[index]
        sums[name] = squared if name not in sums else sums[name] + squared

    with hooked([modules[name] for name in names], add):
        yield sums
