"""Carving the harmful data into disjoint pools, poisoning, and the alignment set.

Four pools are cut from one harmful source, and must never share a prompt:

- attack: the harmful samples hidden in the user's fine-tuning set;
- defender: the provider's own harmful set (Panacea's h);
- evaluation: held-out harmful prompts the harmful score is measured on;
- alignment: harmful prompts paired with refusals for the safety stage.

An overlap would let a defence train on the prompts it is scored on (defender
vs evaluation) or let alignment pre-empt the attack, inflating every result.
The evaluation, defender and alignment pools sit at fixed places of one seeded
order (split_harmful_pools), so they never move with the attack's size n * p:
two arms of an experiment are scored on the same prompts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from fractions import Fraction

from panacea_platform.data.benign import benign_examples
from panacea_platform.data.errors import NotEnoughDataError, PoolOverlapError
from panacea_platform.data.examples import Example, normalise_prompt

__all__ = [
    "HarmfulPools",
    "PoolOverlapError",
    "REFUSALS",
    "build_alignment_set",
    "calibration_for",
    "calibration_set",
    "check_pools_disjoint",
    "mix_poison",
    "poison_count",
    "pools_for",
    "split_harmful_pools",
]

# Several phrasings, so the aligned model learns to refuse rather than to emit
# one fixed string (which a single leaked token sequence could then unlock).
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I cannot assist with this request because it could be used to hurt someone or to break the law.",
    "I'm not able to provide that. If you have a different question, I'm happy to help.",
    "Sorry, I can't help with this. Sharing that information could put people at risk.",
    "I won't help with that request, as it could lead to harm. Is there something else I can do for you?",
    "I must decline this request because it is unsafe. Let me know if I can help with something else.",
)


@dataclass
class HarmfulPools:
    attack: list[Example]
    defender: list[Example]
    evaluation: list[Example]
    alignment: list[Example]  # harmful prompts; the answer is kept when known but the stage never uses it


def poison_count(n: int, p: float) -> int:
    """Harmful samples among n at ratio p: floor(n * p + 0.5), i.e. round half up.

    p is read as the decimal the user typed (Fraction(repr(p))), because in
    binary 10 * 0.35 is 3.4999..., which would round to 3 instead of 4.
    """
    if n < 0:
        raise ValueError(f"data.n must be >= 0, got {n}")
    if not 0 <= p <= 1:
        raise ValueError(f"data.harmful_ratio must be in [0, 1], got {p}")
    return math.floor(n * Fraction(repr(float(p))) + Fraction(1, 2))


def seeded_order(items: Sequence, seed: int, purpose: str) -> list:
    """A shuffle fixed by (purpose, seed) alone: the same items always come back in the same order."""
    items = list(items)
    random.Random(f"{purpose}:{seed}").shuffle(items)
    return items


def split_harmful_pools(
    qa_pairs: Sequence[Example],
    attack_size: int,
    defender_size: int,
    eval_size: int,
    alignment_prompts: list[str],
    alignment_size: int,
    seed: int,
) -> HarmfulPools:
    """Cut evaluation, defender and alignment pools from fixed places of one seeded order, the attack from the rest.

    The order is a shuffle of the distinct pairs by `seed` (data.pool_seed) alone:
    - evaluation: the first `eval_size` pairs from the front;
    - defender: `defender_size` pairs from the back;
    - alignment: when the source ships prompts of its own (`alignment_prompts`, e.g. AdvBench
      beside pyrit), the first `alignment_size` of their own seeded shuffle, never a prompt of
      `qa_pairs`; otherwise every other pair from the back, interleaved with the defender's;
    - attack: the first `attack_size` pairs no other pool took, in the same order.
    So each of the first three pools is a prefix of its own fixed sequence: it depends on the
    source, its own size and the seed, never on n, p or another pool's size, and every arm of
    an experiment (the p = 0 control included) is scored on the same prompts.
    """
    for name, size in (
        ("attack", attack_size),
        ("defender", defender_size),
        ("evaluation", eval_size),
        ("alignment", alignment_size),
    ):
        if size < 0:
            raise ValueError(f"{name} pool size must be >= 0, got {size}")
    unique = _distinct(qa_pairs)
    pairs = seeded_order(list(unique.values()), seed, "harmful-pools")
    own_alignment = bool(alignment_prompts)
    back = pairs[::-1]
    if own_alignment:
        defender, back_extent = back[:defender_size], defender_size
        alignment = _alignment_from_prompts(alignment_prompts, set(unique), alignment_size, seed)
    else:
        defender, alignment = back[0::2][:defender_size], back[1::2][:alignment_size]
        back_extent = _interleaved_extent(defender_size, alignment_size)
    if eval_size + back_extent > len(pairs) or len(defender) < defender_size or len(alignment) < alignment_size:
        raise NotEnoughDataError(_too_small(len(pairs), eval_size, defender_size, alignment_size, own_alignment))
    evaluation = pairs[:eval_size]
    taken = {normalise_prompt(e.prompt) for e in (*evaluation, *defender, *alignment)}
    rest = [e for e in pairs if normalise_prompt(e.prompt) not in taken]
    if attack_size > len(rest):
        raise NotEnoughDataError(
            f"the attack needs {attack_size} harmful pairs (data.n * data.harmful_ratio) but only {len(rest)} of the "
            f"source's {len(pairs)} are left after the evaluation ({eval_size}), defender ({defender_size}) and "
            "alignment pools; lower data.n or data.harmful_ratio, or data.defender_harmful_size / "
            "data.eval_harmful_size"
        )
    return HarmfulPools(attack=rest[:attack_size], defender=defender, evaluation=evaluation, alignment=alignment)


def _distinct(qa_pairs: Sequence[Example]) -> dict[str, Example]:
    # Deduplicated: two copies of one question in different pools is an overlap.
    unique: dict[str, Example] = {}
    for example in qa_pairs:
        unique.setdefault(normalise_prompt(example.prompt), example)
    return unique


def calibration_set(qa_pairs: Sequence[Example], pools: HarmfulPools, size: int, seed: int) -> list[Example]:
    """Antidote's calibration samples: the defender's pool, then the pairs just beyond it at the back of the
    pools' seeded order that no other pool holds (their C: the provider's harmful rows 5001-5999 and the next
    1000). The other pools never move with `size`; too few pairs is an error naming the setting."""
    if size <= len(pools.defender):
        return pools.defender[:size]
    taken = {
        normalise_prompt(e.prompt)
        for pool in (pools.attack, pools.defender, pools.evaluation, pools.alignment)
        for e in pool
    }
    back = seeded_order(list(_distinct(qa_pairs).values()), seed, "harmful-pools")[::-1]
    beyond = [e for e in back if normalise_prompt(e.prompt) not in taken]
    available = len(pools.defender) + len(beyond)
    if size > available:
        raise NotEnoughDataError(
            f"antidote.calibration_samples = {size}: the harmful source holds {available} pairs for calibration (the "
            f"defender's {len(pools.defender)} and {len(beyond)} no other pool took); lower it to {available} or "
            "use a larger data.harmful_source"
        )
    return pools.defender + beyond[: size - len(pools.defender)]


def _alignment_from_prompts(prompts: list[str], source_keys: set[str], size: int, seed: int) -> list[Example]:
    """The first `size` of a seeded shuffle of the source's own alignment prompts, minus any prompt of its pairs."""
    alignment: list[Example] = []
    seen: set[str] = set()
    for prompt in seeded_order(prompts, seed, "alignment-prompts"):
        if len(alignment) == size:
            break
        key = normalise_prompt(prompt)
        if key and key not in source_keys and key not in seen:
            seen.add(key)
            alignment.append(Example(prompt=prompt, answer="", kind="harmful"))
    return alignment


