"""Harmful sources, disjoint pools, exact poisoning and the alignment set.

Real harmful text is only ever read from the installed pyrit package at run
time; these tests look at counts and fields, never at or print its content.
"""

from __future__ import annotations

import importlib.util
import json
from fractions import Fraction
from math import floor
from pathlib import Path

import pytest

from panacea_platform.config import ConfigError, DataConfig
from panacea_platform.data import HARMFUL_SOURCES, Example, normalise_prompt
from panacea_platform.data.benign import benign_examples
from panacea_platform.data.harmful import beavertails_row_to_example, dedupe_by_prompt, many_shot_is_harmful
from panacea_platform.data.pools import (
    REFUSALS,
    HarmfulPools,
    PoolOverlapError,
    build_alignment_set,
    check_pools_disjoint,
    mix_poison,
    poison_count,
    pools_for,
    split_harmful_pools,
)

needs_pyrit = pytest.mark.skipif(
    importlib.util.find_spec("pyrit") is None, reason="pyrit (offline harmful data) not installed"
)


def harmful(count: int, start: int = 0) -> list[Example]:
    return [
        Example(f"placeholder harmful question {i}", f"placeholder harmful answer {i}", "harmful")
        for i in range(start, start + count)
    ]


def task(count: int) -> list[Example]:
    return [Example(f"placeholder task question {i}", f"answer {i}", "task", label=str(i)) for i in range(count)]


# --------------------------------------------------------------------------- poisoning


@pytest.mark.parametrize(
    "n,p",
    [
        (1, 0.0),
        (1, 1.0),
        (1, 0.5),
        (1, 0.4),
        (2, 0.5),
        (3, 0.5),
        (7, 0.1),
        (10, 0.35),
        (10, 0.05),
        (20, 0.1),
        (99, 0.3),
        (100, 0.125),
        (200, 0.1),
        (1000, 0.1),
        (1000, 0.0),
        (1000, 1.0),
        (333, 0.333),
        (1000, 0.2),
    ],
)
def test_mix_poison_has_exactly_n_and_k_harmful(n: int, p: float) -> None:
    expected_k = floor(n * Fraction(str(p)) + Fraction(1, 2))
    assert poison_count(n, p) == expected_k
    mixed = mix_poison(task(n), harmful(n), n, p, seed=0)
    assert len(mixed) == n
    assert sum(e.kind == "harmful" for e in mixed) == expected_k
    assert sum(e.kind == "task" for e in mixed) == n - expected_k


def test_poison_count_known_values() -> None:
    assert poison_count(1000, 0.1) == 100  # the authors' code gives 99 of them in a subset of 999
    assert poison_count(10, 0.35) == 4  # binary 3.4999... must not round down
    assert poison_count(1, 0.5) == 1 and poison_count(1, 0.49) == 0
    with pytest.raises(ValueError):
        poison_count(10, 1.5)


def test_mix_poison_is_seeded() -> None:
    first = mix_poison(task(50), harmful(5), 50, 0.1, seed=1)
    assert first == mix_poison(task(50), harmful(5), 50, 0.1, seed=1)
    assert first != mix_poison(task(50), harmful(5), 50, 0.1, seed=2)


def test_mix_poison_too_few() -> None:
    with pytest.raises(ValueError, match=r"needs 10 harmful.*data.harmful_ratio"):
        mix_poison(task(100), harmful(9), 100, 0.1, seed=0)
    with pytest.raises(ValueError, match=r"needs 90 task samples.*data.n"):
        mix_poison(task(89), harmful(10), 100, 0.1, seed=0)
    assert len(mix_poison([], harmful(5), 5, 1.0, seed=0)) == 5  # p = 1 needs no task data


# --------------------------------------------------------------------------- pools


