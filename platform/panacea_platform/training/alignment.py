"""The aligned model every fine-tuning starts from: trained once per alignment setting and reused.

Shared by the main job (recipes/main_job.py) and the sweeps (search/sweep.py): the shared SFT
alignment on refusals, or the run's own where its defence acts at alignment.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from panacea_platform.config import RunConfig, with_changes
from panacea_platform.tracking import Tracker

# Config sections that decide what the alignment stage produces; the aligned
# adapter is reused when none of them changed. The pools are fixed (data/pools.py):
# n, p and the defender's size do not move the alignment pool, so they are not here.
ALIGNMENT_KEYS = ("model", "lora", "align_optim", "seed")
ALIGNMENT_DATA_KEYS = (
    "harmful_source",
    "harmful_file",
    "alignment_size",
    "alignment_benign_ratio",
    "alignment_self_distill",
    "max_length",
    "prompt_template",
    "pool_seed",
    "eval_harmful_size",
    "task_eval_size",
)


def alignment_key(config: RunConfig) -> str:
    """What the aligned model depends on, hashed: the aligned adapter is reused while it is unchanged."""
    tree = config.to_dict()
    relevant = {k: tree[k] for k in ALIGNMENT_KEYS}
    relevant["model"] = {k: v for k, v in tree["model"].items() if k != "after_alignment"}  # a fine-tuning choice
    relevant["data"] = {k: tree["data"][k] for k in ALIGNMENT_DATA_KEYS}
    relevant["task"] = tree["data"]["task"]  # the task's held-out set is part of the stage's summary
    defence = aligning_defence(config)
    if defence is not None:  # a defence that aligns makes its own aligned model, from the harmful pool too
        relevant["defence"] = {
            "name": defence.name,
            "settings": defence.settings(),
            "defender_harmful_size": config.data.defender_harmful_size,
        }
    if config.data.alignment_self_distill:
        from panacea_platform.data.self_distill import RECIPE_VERSION

        relevant["self_distill_recipe"] = RECIPE_VERSION  # a new recipe makes other benign pairs
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


def aligning_defence(config: RunConfig):
    """The run's defence if it acts at alignment, else None (the shared SFT alignment)."""
    from panacea_platform.algorithms import build_defence

    defence = build_defence(config)
    return defence if defence.acts_at("align") else None


def ensure_aligned(
    config: RunConfig, parent: Tracker | None, out: Callable[[str], None] = print
) -> tuple[Path, str | None]:
    """(aligned adapter, MLflow run id of the alignment run if trained now): the given, the cached, or a new one."""
    from panacea_platform.training.dispatch import train

    if config.model.adapter is not None:
        out(f"[align] skipped: starting from the given adapter {config.model.adapter}")
        return Path(config.model.adapter), None
    aligner = aligning_defence(config)
    align_config = with_changes(
        config,
        {
            "run_name": f"align-{alignment_key(config)}",
            **({} if aligner else {"defence": "sft", "defence_stages": None}),
        },
    )
    align_dir = align_config.run_dir()
    adapter = align_dir / "adapter"
    if (adapter / "adapter_config.json").is_file() and (align_dir / "summary.json").is_file():
        out(f"[align] reusing the aligned adapter from an earlier run: {adapter}")
        if parent is not None:
            parent.set_tags({"reused_alignment": str(adapter.resolve())})
        return adapter, None
    how = f"with {aligner.name}" if aligner else "by SFT on refusals"
    out(f"[align] no aligned adapter {how} for this job yet: aligning once (cached in {align_dir})")
    result = train(align_config, "align", parent_run_id=parent.run_id if parent is not None else None, out=out)
    return result.adapter_dir, result.mlflow_run_id