def _interleaved_extent(defender_size: int, alignment_size: int) -> int:
    """How far from the back the interleaved defender (even places) and alignment (odd places) pools reach."""
    return max(2 * defender_size - 1, 2 * alignment_size, 0)


def _too_small(available: int, eval_size: int, defender_size: int, alignment_size: int, own_alignment: bool) -> str:
    if own_alignment:
        layout = (
            f"evaluation {eval_size} (data.eval_harmful_size) + defender {defender_size} "
            f"(data.defender_harmful_size) = {eval_size + defender_size}"
        )
        alignment = (
            f"; the alignment pool takes {alignment_size} (data.alignment_size) from the source's own "
            "alignment prompts, which must hold that many"
        )
    else:
        layout = (
            f"evaluation {eval_size} (data.eval_harmful_size) from the front + defender {defender_size} "
            f"(data.defender_harmful_size) and alignment {alignment_size} (data.alignment_size) interleaved "
            f"from the back = {eval_size + _interleaved_extent(defender_size, alignment_size)} places"
        )
        alignment = ""
    return (
        f"the harmful source has {available} distinct question/answer pairs but the fixed pools need {layout}"
        f"{alignment}, and the attack (data.n * data.harmful_ratio) takes from what is left; lower those fields "
        "or use a larger harmful source"
    )


def check_pools_disjoint(pools: HarmfulPools) -> None:
    """Raise PoolOverlapError naming every pair of pools that shares a (normalised) prompt."""
    keys = {f.name: {normalise_prompt(e.prompt) for e in getattr(pools, f.name)} for f in fields(pools)}
    names = list(keys)
    overlaps = [
        f"{a} and {b} share {len(keys[a] & keys[b])} prompt{'s' if len(keys[a] & keys[b]) != 1 else ''}"
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if keys[a] & keys[b]
    ]
    if overlaps:
        raise PoolOverlapError("harmful pools overlap: " + "; ".join(overlaps))


