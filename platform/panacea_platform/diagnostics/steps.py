"""One step of a registered defence, as the training loop runs it: what every diagnostic times or measures.

The diagnostics (bench step, the memory check, the GPU check) build their defences here, through the
registry, so that a defence's step they measure is the one training runs, with its own config section.
Imports neither Ray nor MLflow: the GPU check runs on machines that have neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig


def registered_step(
    config: RunConfig, name: str, weights, batch, harmful, steps: int
) -> Callable[[], dict[str, float]]:
    """One step of the registered defence `name` as the training loop runs it (DEFENCES, its own config
    section), at the stage it trains at, on `batch` and the streams it draws (`harmful`; `batch` again
    as Lisa's alignment batch). A defence that pairs harmful rows with its batch gets both cut to one size."""
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.algorithms.defences import ALIGN, FINETUNE

    defence = DEFENCES.get(name).build(config)
    defence.begin(steps)
    stage = ALIGN if defence.acts_at(ALIGN) else FINETUNE
    if defence.pairs_harmful_rows:
        rows = min(batch["input_ids"].shape[0], harmful["input_ids"].shape[0])
        batch, harmful = ({k: v[:rows] for k, v in b.items()} for b in (batch, harmful))
    extra = {stream: {"harmful": harmful, "alignment": batch}[stream] for stream in defence.needs_at(stage)}
    step = defence.align_step if stage == ALIGN else defence.step
    return lambda: step(weights, batch, extra)
