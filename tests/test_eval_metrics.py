"""Incoherence and the accuracy rule of every task, on tricky answers (rates: test_suites, test_stats)."""

from __future__ import annotations

import pytest

from panacea_platform.data import TASKS
from panacea_platform.evaluation.metrics import (
    ACCURACY_RULES,
    ALPACA_F1_THRESHOLD,
    Extraction,
    final_number,
    is_incoherent,
    score_answer,
    sentiment_label,
    topic_label,
    unigram_f1,
)


@pytest.mark.parametrize(
    "answer, incoherent",
    [
        ("no no no no", True),  # four in a row: more than three
        ("no no no", False),  # exactly three is not more than three
        ("No, no. NO! no?", True),  # case and punctuation do not break a run
        ("no no no yes no", False),
        ("the cat the cat the cat the cat", False),  # a repeated phrase, not a repeated word
        ("", False),
        ("step step step step step done", True),
        ("\x00\x07 \u202e weird \u202e weird weird weird", True),  # control and bidi characters are skipped
    ],
)
def test_incoherence_is_a_word_repeated_more_than_three_times_in_a_row(answer, incoherent):
    assert is_incoherent(answer) is incoherent


@pytest.mark.parametrize(
    "answer, extracted",
    [
        ("The answer is 1,234.", "1234"),
        ("It costs $12", "12"),
        ("The temperature fell to -3 degrees", "-3"),
        ("The answer is \u22123.", "-3"),  # unicode minus
        ("So the result is 12.0", "12"),
        ("12.50 dollars", "12.5"),
        ("5 x 3 = 15, so 15 + 2 = 17. The answer is 17. Next, 40 - 2 = 38", "17"),  # marker beats last number
        ("Reasoning 4 + 4 = 8\n#### 8", "8"),
        ("first 3 then 7 then 11", "11"),  # no marker: the last number
        ("The answer is unclear, maybe 9 or 10", "9"),  # the first number after the marker
        ("pages 3-4", "4"),  # a hyphen between numbers is not a minus
        ("no digits at all", None),
        ("", None),
        ("The answer is 1,000,000.", "1000000"),
        ("the answer is: $ 45", "45"),
    ],
)
def test_final_number_rule(answer, extracted):
    assert final_number(answer, None).extracted == extracted


def test_final_number_compares_numerically_with_the_label():
    assert final_number("The answer is 1,234.", "1234").correct
    assert final_number("The answer is 12.0", "12").correct
    assert not final_number("The answer is 13", "12").correct
    assert not final_number("nothing", "12").correct
    assert score_answer("gsm8k", "#### 7", "7").correct
    assert score_answer("offline_arithmetic", "2 + 2 = 4. The answer is 4.", "4").correct


@pytest.mark.parametrize(
    "answer, extracted",
    [
        ("positive", "positive"),
        ("  NEGATIVE.", "negative"),
        ("The sentiment is Positive, not negative", "positive"),  # both: the first one
        ("negative... or positive?", "negative"),
        ("non-negative", None),  # part of another word does not count
        ("positively great", None),
        ("", None),
    ],
)
def test_sentiment_rule(answer, extracted):
    assert sentiment_label(answer, None).extracted == extracted


@pytest.mark.parametrize(
    "answer, extracted",
    [
        ("Sports", "Sports"),
        ("sport", "Sports"),
        ("Sci/Tech", "Sci/Tech"),
        ("This is Science/Technology news", "Sci/Tech"),
        ("science and technology", "Sci/Tech"),
        ("tech", "Sci/Tech"),
        ("Business, or maybe World", "Business"),
        ("world", "World"),
        ("worldwide sportswear", None),  # whole words only
        ("", None),
    ],
)
def test_topic_rule(answer, extracted):
    assert topic_label(answer, None).extracted == extracted


def test_topic_and_sentiment_correctness():
    assert topic_label("the topic is sci-tech", "Sci/Tech").correct
    assert not topic_label("Sports", "World").correct
    assert sentiment_label("Positive!", "positive").correct
    assert not sentiment_label("positive and negative", "negative").correct


def test_local_exact_match_after_normalising():
    assert score_answer("local", '  "Paris." ', "paris").correct
    assert score_answer("local", "PARIS", None, reference="Paris").correct  # no label: the reference answer
    assert not score_answer("local", "Paris, France", "Paris").correct
    assert not score_answer("local", "", "Paris").correct


def test_alpaca_unigram_f1_stand_in():
    assert unigram_f1("the cat sat", "the cat sat") == pytest.approx(1.0)
    # 2 common of 3 and 4 tokens: P = 2/3, R = 2/4, F1 = 4/7.
    assert unigram_f1("red blue green", "red blue yellow black") == pytest.approx(4 / 7)
    assert unigram_f1("", "anything") == 0.0
    good = score_answer(
        "alpaca", "Water boils at one hundred degrees", None, "water boils at one hundred degrees celsius"
    )
    bad = score_answer("alpaca", "I like turtles", None, "water boils at one hundred degrees celsius")
    assert good.correct and not bad.correct
    assert float(good.extracted) >= ALPACA_F1_THRESHOLD > float(bad.extracted)


def test_every_task_has_a_rule_and_a_new_task_can_register_one():
    assert set(TASKS.names()) <= set(ACCURACY_RULES.names())
    assert score_answer("no_such_task", "x", "x") is None
    ACCURACY_RULES.register(
        "test_metrics_yes_task", lambda answer, label, reference: Extraction(answer[:3], answer.startswith("yes"))
    )
    assert score_answer("test_metrics_yes_task", "yes indeed", None) == Extraction("yes", True)
    assert score_answer("test_metrics_yes_task", "no", None) == Extraction("no", False)
