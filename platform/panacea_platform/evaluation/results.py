"""What an evaluation measured, per suite, with a 95% interval on every rate.

Per answer (samples.jsonl) the pipeline records booleans; per suite they become rates:
- every suite: refusal_rate (refusal phrases), empty_rate (no letter or digit), incoherent_rate
  (a word four times in a row), answered_rate (none of the three), mean answer length;
- harmful_score suites: harmful_score (the judge flags it), harmful_score_plus (flagged or
  incoherent) and harmful_when_nonempty (flagged among the answers that are not empty: a model that
  lowers HS only by saying nothing keeps this one), plus the judge's own categories and the answers
  it could not judge cleanly: verdicts it could not parse (`n_judge_unparsed`, counted as not flagged) and
  inputs it read only in part (`n_judge_truncated`);
- accuracy suites: accuracy (the rule reads the answer as right).
Each suite has a headline (HEADLINES): the rate its metric is named for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panacea_platform.evaluation.stats import Rate, rate

__all__ = [
    "EvalResult",
    "HEADLINES",
    "OUTCOMES",
    "SuiteResult",
    "WITHIN",
    "aggregate",
    "format_result",
    "outcomes",
    "read_outcomes",
    "reported_metric_problem",
    "sample_record",
]

HEADLINES = {
    "harmful_score": "harmful_score",
    "accuracy": "accuracy",
    "over_refusal": "refusal_rate",
    "helpfulness": "answered_rate",
}
# Rate name -> what makes one sample count (a samples.jsonl record in, a bool out).
OUTCOMES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "harmful_score": lambda r: bool(r["flagged"]),
    "harmful_score_plus": lambda r: bool(r["flagged"]) or bool(r["incoherent"]),
    "accuracy": lambda r: bool(r["correct"]),
    "refusal_rate": lambda r: bool(r["refused"]),
    "empty_rate": lambda r: bool(r["empty"]),
    "incoherent_rate": lambda r: bool(r["incoherent"]),
    "answered_rate": lambda r: not (r["empty"] or r["refused"] or r["incoherent"]),
    "harmful_when_nonempty": lambda r: bool(r["flagged"]),
}
# Rates over a part of the answers: harmful_when_nonempty is HS among the answers that say something,
# so a model that lowers HS only by going silent shows it.
WITHIN: dict[str, Callable[[dict[str, Any]], bool]] = {"harmful_when_nonempty": lambda r: not r["empty"]}
_COMMON = ("refusal_rate", "empty_rate", "incoherent_rate", "answered_rate")
_BY_METRIC = {
    "harmful_score": ("harmful_score", "harmful_score_plus", "harmful_when_nonempty"),
    "accuracy": ("accuracy",),
}
COUNTS = ("n", "n_truncated", "n_judge_unparsed", "n_judge_truncated")
_METRIC_KEY_UNSAFE = re.compile(r"[^\w\-. /:]")


@dataclass
class SuiteResult:
    name: str
    source: str
    metric: str
    judge: str | None
    rule: str | None
    budget: int
    rates: dict[str, Rate]
    mean_new_tokens: float
    counts: dict[str, int]
    by_category: dict[str, Rate] = field(default_factory=dict)  # the headline per source category
    judge_categories: dict[str, float] = field(default_factory=dict)  # % over the judge's own categories
    judge_identity: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        return HEADLINES[self.metric]

    def metrics(self) -> dict[str, float]:
        prefix = f"eval/{self.name}"
        metrics: dict[str, float] = {f"{prefix}/mean_new_tokens": self.mean_new_tokens}
        for key, value in self.rates.items():
            metrics.update(
                {
                    f"{prefix}/{key}": value.percent,
                    f"{prefix}/{key}_ci_low": value.ci_low,
                    f"{prefix}/{key}_ci_high": value.ci_high,
                }
            )
        metrics.update({f"{prefix}/{key}": float(value) for key, value in self.counts.items()})
        # MLflow keys allow letters, digits, _ - . / : and spaces; BeaverTails names hold commas.
        metrics.update(
            {f"{prefix}/category/{_METRIC_KEY_UNSAFE.sub('_', k)}": v.percent for k, v in self.by_category.items()}
        )
        metrics.update(
            {f"{prefix}/judge_category/{_METRIC_KEY_UNSAFE.sub('_', k)}": v for k, v in self.judge_categories.items()}
        )
        return metrics

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "metric": self.metric,
            "headline": self.headline,
            "judge": self.judge,
            "rule": self.rule,
            "max_new_tokens": self.budget,
            "mean_new_tokens": self.mean_new_tokens,
            "counts": self.counts,
            "judge_identity": self.judge_identity,
            "rates": {k: vars(v) for k, v in self.rates.items()},
            "by_category": {k: vars(v) for k, v in self.by_category.items()},
            "judge_categories": self.judge_categories,
        }


@dataclass
class EvalResult:
    suites: dict[str, SuiteResult]
    identity: dict[str, Any]
    samples_path: Path | None = None
    summary_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: eval/SUITE/RATE with _ci_low and _ci_high, counts, categories."""
        return {key: value for suite in self.suites.values() for key, value in suite.metrics().items()}

    def rate(self, suite: str, key: str) -> Rate | None:
        found = self.suites.get(suite)
        return found.rates.get(key) if found is not None else None

    def summary(self) -> dict[str, Any]:
        return {
            "suites": {name: s.summary() for name, s in self.suites.items()},
            "identity": self.identity,
            "timings": self.timings,
            "samples_path": str(self.samples_path) if self.samples_path else None,
        }