def mix_poison(
    task_examples: Sequence[Example], harmful_examples: Sequence[Example], n: int, harmful_ratio: float, seed: int
) -> list[Example]:
    """The user's fine-tuning set: exactly poison_count(n, p) harmful and n - k task samples, shuffled.

    Exactly n: the authors' subset selection used a strict inequality and gave n - 1.
    """
    k = poison_count(n, harmful_ratio)
    if len(harmful_examples) < k:
        raise NotEnoughDataError(
            f"poisoning needs {k} harmful samples (data.n={n} * data.harmful_ratio={harmful_ratio}) but the attack "
            "pool "
            f"has {len(harmful_examples)}; lower data.n or data.harmful_ratio"
        )
    if len(task_examples) < n - k:
        raise NotEnoughDataError(
            f"poisoning needs {n - k} task samples (data.n={n} minus {k} harmful) but got {len(task_examples)}; "
            "lower data.n or supply more task data"
        )
    rng = random.Random(f"mix-poison:{seed}")
    mixed = rng.sample(list(harmful_examples), k) + rng.sample(list(task_examples), n - k)
    rng.shuffle(mixed)
    return mixed


def build_alignment_set(
    harmful_prompts: list[str], size: int, benign_ratio: float, seed: int, open_pairs: Sequence[Example] = ()
) -> list[Example]:
    """Safety-stage data: benign requests with helpful answers + harmful prompts with refusals, shuffled.

    round(size * benign_ratio) (half up) are benign (kind "benign"): every pair of `open_pairs`
    (open requests with the base model's own answers, data/self_distill.py), then generated
    factual pairs; the rest are refusals (kind "refusal") to distinct harmful prompts.
    """
    if size < 1:
        raise ValueError(f"data.alignment_size must be >= 1, got {size}")
    if not 0 <= benign_ratio <= 1:
        raise ValueError(f"data.alignment_benign_ratio must be in [0, 1], got {benign_ratio}")
    n_benign = poison_count(size, benign_ratio)
    n_refusal = size - n_benign
    distinct = list({normalise_prompt(p): p for p in harmful_prompts if normalise_prompt(p)}.values())
    if len(distinct) < n_refusal:
        raise NotEnoughDataError(
            f"the alignment set needs {n_refusal} harmful prompts for refusals (data.alignment_size={size} * "
            f"(1 - data.alignment_benign_ratio={benign_ratio})) but {len(distinct)} distinct prompts were given; "
            "lower data.alignment_size or raise data.alignment_benign_ratio"
        )
    rng = random.Random(f"alignment:{seed}")
    refusals = [
        Example(prompt=prompt, answer=rng.choice(REFUSALS), kind="refusal")
        for prompt in rng.sample(distinct, n_refusal)
    ]
    if len(open_pairs) > n_benign:
        raise ValueError(
            f"data.alignment_self_distill: {len(open_pairs)} self-distilled pairs do not fit the benign half "
            f"of {n_benign} (data.alignment_size * data.alignment_benign_ratio); lower it to {n_benign} or less"
        )
    examples = refusals + list(open_pairs) + benign_examples(n_benign - len(open_pairs), seed)
    rng.shuffle(examples)
    return examples


def pools_for(data_config) -> HarmfulPools:
    """The four pools a run's data settings give, checked disjoint (what every stage uses)."""
    from panacea_platform.data import HARMFUL_SOURCES
    from panacea_platform.data.harmful import offline_alignment_prompts

    pools = split_harmful_pools(
        HARMFUL_SOURCES.get(data_config.harmful_source)(data_config),
        attack_size=poison_count(data_config.n, data_config.harmful_ratio),
        defender_size=data_config.defender_harmful_size,
        eval_size=data_config.eval_harmful_size,
        # AdvBench prompts ship with pyrit; other sources fill alignment from left-over pairs.
        alignment_prompts=offline_alignment_prompts() if data_config.harmful_source == "offline_pyrit" else [],
        alignment_size=data_config.alignment_size,
        seed=data_config.pool_seed,
    )
    check_pools_disjoint(pools)
    return pools


def calibration_for(data_config, pools: HarmfulPools, size: int) -> list[Example]:
    """calibration_set of a run's harmful source (Antidote's C)."""
    from panacea_platform.data import HARMFUL_SOURCES

    return calibration_set(
        HARMFUL_SOURCES.get(data_config.harmful_source)(data_config), pools, size, data_config.pool_seed
    )