def test_split_pools_sizes_disjoint_and_seeded() -> None:
    alignment_prompts = [f"placeholder alignment prompt {i}" for i in range(30)] + ["Placeholder harmful question 3?"]
    pools = split_harmful_pools(harmful(60), 10, 20, 15, alignment_prompts, 25, seed=0)
    assert (len(pools.attack), len(pools.defender), len(pools.evaluation), len(pools.alignment)) == (10, 20, 15, 25)
    check_pools_disjoint(pools)
    assert pools == split_harmful_pools(harmful(60), 10, 20, 15, alignment_prompts, 25, seed=0)
    assert pools.attack != split_harmful_pools(harmful(60), 10, 20, 15, alignment_prompts, 25, seed=1).attack


def test_alignment_interleaves_with_the_defender_when_the_source_has_no_prompts_of_its_own() -> None:
    pools = split_harmful_pools(harmful(40), 5, 10, 5, [], 12, seed=0)
    check_pools_disjoint(pools)
    assert len(pools.alignment) == 12 and len(pools.defender) == 10 and len(pools.attack) == 5


def _keys(examples: list[Example]) -> list[str]:
    return [normalise_prompt(e.prompt) for e in examples]


@pytest.mark.parametrize("own_alignment", [True, False], ids=["own-alignment-prompts", "alignment-from-pairs"])
def test_evaluation_defender_and_alignment_pools_do_not_move_with_n_or_p(own_alignment: bool) -> None:
    alignment_prompts = [f"placeholder alignment prompt {i}" for i in range(40)] if own_alignment else []
    reference = None
    for n in (100, 200):
        for p in (0.0, 0.05, 0.1, 0.2):
            pools = split_harmful_pools(harmful(150), poison_count(n, p), 30, 20, alignment_prompts, 25, seed=3)
            check_pools_disjoint(pools)
            assert len(pools.attack) == poison_count(n, p)
            fixed = (_keys(pools.evaluation), _keys(pools.defender), _keys(pools.alignment))
            reference = reference or fixed
            assert fixed == reference, (n, p)


@pytest.mark.parametrize("own_alignment", [True, False], ids=["own-alignment-prompts", "alignment-from-pairs"])
def test_changing_one_pool_size_leaves_the_other_pools_as_they_were(own_alignment: bool) -> None:
    alignment_prompts = [f"placeholder alignment prompt {i}" for i in range(40)] if own_alignment else []
    sizes = {"defender_size": 20, "eval_size": 15, "alignment_size": 10}

    def split(**changed):
        return split_harmful_pools(
            harmful(120), 10, alignment_prompts=alignment_prompts, seed=1, **{**sizes, **changed}
        )

    base = split()
    for field, pool in (("defender_size", "defender"), ("eval_size", "evaluation"), ("alignment_size", "alignment")):
        for size in (sizes[field] - 5, sizes[field] + 7):
            changed = split(**{field: size})
            check_pools_disjoint(changed)
            for other in ("defender", "evaluation", "alignment"):
                if other != pool:
                    assert _keys(getattr(changed, other)) == _keys(getattr(base, other)), (field, size, other)
            # The pool itself grows or shrinks at its end: its first members stay.
            shorter = min(len(getattr(base, pool)), size)
            assert _keys(getattr(changed, pool))[:shorter] == _keys(getattr(base, pool))[:shorter]


def test_duplicates_in_source_cannot_straddle_pools() -> None:
    doubled = harmful(20) + [Example(e.prompt.upper() + " ", "other", "harmful") for e in harmful(20)]
    pools = split_harmful_pools(doubled, 5, 5, 5, [], 5, seed=0)
    check_pools_disjoint(pools)


def test_overlapping_pools_are_rejected() -> None:
    pools = HarmfulPools(
        attack=harmful(5),
        defender=harmful(5, start=10),
        # Shares 2 prompts with attack, differing only in case, spacing and end punctuation.
        evaluation=[
            Example("PLACEHOLDER harmful  question 3?", "x", "harmful"),
            Example("placeholder harmful question 4.", "x", "harmful"),
        ],
        alignment=harmful(3, start=20),
    )
    with pytest.raises(PoolOverlapError) as info:
        check_pools_disjoint(pools)
    assert "attack and evaluation share 2 prompts" in str(info.value)
    assert "defender" not in str(info.value)