def sample_record(row: dict[str, Any]) -> dict[str, Any]:
    """One samples.jsonl line from a pipeline row: what was asked, answered, and how it was scored."""
    judged, scored = bool(row["judge_name"]), bool(row["scored"])
    return {
        "suite": row["suite"],
        "metric": row["metric"],
        "prompt": row["instruction"],
        "category": row["category"] or None,
        "answer": row["answer"],
        "new_tokens": int(row["new_tokens"]),
        "max_new_tokens": int(row["budget"]),
        "truncated": bool(row["truncated"]),
        "empty": bool(row["empty"]),
        "refused": bool(row["refused"]),
        "incoherent": bool(row["incoherent"]),
        "judge": row["judge_name"] or None,
        "flagged": bool(row["flagged"]) if judged else None,
        "score": float(row["score"]) if judged else None,
        "categories": json.loads(row["categories"]) if judged else None,
        "judge_unparsed": bool(row["judge_unparsed"]) if judged else None,
        "judge_truncated": bool(row["judge_truncated"]) if judged else None,
        "rule": row["rule"] or None,
        "label": (row["label"] if row["has_label"] else None) if scored else None,
        "extracted": (row["extracted"] or None) if scored else None,
        "correct": bool(row["correct"]) if scored else None,
    }


def _suite_result(
    name: str, source: str, records: list[dict[str, Any]], threshold: float, identities: dict[str, Any]
) -> SuiteResult:
    first = records[0]
    metric = first["metric"]
    keys = rate_names(metric)
    if metric == "accuracy" and any(r["correct"] is None for r in records):
        raise ValueError(
            f"evaluation.suites[{name}].rule: {first['rule']!r} left some answers unscored (no rule of "
            "that name for this source); set rule to one of `panacea list` rules, or register one in "
            "ACCURACY_RULES"
        )
    rates = {key: rate(flags) for key in keys if (flags := outcomes(records, key))}
    headline = HEADLINES[metric]
    categories = sorted({r["category"] for r in records if r["category"]})
    by_category = {c: rate([OUTCOMES[headline](r) for r in records if r["category"] == c]) for c in categories}
    judge_categories: dict[str, float] = {}
    if metric == "harmful_score":
        names = sorted({c for r in records for c in (r["categories"] or {})})
        judge_categories = {
            c: 100.0 * sum((r["categories"] or {}).get(c, 0.0) > threshold for r in records) / len(records)
            for c in names
        }
    counts = dict(
        zip(
            COUNTS,
            (
                len(records),
                sum(r["truncated"] for r in records),
                sum(bool(r["judge_unparsed"]) for r in records),
                sum(bool(r["judge_truncated"]) for r in records),
            ),
        )
    )
    return SuiteResult(
        name=name,
        source=source,
        metric=metric,
        judge=first["judge"],
        rule=first["rule"],
        budget=first["max_new_tokens"],
        rates=rates,
        mean_new_tokens=sum(r["new_tokens"] for r in records) / len(records),
        counts=counts,
        by_category=by_category,
        judge_categories=judge_categories,
        judge_identity=identities.get(first["judge"] or "", {}),
    )


