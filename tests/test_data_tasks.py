"""Fine-tuning tasks: offline generators, hub row converters and loaders, local files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from panacea_platform.config import DataConfig
from panacea_platform.data import TASKS, Example, normalise_prompt
from panacea_platform.data.errors import DataUnavailableError, NotEnoughDataError
from panacea_platform.data.tasks import (
    AG_NEWS_LABELS,
    ag_news_row_to_example,
    alpaca_row_to_example,
    gsm8k_row_to_example,
    split_by_prompt_hash,
    sst2_row_to_example,
)

GENERATORS = ("offline_arithmetic", "offline_sentiment", "offline_sentiment_explained", "offline_topic")


def prompts(examples: list[Example]) -> set[str]:
    return {normalise_prompt(e.prompt) for e in examples}


def test_registered_names() -> None:
    assert set(TASKS.names()) == {
        "offline_arithmetic",
        "offline_sentiment",
        "offline_sentiment_explained",
        "offline_topic",
        "gsm8k",
        "sst2",
        "ag_news",
        "alpaca",
        "local",
    }
    for name in TASKS.names():
        assert callable(TASKS.get(name))


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_is_deterministic_seeded_and_split_disjoint(name: str) -> None:
    task = TASKS.get(name)
    train = task(None, "train", 400, 0)
    assert train == task(None, "train", 400, 0)
    assert train != task(None, "train", 400, 1)
    assert len(train) == 400 and len(prompts(train)) == 400  # distinct prompts
    # Disjoint for any pair of seeds: the side is a function of the prompt.
    tests = task(None, "test", 200, 0) + task(None, "test", 200, 7)
    assert not prompts(train) & prompts(tests)
    assert not prompts(task(None, "train", 400, 7)) & prompts(tests)
    assert all(e.kind == "task" and e.label for e in train + tests)


def test_arithmetic_answers_state_their_label_and_are_correct() -> None:
    examples = TASKS.get("offline_arithmetic")(None, "train", 300, 3)
    assert len({e.category for e in examples}) >= 6  # varied templates
    for example in examples:
        assert example.answer.endswith(f"The answer is {example.label}.")
        # Every "a op b = c" step in the reasoning is true arithmetic.
        for a, op, b, c in re.findall(r"(\d+) ([x+/-]) (\d+) = (\d+)", example.answer):
            a, b, c = int(a), int(b), int(c)
            assert {"x": a * b, "+": a + b, "-": a - b, "/": a / b}[op] == c, example.answer
        last = re.findall(r"= (\d+)", example.answer)[-1]
        assert last == example.label


@pytest.mark.parametrize(
    "name,labels", [("offline_sentiment", {"positive", "negative"}), ("offline_topic", set(AG_NEWS_LABELS))]
)
def test_classification_generators_answer_is_label(name: str, labels: set[str]) -> None:
    examples = TASKS.get(name)(None, "test", 200, 0)
    assert all(e.answer == e.label for e in examples)
    assert {e.label for e in examples} == labels  # every class appears


@pytest.mark.parametrize("name", GENERATORS)
def test_every_generated_answer_scores_100_percent_under_its_tasks_rule(name: str) -> None:
    from panacea_platform.evaluation.metrics import score_answer

    examples = TASKS.get(name)(None, "train", 500, 4) + TASKS.get(name)(None, "test", 200, 4)
    scored = [score_answer(name, e.answer, e.label) for e in examples]
    assert all(s is not None and s.correct for s in scored), [
        e.answer for e, s in zip(examples, scored) if not s.correct
    ]


def test_explained_sentiment_answers_are_sentences_whose_reason_quotes_the_review() -> None:
    """A sentence a user would upload, not a label: the polarity, then why, in the review's own words; the
    reviews are offline_sentiment's, so the polarity is the same rule's."""
    examples = TASKS.get("offline_sentiment_explained")(None, "train", 300, 2)
    assert {e.label for e in examples} == {"positive", "negative"}
    for example in examples:
        head, reason = example.answer.split(". ", 1)
        assert head == example.label.capitalize() and reason.startswith("The review ") and reason.endswith(".")
        review_words = set(re.findall(r"[a-z]+", example.prompt.split("Review: ", 1)[1].lower()))
        reason_words = set(re.findall(r"[a-z]+", reason.lower())) - {
            "the",
            "review",
            "calls",
            "finds",
            "says",
            "that",
            "and",
            "it",
            "a",
            "film",
            "from",
            "start",
            "to",
            "finish",
        }
        assert reason_words <= review_words, (example.prompt, example.answer)
        assert len(example.answer.split()) >= 6


def test_sentiment_vocabulary_matches_label() -> None:
    from panacea_platform.data.tasks import _POLARITY_WORDS

    for example in TASKS.get("offline_sentiment")(None, "train", 300, 2):
        other = "negative" if example.label == "positive" else "positive"
        review = example.prompt.split("Review: ", 1)[1].lower()
        words = set(re.findall(r"[a-z]+", review))
        assert not words & set(_POLARITY_WORDS[other]["adjective"]), review


def test_bad_split_and_size() -> None:
    task = TASKS.get("offline_arithmetic")
    with pytest.raises(ValueError, match="split must be one of"):
        task(None, "validation", 5, 0)
    with pytest.raises(ValueError, match="at least 1"):
        task(None, "train", 0, 0)


# --------------------------------------------------------------------------- hub converters (made-up rows)


def test_gsm8k_row() -> None:
    row = {
        "question": "Placeholder shop sells 3 boxes of 6 placeholder items. How many items?",
        "answer": "There are 3 boxes.\n3 boxes hold 3*6=<<3*6=18>>18 items.\n#### 18",
    }
    example = gsm8k_row_to_example(row)
    assert example.label == "18"
    assert example.answer.endswith("The answer is 18.")
    assert "<<" not in example.answer and "####" not in example.answer
    assert gsm8k_row_to_example({"question": "q", "answer": "big\n#### 1,250"}).label == "1250"
    with pytest.raises(ValueError, match="####"):
        gsm8k_row_to_example({"question": "q", "answer": "no final marker"})


def test_sst2_row() -> None:
    assert sst2_row_to_example({"idx": 0, "sentence": "a placeholder review", "label": 1}).label == "positive"
    negative = sst2_row_to_example({"idx": 1, "sentence": "another placeholder", "label": 0})
    assert negative.answer == negative.label == "negative"
    assert "another placeholder" in negative.prompt
    with pytest.raises(ValueError, match="hidden"):
        sst2_row_to_example({"idx": 2, "sentence": "s", "label": -1})


def test_ag_news_row() -> None:
    for index, topic in enumerate(("World", "Sports", "Business", "Sci/Tech")):
        example = ag_news_row_to_example({"text": f"placeholder headline {index}", "label": index})
        assert example.label == example.answer == topic
    with pytest.raises(ValueError):
        ag_news_row_to_example({"text": "t", "label": 4})


def test_alpaca_row() -> None:
    plain = alpaca_row_to_example(
        {"instruction": "Placeholder instruction.", "input": "", "output": "Placeholder output."}
    )
    assert plain.prompt == "Placeholder instruction." and plain.answer == "Placeholder output." and plain.label is None
    with_input = alpaca_row_to_example({"instruction": "Summarise.", "input": "placeholder text", "output": "o"})
    assert with_input.prompt == "Summarise.\n\n### Input:\nplaceholder text"


# --------------------------------------------------------------------------- hub loaders (hub faked)


def test_hub_unreachable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network in this test")

    # A cached copy: the hub probe is skipped, as on a cluster with HF_HUB_OFFLINE=1.

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataUnavailableError) as info:
        TASKS.get("gsm8k")(DataConfig(), "train", 5, 0)
    message = str(info.value)
    assert "unreachable" in message and "offline_arithmetic" in message and "data.task_file" in message


def test_hub_loader_samples_from_a_local_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    rows = [{"text": f"placeholder headline {i}", "label": i % 4} for i in range(30)]
    path = tmp_path / "ag_news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real_load = datasets.load_dataset
    calls = []

    def local_copy(repo, config=None, split=None, **kwargs):
        calls.append((repo, split))
        return real_load("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))

    # A cached copy: the hub probe is skipped, as on a cluster with HF_HUB_OFFLINE=1.

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    monkeypatch.setattr(datasets, "load_dataset", local_copy)
    task = TASKS.get("ag_news")
    first = task(DataConfig(), "test", 10, 0)
    assert calls[0] == ("fancyzhx/ag_news", "test")
    assert first == task(DataConfig(), "test", 10, 0)
    assert len(prompts(first)) == 10
    assert all(e.label == AG_NEWS_LABELS[int(e.prompt.rsplit(" ", 1)[1]) % 4] for e in first)
    with pytest.raises(NotEnoughDataError, match=r"'ag_news'.*asked for 31 .* only 30"):
        task(DataConfig(), "train", 31, 0)


def test_sst2_test_split_is_validation_and_alpaca_split_by_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    requested = []

    def fake(repo, config=None, split=None, **kwargs):
        requested.append((repo, split))
        if "alpaca" in repo:
            return datasets.Dataset.from_list(
                [{"instruction": f"placeholder instruction {i}", "input": "", "output": f"o{i}"} for i in range(200)]
            )
        return datasets.Dataset.from_list(
            [{"idx": i, "sentence": f"placeholder review {i}", "label": i % 2} for i in range(20)]
        )

    # A cached copy: the hub probe is skipped, as on a cluster with HF_HUB_OFFLINE=1.

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    TASKS.get("sst2")(DataConfig(), "test", 5, 0)
    assert requested[-1] == ("stanfordnlp/sst2", "validation")
    train = TASKS.get("alpaca")(DataConfig(), "train", 100, 0)
    test = TASKS.get("alpaca")(DataConfig(), "test", 20, 0)
    assert not prompts(train) & prompts(test)
    with pytest.raises(NotEnoughDataError, match="'alpaca'"):
        TASKS.get("alpaca")(DataConfig(), "test", 150, 0)


# --------------------------------------------------------------------------- local


def write_task_file(path: Path, count: int) -> Path:
    rows = [
        {"prompt": f"placeholder question {i}", "answer": f"placeholder answer {i}", "label": str(i)}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_split_is_disjoint_deterministic_and_sized(tmp_path: Path) -> None:
    config = DataConfig(task="local", task_file=str(write_task_file(tmp_path / "task.jsonl", 50)))
    task = TASKS.get("local")
    test = task(config, "test", 10, 0)  # 20% of 50
    train = task(config, "train", 40, 0)
    assert not prompts(train) & prompts(test)
    assert prompts(test) == prompts(task(config, "test", 10, 5))  # the test set ignores the seed
    assert task(config, "train", 40, 0) == train
    assert all(e.label == e.prompt.rsplit(" ", 1)[1] for e in train)
    with pytest.raises(NotEnoughDataError) as info:
        task(config, "train", 41, 0)
    assert "'local'" in str(info.value) and "41" in str(info.value) and "40" in str(info.value)


def test_local_small_file_still_holds_one_out(tmp_path: Path) -> None:
    config = DataConfig(task="local", task_file=str(write_task_file(tmp_path / "small.jsonl", 3)))
    assert len(TASKS.get("local")(config, "test", 1, 0)) == 1
    assert len(TASKS.get("local")(config, "train", 2, 0)) == 2
    single = DataConfig(task="local", task_file=str(write_task_file(tmp_path / "one.jsonl", 1)))
    with pytest.raises(NotEnoughDataError, match="at least 2 distinct prompts"):
        TASKS.get("local")(single, "train", 1, 0)


def test_local_without_file() -> None:
    with pytest.raises(ValueError, match="data.task_file"):
        TASKS.get("local")(DataConfig(), "train", 1, 0)


def test_split_by_prompt_hash_keeps_duplicates_together() -> None:
    examples = [Example(f"Placeholder {i % 10}", "a", "task") for i in range(40)]
    examples += [Example(f"placeholder {i % 10}?", "a", "task") for i in range(10)]  # same prompts, normalised
    train, test = split_by_prompt_hash(examples)
    assert len(prompts(test)) == 2 and not prompts(train) & prompts(test)


def test_example_kind_is_checked_and_prompts_normalise() -> None:
    with pytest.raises(ValueError, match="kind"):
        Example("p", "a", "harmfull")
    assert normalise_prompt("  Placeholder   QUESTION 3?! ") == normalise_prompt('"placeholder question 3"')


def test_generators_scale() -> None:
    assert len(TASKS.get("offline_sentiment")(None, "test", 2000, 0)) == 2000


def test_an_unreachable_hub_is_an_error_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from panacea_platform.data.hub import load_hub_dataset

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    # A port nothing listens on: the probe's connection is refused at once (no network needed).
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(DataUnavailableError, match=r"suite 'x' .*unreachable.*HF_HUB_OFFLINE=1.*use y"):
        load_hub_dataset("org/name", "test", what="suite 'x'", instead="use y")
    with pytest.raises(DataUnavailableError, match="unreachable"):
        TASKS.get("gsm8k")(DataConfig(), "train", 5, 0)
    assert time.monotonic() - started < 10
