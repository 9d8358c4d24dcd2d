"""Intervals against values worked out by hand or published."""

import math

import pytest

from panacea_platform.evaluation.stats import (
    mcnemar_exact_p,
    paired_difference,
    pooled_rate,
    rate,
    wilson_interval,
)


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table II (Wilson, 95%).
        (81, 263, 25.53, 36.62),
        (15, 148, 6.24, 16.05),
        (0, 20, 0.0, 16.11),
        (1, 29, 0.61, 17.18),
        # By hand: p = 1/2, z^2 = 3.8415, 1 + z^2/n = 1.0960; half = 1.96 sqrt(1/160 + 3.8415/6400) / 1.0960 = 0.1480.
        (20, 40, 35.20, 64.80),
        # By hand: k = 0 gives [0, (z^2/n) / (1 + z^2/n)] = [0, 0.09604 / 1.09604].
        (0, 40, 0.0, 8.76),
    ],
)
def test_wilson_interval_matches_published_and_hand_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=0.006)


def test_wilson_is_symmetric_and_bounded():
    low, high = wilson_interval(3, 17)
    mirror_low, mirror_high = wilson_interval(14, 17)
    assert (low, high) == pytest.approx((100 - mirror_high, 100 - mirror_low))
    assert wilson_interval(40, 40)[1] == 100.0 and wilson_interval(0, 40)[0] == 0.0
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_rate_and_pooled_rate():
    one = rate([True, False, False, True])
    assert (one.k, one.n, one.percent) == (2, 4, 50.0)
    assert (one.ci_low, one.ci_high) == pytest.approx(wilson_interval(2, 4))
    assert one.text() == f"50.0 [{one.ci_low:.1f}, {one.ci_high:.1f}]"
    # Pooled over seeds: Wilson on the summed counts.
    pooled = pooled_rate([(1, 10), (3, 10)])
    assert (pooled.k, pooled.n, pooled.percent) == (4, 20, 20.0)
    assert (pooled.ci_low, pooled.ci_high) == pytest.approx(wilson_interval(4, 20))
    with pytest.raises(ValueError, match="empty"):
        rate([])


def test_paired_difference_in_cases_with_a_known_bootstrap_distribution():
    # Every prompt flips the same way: every resample gives the same difference.
    all_flip = paired_difference([[True] * 6], [[False] * 6])
    assert (all_flip.difference, all_flip.ci_low, all_flip.ci_high) == (100.0, 100.0, 100.0)
    # That interval has no width; the printed difference carries the exact test beside it (2 / 2^6).
    assert all_flip.text() == "+100.0 [+100.0, +100.0] (McNemar p=0.031)"
    same = paired_difference([[True, False, True]], [[True, False, True]])
    assert (same.difference, same.ci_low, same.ci_high, same.a_only, same.b_only) == (0.0, 0.0, 0.0, 0, 0)
    # Two prompts, differences 1 and 0: resampled means are 0, 1/2, 1 with chances 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% points are 0 and 100.
    two = paired_difference([[True, False]], [[False, False]])
    assert (two.difference, two.ci_low, two.ci_high) == (50.0, 0.0, 100.0)


def test_paired_difference_agrees_with_the_paired_normal_interval_on_a_larger_case():
    # 40 prompts: 10 flagged under a only, 2 under b only, 5 under both, 23 under neither.
    a = [[True] * 10 + [False] * 2 + [True] * 5 + [False] * 23]
    b = [[False] * 10 + [True] * 2 + [True] * 5 + [False] * 23]
    result = paired_difference(a, b)
    assert result.difference == pytest.approx(20.0)
    assert (result.a_only, result.b_only, result.n_prompts, result.n_seeds) == (10, 2, 40, 1)
    # By hand: d = (10 - 2) / 40 = 0.2, se = sqrt(((10 + 2) / 40 - d^2) / 40) = 0.0806, d +- 1.96 se = [4.2, 35.8].
    assert result.ci_low == pytest.approx(4.2, abs=2.5) and result.ci_high == pytest.approx(35.8, abs=2.5)
    assert result.p_value == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    # Seeded: the same outcomes give the same interval.
    assert paired_difference(a, b) == result