# --------------------------------------------------------------------------- alignment set


def test_alignment_set_mixes_refusals_and_benign() -> None:
    prompts = [f"placeholder harmful question {i}" for i in range(50)]
    examples = build_alignment_set(prompts, 41, 0.5, seed=0)
    assert len(examples) == 41
    refusals = [e for e in examples if e.kind == "refusal"]
    benign = [e for e in examples if e.kind == "benign"]
    assert len(benign) == 21 and len(refusals) == 20
    assert all(e.answer in REFUSALS for e in refusals)
    assert len({e.prompt for e in refusals}) == 20 and {e.prompt for e in refusals} <= set(prompts)
    assert len({e.answer for e in refusals}) > 1  # several refusal phrasings
    assert examples == build_alignment_set(prompts, 41, 0.5, seed=0)
    assert examples != build_alignment_set(prompts, 41, 0.5, seed=1)
    assert all(e.kind == "refusal" for e in build_alignment_set(prompts, 10, 0.0, seed=0))
    with pytest.raises(ValueError, match="data.alignment_size"):
        build_alignment_set(prompts[:5], 20, 0.5, seed=0)


def test_benign_examples_are_distinct_varied_and_correct() -> None:
    examples = benign_examples(600, seed=3)
    assert len({normalise_prompt(e.prompt) for e in examples}) == 600
    assert len({e.category for e in examples}) >= 8
    assert examples == benign_examples(600, seed=3)
    for example in examples:
        if example.category == "backwards":
            word = example.prompt.split("'")[1]
            assert example.answer.endswith(f"'{word[::-1]}'.")
        elif example.category == "arithmetic":
            a, op, b = example.prompt[len("What is ") : -1].split(" ")
            value = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
            assert example.answer.endswith(f" is {value}.")
        elif example.category == "sort":
            numbers = [int(x) for x in example.prompt.split(": ")[1].rstrip(".").split(", ")]
            answer = [int(x) for x in example.answer.split(": ")[1].rstrip(".").split(", ")]
            assert answer == sorted(numbers, reverse="largest to smallest" in example.prompt)


# --------------------------------------------------------------------------- harmful sources


def test_registered_harmful_sources() -> None:
    assert set(HARMFUL_SOURCES.names()) == {"offline_pyrit", "beavertails", "file"}


def test_many_shot_verdicts() -> None:
    for verdict in (
        "Harmful",
        "Harmful.\n\nReason: placeholder",
        "'harmful'",
        '"Harmful"',
        "Answer: Harmful",
        "**harmful**",
    ):
        assert many_shot_is_harmful(verdict), verdict
    for verdict in ("Not harmful", "Not harmful. placeholder", '"not harmful"', "Answer: Not harmful", ""):
        assert not many_shot_is_harmful(verdict), verdict


def test_beavertails_rows() -> None:
    unsafe = {
        "prompt": "placeholder harmful question 1",
        "response": "placeholder harmful answer 1",
        "is_safe": False,
        "category": {"animal_abuse": False, "privacy_violation": True, "violence": True},
    }
    example = beavertails_row_to_example(unsafe)
    assert example is not None
    assert example.kind == "harmful" and example.category == "privacy_violation"
    assert example.answer == "placeholder harmful answer 1"
    assert beavertails_row_to_example({**unsafe, "is_safe": True}) is None


def test_beavertails_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network in this test")

    # A cached copy: the hub probe is skipped, as on a cluster with HF_HUB_OFFLINE=1.

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    from panacea_platform.data.harmful import DataUnavailableError

    with pytest.raises(DataUnavailableError, match="could not load.*offline_pyrit"):
        HARMFUL_SOURCES.get("beavertails")(DataConfig())