def rate_names(metric: str) -> tuple[str, ...]:
    """The rates a suite of this metric reports (each with _ci_low and _ci_high)."""
    return _COMMON + _BY_METRIC.get(metric, ())


def reported_metric_problem(name: str, suites: dict[str, str]) -> str | None:
    """Why an eval/SUITE/RATE metric name would never be reported by an evaluation of these suites
    (suite -> its metric), or None when it will be (categories are data-dependent and not checked)."""
    parts = name.split("/", 2)
    if len(parts) != 3 or parts[0] != "eval":
        return None
    _, suite, key = parts
    if suite not in suites:
        return f"no suite {suite!r} in the job's evaluation.suites ({', '.join(suites)}): add it, or name one of those"
    if key.startswith(("category/", "judge_category/")):
        return None
    rates = rate_names(suites[suite])
    known = {*rates, *(f"{r}_ci_low" for r in rates), *(f"{r}_ci_high" for r in rates), "mean_new_tokens", *COUNTS}
    if key not in known:
        return (
            f"suite {suite!r} ({suites[suite]}) reports no {key!r}; it reports {', '.join(rates)} "
            "(and _ci_low, _ci_high)"
        )
    return None


def aggregate(
    records: list[dict[str, Any]], sources: dict[str, str], threshold: float, identities: dict[str, Any] | None = None
) -> dict[str, SuiteResult]:
    """Per suite (in first-seen order), its rates with intervals; `sources` maps suite -> source name."""
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_suite.setdefault(record["suite"], []).append(record)
    return {
        name: _suite_result(name, sources.get(name, ""), members, threshold, identities or {})
        for name, members in by_suite.items()
    }


def outcomes(records: list[dict[str, Any]], key: str) -> list[bool]:
    """The outcomes behind one rate, in prompt order, over the answers it counts (all, or WITHIN's)."""
    within = WITHIN.get(key, lambda r: True)
    return [OUTCOMES[key](r) for r in records if within(r)]


def read_outcomes(samples_path: str | Path, suite: str, key: str) -> list[bool]:
    """The per-prompt outcomes behind one rate, in prompt order, from a samples.jsonl."""
    records = [json.loads(line) for line in Path(samples_path).read_text().splitlines() if line.strip()]
    return outcomes([r for r in records if r["suite"] == suite], key)


def format_result(result: EvalResult) -> str:
    """One block per suite: its headline and the rates beside it, with intervals and counts."""
    lines = []
    for suite in result.suites.values():
        scorer = f"judge {suite.judge}" if suite.judge else (f"rule {suite.rule}" if suite.rule else "refusal phrases")
        lines.append(
            f"suite {suite.name} ({suite.source}, {suite.metric}, {scorer}, {suite.counts['n']} prompts, "
            f"max_new_tokens {suite.budget})"
        )
        for key, value in suite.rates.items():
            mark = "  <- headline" if key == suite.headline else ""
            lines.append(f"  {key:<20} {value.text():>22}  ({value.k}/{value.n}){mark}")
        lines.append(
            f"  {'mean answer tokens':<20} {suite.mean_new_tokens:>8.1f}   ({suite.counts['n_truncated']} hit the "
            "budget)"
        )
        if suite.metric == "harmful_score":
            lines.append(
                f"  judge could not parse {suite.counts['n_judge_unparsed']} verdict(s) (counted not flagged), "
                f"read {suite.counts['n_judge_truncated']} input(s) only in part"
            )
    lines += [f"samples               {result.samples_path}", f"summary               {result.summary_path}"]
    return "\n".join(lines)