def test_paired_difference_over_seeds_keeps_each_prompt_with_its_seeds():
    # Seed 0: a flags prompts 0, 1; seed 1: a flags prompt 0 only; b flags nothing.
    result = paired_difference([[1, 1, 0, 0], [1, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]])
    assert result.difference == pytest.approx(100 * 3 / 8)
    assert result.n_seeds == 2 and result.p_value is None  # McNemar assumes independent pairs
    assert "McNemar" not in result.text()
    assert 0.0 <= result.ci_low < result.difference < result.ci_high <= 100.0
    with pytest.raises(ValueError, match="equal"):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_mcnemar_exact_p_by_hand():
    assert mcnemar_exact_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert math.isclose(mcnemar_exact_p(2, 8), mcnemar_exact_p(8, 2))


def _enumerated_cdf(k: list[int], n: list[int]) -> dict[float, float]:
    """The exact bootstrap distribution of sum(k)/sum(n) over every one of the P^P equally likely draws of P
    prompts with replacement (brute force), as a CDF over its values."""
    import itertools
    from collections import Counter

    prompts = range(len(k))
    ratios = Counter()
    for draw in itertools.product(prompts, repeat=len(k)):
        total = sum(n[i] for i in draw)
        if total:
            ratios[sum(k[i] for i in draw) / total] += 1
    mass = sum(ratios.values())
    cdf, running = {}, 0
    for value in sorted(ratios):
        running += ratios[value]
        cdf[value] = running / mass
    return cdf


@pytest.mark.parametrize(
    "counted",
    [
        # 2 seeds x 5 prompts, every answer counted.
        [[True, True, True, False, True], [True, True, False, False, True]],
        # 3 seeds x 5 prompts, a rate over part of the answers (None: not counted), unequal per prompt.
        [[True, None, False, True, False], [False, False, None, True, None], [None, False, True, True, True]],
    ],
)
def test_clustered_bootstrap_matches_brute_force_enumeration(counted):
    """The Monte Carlo bootstrap against every possible draw: its CDF within 0.006 everywhere (200,000
    draws: the CDF's standard error is at most 0.0011), and the interval's ends are the enumerated 2.5%
    and 97.5% quantiles (checked to lie away from a jump, so the comparison is not decided by noise)."""
    import numpy as np

    from panacea_platform.evaluation.stats import clustered_draws, clustered_rate

    k = [sum(row[i] is True for row in counted) for i in range(len(counted[0]))]
    n = [sum(row[i] is not None for row in counted) for i in range(len(counted[0]))]
    exact = _enumerated_cdf(k, n)
    draws = clustered_draws(counted, resamples=200_000, seed=3)
    for value, probability in exact.items():
        assert float(np.mean(draws <= value + 1e-12)) == pytest.approx(probability, abs=0.006), value
    quantile = {q: min(v for v, p in exact.items() if p >= q) for q in (0.025, 0.975)}
    for q, value in quantile.items():
        below = max((p for v, p in exact.items() if v < value), default=0.0)
        assert below < q - 0.006 and exact[value] > q + 0.006  # not within noise of a jump
    rate = clustered_rate(counted, resamples=200_000, seed=3)
    assert rate.ci_low == pytest.approx(100 * quantile[0.025]) and rate.ci_high == pytest.approx(100 * quantile[0.975])
    assert rate.percent == pytest.approx(100 * sum(k) / sum(n))


def test_clustered_interval_is_wider_than_wilson_when_seeds_agree_on_each_prompt():
    """Three seeds that answer each prompt alike carry one prompt's information, not three: Wilson on the
    pooled 60 answers is too narrow; the clustered interval is about as wide as one seed's Wilson."""
    from panacea_platform.evaluation.stats import clustered_rate

    one_seed = [i % 2 == 0 for i in range(20)]
    clustered = clustered_rate([one_seed] * 3)
    pooled_low, pooled_high = wilson_interval(30, 60)
    single_low, single_high = wilson_interval(10, 20)
    assert clustered.ci_high - clustered.ci_low > 1.5 * (pooled_high - pooled_low)
    assert clustered.ci_high - clustered.ci_low == pytest.approx(single_high - single_low, rel=0.2)
    # One seed: Wilson itself.
    assert (clustered_rate([one_seed]).ci_low, clustered_rate([one_seed]).ci_high) == pytest.approx(
        (single_low, single_high)
    )