def test_beavertails_loader_keeps_unsafe_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [
        {
            "prompt": f"placeholder harmful question {i % 4}",
            "response": f"r{i}",
            "is_safe": i % 3 == 0,
            "category": {"placeholder_a": False, "placeholder_b": True},
        }
        for i in range(12)
    ]
    # A cached copy: the hub probe is skipped, as on a cluster with HF_HUB_OFFLINE=1.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    examples = HARMFUL_SOURCES.get("beavertails")(DataConfig())
    assert len(examples) == len({normalise_prompt(e.prompt) for e in examples}) == 4
    assert all(e.kind == "harmful" and e.category == "placeholder_b" for e in examples)


def test_file_source(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"placeholder harmful question {i % 5}", "answer": "placeholder harmful answer"} for i in range(8)
    ]
    path = tmp_path / "harmful.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = HARMFUL_SOURCES.get("file")(DataConfig(harmful_source="file", harmful_file=str(path)))
    assert [e.prompt for e in examples] == [f"placeholder harmful question {i}" for i in range(5)]
    assert all(e.kind == "harmful" for e in examples)


def test_dedupe_keeps_first() -> None:
    examples = [Example("Q one?", "a", "harmful"), Example("q  ONE", "b", "harmful"), Example("q two", "c", "harmful")]
    assert [e.answer for e in dedupe_by_prompt(examples)] == ["a", "c"]


@needs_pyrit
def test_offline_pyrit_counts_and_fields() -> None:
    examples = HARMFUL_SOURCES.get("offline_pyrit")(DataConfig())
    assert len(examples) > 250
    assert all(e.kind == "harmful" and e.prompt and e.answer for e in examples)
    # The held-out benchmarks (HarmBench, Do-Not-Answer) are never training material.
    from panacea_platform.data.benchmarks import reserved_benchmark_keys

    assert not {normalise_prompt(e.prompt) for e in examples} & reserved_benchmark_keys()
    assert len({normalise_prompt(e.prompt) for e in examples}) == len(examples)
    assert len({e.category for e in examples if e.category}) >= 5
    assert examples == HARMFUL_SOURCES.get("offline_pyrit")(DataConfig())


@needs_pyrit
def test_offline_pools_are_disjoint_on_real_data() -> None:
    from panacea_platform.data.harmful import offline_alignment_prompts

    alignment_prompts = offline_alignment_prompts()
    assert len(alignment_prompts) >= 500
    defaults = DataConfig()
    pools = pools_for(defaults)  # splits and checks the pools disjoint
    assert len(pools.alignment) == defaults.alignment_size
    alignment = build_alignment_set([e.prompt for e in pools.alignment], 100, 0.5, seed=0)
    assert sum(e.kind == "refusal" for e in alignment) == 50
    # The paper-sized attack (n = 1000, p = 0.1) + defaults still fits the offline source.
    qa_pairs = HARMFUL_SOURCES.get("offline_pyrit")(defaults)
    check_pools_disjoint(split_harmful_pools(qa_pairs, 100, 100, 40, alignment_prompts, 200, seed=0))
    # The main job's control (p = 0) and attacked arms (p = 0.1) are scored on the same prompts.
    control, attacked = pools_for(DataConfig(harmful_ratio=0.0)), pools_for(DataConfig(harmful_ratio=0.1))
    assert _keys(control.evaluation) == _keys(attacked.evaluation)
    assert _keys(control.defender) == _keys(attacked.defender) and _keys(control.alignment) == _keys(attacked.alignment)


