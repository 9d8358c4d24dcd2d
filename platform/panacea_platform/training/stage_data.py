"""The data a stage trains and is scored on: the fixed pools, the training set, the held-out sets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from panacea_platform.config import RunConfig
from panacea_platform.data import TASKS, Example
from panacea_platform.data.pools import HarmfulPools, build_alignment_set, mix_poison, pools_for

STAGES = ("align", "finetune")


@dataclass
class StageData:
    train: list[Example]
    defender_harmful: list[Example]
    eval_harmful: list[Example]
    eval_task: list[Example]
    pools: HarmfulPools
    alignment: list[Example] = field(default_factory=list)  # the alignment set (Lisa draws it while fine-tuning)
    calibration: list[Example] = field(default_factory=list)  # Antidote's calibration samples
    fingerprints: dict[str, str] = field(default_factory=dict)


def fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.prompt.encode())
        digest.update(b"\0")
        digest.update(example.answer.encode())
        digest.update(b"\1")
    return f"{digest.hexdigest()[:16]}:{len(examples)}"


def prepare_data(config: RunConfig, stage: str) -> StageData:
    """The four disjoint harmful pools, the stage's training set and held-out sets."""
    data = config.data
    pools = pools_for(data)
    task = TASKS.get(data.task)
    # Held-out task samples depend on pool_seed only: every seed is scored on the same set.
    eval_task = task(data, "test", data.task_eval_size, data.pool_seed)
    alignment = _alignment_set(config, pools) if stage == "align" or _needs_alignment(config) else []
    if stage == "align":
        train = alignment
    else:
        clean = _user_benign(config, data.n - len(pools.attack)) if len(pools.attack) < data.n else []
        train = mix_poison(clean, pools.attack, data.n, data.harmful_ratio, config.seed)
    if not train:
        raise ValueError(f"the {stage} training set is empty: check data.n and data.alignment_size")
    prints = {
        "train": fingerprint(train),
        "attack": fingerprint(pools.attack),
        "defender": fingerprint(pools.defender),
        "evaluation": fingerprint(pools.evaluation),
        "alignment": fingerprint(pools.alignment),
        "task_eval": fingerprint(eval_task),
    }
    if alignment and stage != "align":
        prints["alignment_set"] = fingerprint(alignment)
    calibration = calibration_examples(config, pools) if stage == "finetune" else []
    if calibration:
        prints["calibration"] = fingerprint(calibration)
    return StageData(
        train, pools.defender, pools.evaluation, eval_task, pools, alignment, calibration, fingerprints=prints
    )


def _user_benign(config: RunConfig, size: int) -> list[Example]:
    """The user's benign samples: data.task_self_distill open requests in the base model's words, the task's rest."""
    from panacea_platform.data.self_distill import user_self_distilled_examples

    own = user_self_distilled_examples(config)
    return (
        TASKS.get(config.data.task)(config.data, "train", size - len(own), config.seed) + own
        if size > len(own)
        else own
    )


def _alignment_set(config: RunConfig, pools: HarmfulPools) -> list[Example]:
    from panacea_platform.data.self_distill import self_distilled_examples

    data = config.data
    return build_alignment_set(
        [e.prompt for e in pools.alignment],
        data.alignment_size,
        data.alignment_benign_ratio,
        config.seed,
        open_pairs=self_distilled_examples(config),
    )


def calibration_examples(config: RunConfig, pools: HarmfulPools) -> list[Example]:
    """Antidote's calibration samples when the run's defence prunes after fine-tuning, else none."""
    from panacea_platform.algorithms.defences import stage_defence
    from panacea_platform.data.pools import calibration_for

    if "calibration" not in stage_defence(config, "finetune").needs_at("post_finetune"):
        return []
    return calibration_for(config.data, pools, config.antidote.calibration_samples)


def _needs_alignment(config: RunConfig) -> bool:
    from panacea_platform.algorithms.defences import stage_defence

    return "alignment" in stage_defence(config, "finetune").needs_at("finetune")
