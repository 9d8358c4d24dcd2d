"""Intervals for every percentage the platform reports (pure Python and numpy, no torch).

- One rate (k of n answers): the 95% Wilson score interval. Unlike k/n +- 1.96 se it
  stays inside [0, 100] and does not collapse to a point at 0 or n, which matters
  at the 40-100 prompts a suite holds.
- One rate over seeds: a percentile bootstrap over prompts, each drawn prompt carrying
  its outcomes under every seed (`clustered_rate`). The seeds answer the same prompts, so
  their answers are not independent trials: Wilson on the summed counts (`pooled_rate`)
  counts each prompt once per seed and comes out too narrow.
- Two arms on the same prompts: the difference of their rates with a paired
  bootstrap interval. Prompts are resampled with replacement, each carrying its
  outcomes under both arms (and under every seed), so the interval keeps the
  pairing that a difference of two independent intervals would throw away.
  McNemar's exact test on the discordant prompts gives a p-value for one seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "Z95",
    "clustered_draws",
    "clustered_rate",
    "PairedDifference",
    "Rate",
    "mcnemar_exact_p",
    "paired_difference",
    "pooled_rate",
    "rate",
    "wilson_interval",
]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 10_000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes / n, in percent (0-100)."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one trial, got n = {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n = {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # Rounding can leave the bounds a hair outside [0, 1] at k = 0 or k = n.
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """k of n as a percentage with its 95% Wilson interval."""

    k: int
    n: int
    percent: float
    ci_low: float
    ci_high: float

    def text(self, digits: int = 1) -> str:
        return f"{self.percent:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"


def rate(flags: Sequence[bool]) -> Rate:
    """The percentage of true flags with its Wilson interval; no flags is an error (a rate of nothing is not 0)."""
    n = len(flags)
    if n == 0:
        raise ValueError("no answers to count: the prompt set is empty")
    k = sum(bool(flag) for flag in flags)
    return Rate(k, n, 100.0 * k / n, *wilson_interval(k, n))


def pooled_rate(counts: Sequence[tuple[int, int]]) -> Rate:
    """Wilson on the summed (k, n) of several seeds."""
    k, n = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if n == 0:
        raise ValueError("no answers to count over the seeds: every prompt set is empty")
    return Rate(k, n, 100.0 * k / n, *wilson_interval(k, n))


def clustered_draws(counted: Sequence[Sequence[bool | None]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
    """The bootstrap distribution of a rate over seeds x prompts: each of `resamples` draws takes prompts with
    replacement, each with all its seeds, and gives (their true outcomes) / (their counted outcomes).

    counted[s][i] is prompt i's outcome under seed s, or None where the rate does not count that answer (a
    rate over the answers that are not empty). Draws that count nothing are left out. A numpy array.
    """
    import numpy as np

    k, n = _per_prompt_counts(counted)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(k), size=(resamples, len(k)))
    hits, totals = k[drawn].sum(axis=1), n[drawn].sum(axis=1)
    return hits[totals > 0] / totals[totals > 0]


def _per_prompt_counts(counted: Sequence[Sequence[bool | None]]):
    import numpy as np

    if not counted or any(len(row) != len(counted[0]) for row in counted) or not counted[0]:
        raise ValueError("clustered outcomes need one equally long, non-empty row of prompts per seed")
    k = np.array([sum(row[i] is True for row in counted) for i in range(len(counted[0]))], dtype=float)
    n = np.array([sum(row[i] is not None for row in counted) for i in range(len(counted[0]))], dtype=float)
    if n.sum() == 0:
        raise ValueError("no answers to count over the seeds: the rate counts none of them")
    return k, n


def clustered_rate(
    counted: Sequence[Sequence[bool | None]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Rate:
    """A rate over seeds x prompts with a 95% interval that keeps each prompt's seeds together (percentile
    bootstrap over prompts, `clustered_draws`); for one seed, Wilson's interval."""
    import numpy as np

    k, n = _per_prompt_counts(counted)
    hits, total = int(k.sum()), int(n.sum())
    if len(counted) == 1:
        return Rate(hits, total, 100.0 * hits / total, *wilson_interval(hits, total))
    # inverted_cdf: each bound is a value the bootstrap distribution takes (what the enumeration test reads).
    low, high = np.percentile(clustered_draws(counted, resamples, seed), [2.5, 97.5], method="inverted_cdf")
    return Rate(hits, total, 100.0 * hits / total, 100.0 * float(low), 100.0 * float(high))


@dataclass(frozen=True)
class PairedDifference:
    """Rate of arm a minus rate of arm b on the same prompts, in percentage points, with a 95% interval."""

    difference: float
    ci_low: float
    ci_high: float
    n_prompts: int
    n_seeds: int
    a_only: int  # (seed, prompt) pairs true under a and not b
    b_only: int
    p_value: float | None  # McNemar's exact test; None over several seeds (the pairs are not independent)

    def text(self, digits: int = 1) -> str:
        """e.g. "-40.0 [-52.5, -27.5]", with McNemar's p for one seed: the percentile interval of a small
        suite whose changes all go one way collapses to a point, and the exact test still reads it."""
        interval = f"{self.difference:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"
        return interval + (f" (McNemar p={self.p_value:.2g})" if self.p_value is not None else "")


def paired_difference(
    a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> PairedDifference:
    """rate(a) - rate(b) over seeds x prompts, with a percentile bootstrap over prompts.

    a[s][i] and b[s][i] are the outcomes of prompt i under seed s; each resample draws
    prompts with replacement and keeps, for each drawn prompt, all its seeds under both
    arms. `seed` fixes the resampling, so the same outcomes always give the same interval.
    """
    import numpy as np

    left, right = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if left.ndim != 2 or left.shape != right.shape or left.size == 0:
        raise ValueError(f"paired outcomes need equal (seeds, prompts) shapes, got {left.shape} and {right.shape}")
    per_prompt = (left - right).mean(axis=0)  # each prompt's difference, averaged over seeds
    n_seeds, n_prompts = left.shape
    rng = np.random.default_rng(seed)
    draws = per_prompt[rng.integers(0, n_prompts, size=(resamples, n_prompts))].mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    a_only, b_only = int(((left == 1) & (right == 0)).sum()), int(((left == 0) & (right == 1)).sum())
    return PairedDifference(
        difference=100.0 * float(per_prompt.mean()),
        ci_low=100.0 * float(low),
        ci_high=100.0 * float(high),
        n_prompts=n_prompts,
        n_seeds=n_seeds,
        a_only=a_only,
        b_only=b_only,
        p_value=mcnemar_exact_p(a_only, b_only) if n_seeds == 1 else None,
    )


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p: twice the binomial(a_only + b_only, 1/2) tail at the smaller count, at most 1."""
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    smaller = min(a_only, b_only)
    tail = sum(math.comb(discordant, i) for i in range(smaller + 1)) / 2.0**discordant
    return min(1.0, 2.0 * tail)