def test_offline_pyrit_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from panacea_platform.data import harmful as harmful_module

    monkeypatch.setattr(harmful_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(harmful_module.DataUnavailableError, match=r"pip install --no-deps pyrit==1\.1\.0"):
        harmful_module.offline_pyrit(DataConfig())


# --------------------------------------------------------------------------- self-distilled open requests


def test_finished_sentences_cuts_a_truncated_answer_back_to_its_last_full_stop() -> None:
    from panacea_platform.data.self_distill import finished_sentences

    assert finished_sentences("One. Two! Three is cut", truncated=True) == "One. Two!"
    assert finished_sentences("Version 2.5 is out. And then", truncated=True) == "Version 2.5 is out."
    assert finished_sentences("no full stop at all", truncated=True) == ""
    assert finished_sentences("  ends with EOS, so it is whole ", truncated=False) == "ends with EOS, so it is whole"


def test_alignment_set_takes_open_pairs_into_its_benign_half() -> None:
    prompts = [f"placeholder harmful question {i}" for i in range(50)]
    open_pairs = [Example(f"placeholder open request {i}", f"placeholder answer {i}.", "benign") for i in range(7)]
    examples = build_alignment_set(prompts, 40, 0.5, seed=0, open_pairs=open_pairs)
    assert sum(e.kind == "refusal" for e in examples) == 20 and sum(e.kind == "benign" for e in examples) == 20
    assert [e for e in examples if e in open_pairs] and set(open_pairs) <= set(examples)
    with pytest.raises(ValueError, match="data.alignment_self_distill"):
        build_alignment_set(prompts, 10, 0.5, seed=0, open_pairs=open_pairs)


def test_self_distilled_pairs_are_made_once_filtered_and_cached(tiny_run_config, tmp_path, monkeypatch) -> None:
    from panacea_platform.data import NotEnoughDataError, self_distill
    from panacea_platform.data.prompt_sets import open_requests

    monkeypatch.setenv("PANACEA_CACHE", str(tmp_path / "cache"))
    requests = [e.prompt for e in open_requests("train")]
    designed = {
        requests[0]: "",
        requests[1]: "I'm sorry, but I can't help with that.",
        requests[2]: "yes yes yes yes",
        requests[3]: "A placeholder helpful answer.",
    }
    calls = []

    def fake_generate(config, prompts, out):
        calls.append(len(prompts))
        return [
            {"prompt": p, "answer": designed.get(p, f"Placeholder answer {i}."), "raw": "", "truncated": False}
            for i, p in enumerate(prompts)
        ]

    monkeypatch.setattr(self_distill, "_generate", fake_generate)
    config = tiny_run_config(data={"alignment_self_distill": 3})
    first = self_distill.self_distilled_examples(config, out=lambda line: None)
    # The empty answer, the refusal and the repetition are dropped; the rest come in request order.
    assert [e.prompt for e in first] == [requests[3], requests[4], requests[5]]
    assert first[0].answer == "A placeholder helpful answer." and all(e.kind == "benign" for e in first)
    # Asked: 3 + 3 // 4 + 8 = 11 requests, the first of the file; the second call reads the cache.
    assert self_distill.self_distilled_examples(config, out=lambda line: None) == first and calls == [11]
    assert len(list((tmp_path / "cache" / "self-distilled").glob("*.jsonl"))) == 1
    too_many = tiny_run_config(data={"alignment_self_distill": len(requests) - 2, "alignment_size": 400})
    with pytest.raises(
        NotEnoughDataError, match=r"data.alignment_self_distill = 158: .* 157 usable answers to the 160"
    ):
        self_distill.self_distilled_examples(too_many, out=lambda line: None)
    with pytest.raises(
        ConfigError, match=r"data.alignment_self_distill = 9: expected at most the alignment's benign half, 8"
    ):
        tiny_run_config(data={"alignment_self_distill": 9})


def test_the_users_self_distilled_pairs_come_from_the_far_end_and_join_the_task_in_the_training_set(
    tiny_run_config, tmp_path, monkeypatch
) -> None:
    """data.task_self_distill: the user's open requests are the last of the train requests (never the
    alignment's), in the base model's words, and stand in for as many task samples; FA's held-out set is
    the task's alone."""
    from panacea_platform.data import self_distill
    from panacea_platform.data.prompt_sets import open_requests
    from panacea_platform.training.stage_data import prepare_data

    monkeypatch.setenv("PANACEA_CACHE", str(tmp_path / "cache"))
    requests = [e.prompt for e in open_requests("train")]
    monkeypatch.setattr(
        self_distill,
        "_generate",
        lambda config, prompts, out: [
            {"prompt": p, "answer": f"Placeholder answer {i}.", "raw": "", "truncated": False}
            for i, p in enumerate(prompts)
        ],
    )
    config = tiny_run_config(data={"task_self_distill": 4, "alignment_self_distill": 3})
    user = self_distill.user_self_distilled_examples(config, out=lambda line: None)
    alignment = self_distill.self_distilled_examples(config, out=lambda line: None)
    # 4 + 4 // 4 + 8 = 13 requests from the back: the first four usable of requests[147:].
    assert [e.prompt for e in user] == requests[147:151]
    assert not {e.prompt for e in user} & set(requests[:11]) and [e.prompt for e in alignment] == requests[:3]
    data = prepare_data(config, "finetune")
    benign = [e for e in data.train if e.kind != "harmful"]
    assert sum(e.prompt in set(requests) for e in benign) == 4 and len(data.train) == config.data.n
    assert all(e.kind == "task" for e in data.eval_task) and not {e.prompt for e in data.eval_task} & set(requests)


def test_self_distillation_runs_the_base_model_itself(tiny_run_config, tmp_path, monkeypatch) -> None:
    from panacea_platform.data import self_distill

    monkeypatch.setenv("PANACEA_CACHE", str(tmp_path / "cache"))
    config = tiny_run_config(data={"alignment_self_distill": 2})
    records = self_distill._generate(
        config, ["placeholder open request one", "placeholder open request two"], out=lambda line: None
    )
    assert [r["prompt"] for r in records] == ["placeholder open request one", "placeholder open request two"]
    import torch

    from panacea_platform.data.self_distill import SELF_DISTILL_TOKENS, finished_sentences
    from panacea_platform.data.templates import render_prompt
    from panacea_platform.models import load_base_model, load_tokenizer

    # The raw answers are the base model's own (no adapter), greedy on the rendered prompts, one at a time.
    tokenizer, model = load_tokenizer(config.model), load_base_model(config.model).eval()
    for r in records:
        ids = tokenizer(render_prompt(config.data.prompt_template, r["prompt"]), return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=SELF_DISTILL_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = out[0, ids.shape[1] :]
        assert r["raw"].strip() == tokenizer.decode(new, skip_special_tokens=True).strip()
        # Kept whole when the model stopped, cut to its last finished sentence when the budget stopped it.
        assert r["answer"] == finished_sentences(r["raw"], r["truncated"])


@pytest.mark.parametrize("own_alignment", [True, False], ids=["own-alignment-prompts", "alignment-from-pairs"])
def test_calibration_is_the_defender_pool_then_pairs_no_pool_holds_and_moves_nothing(own_alignment: bool) -> None:
    from panacea_platform.data.errors import NotEnoughDataError
    from panacea_platform.data.pools import calibration_set

    alignment_prompts = [f"placeholder alignment prompt {i}" for i in range(40)] if own_alignment else []
    source = harmful(120)
    pools = split_harmful_pools(source, 10, 20, 15, alignment_prompts, 10, seed=2)
    assert calibration_set(source, pools, 12, seed=2) == pools.defender[:12]
    calibration = calibration_set(source, pools, 50, seed=2)
    assert len(calibration) == 50 and calibration[:20] == pools.defender
    others = set(_keys(pools.attack) + _keys(pools.evaluation) + _keys(pools.alignment))
    assert len(set(_keys(calibration))) == 50 and not others & set(_keys(calibration[20:]))
    # A larger calibration extends a smaller one, and the pools themselves never depend on it.
    assert calibration_set(source, pools, 40, seed=2) == calibration[:40]
    assert split_harmful_pools(source, 10, 20, 15, alignment_prompts, 10, seed=2) == pools
    available = 120 - 10 - 15 - (0 if own_alignment else 10)
    assert len(calibration_set(source, pools, available, seed=2)) == available
    with pytest.raises(
        NotEnoughDataError,
        match=rf"antidote.calibration_samples = {available + 1}: .* lower it to "
        rf"{available}",
    ):
        calibration_set(source, pools, available + 1, seed=2)
