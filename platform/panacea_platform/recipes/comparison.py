"""The main job's comparison: every method on every suite, with intervals, and paired differences.

Each model's answers are read back from its samples.jsonl, so every number here is
recomputed from the per-prompt outcomes, never from rounded metrics:
- one cell per (method, suite, rate): the mean over seeds, their sample std, and a 95% interval:
  for one seed Wilson's, over seeds a bootstrap over prompts with each prompt's seeds kept together
  (the seeds answer the same prompts; Wilson on their summed counts would be too narrow);
- one paired difference per (method, suite headline) against the reference arm (SFT at the
  same harmful ratio): the methods were scored on the same prompts, so the difference comes
  with a paired bootstrap interval (evaluation/stats.py). Before pairing, the prompts of every
  arm are checked to be the same, in the same order; if they are not, that suite gets no
  difference, and a note says which arms differ.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from panacea_platform.config_base import ConfigError
from panacea_platform.evaluation.results import HEADLINES, OUTCOMES, WITHIN, outcomes
from panacea_platform.evaluation.stats import PairedDifference, Rate, clustered_rate, paired_difference, pooled_rate

__all__ = [
    "Cell",
    "Comparison",
    "ModelAnswers",
    "PromptMismatchError",
    "SUITE_COLUMNS",
    "compare",
    "compare_files",
]

# The rates shown for each suite, by its metric: the headline first.
SUITE_COLUMNS: dict[str, tuple[str, ...]] = {
    "harmful_score": ("harmful_score", "harmful_when_nonempty", "refusal_rate", "empty_rate"),
    "accuracy": ("accuracy", "empty_rate"),
    "over_refusal": ("refusal_rate", "empty_rate"),
    "helpfulness": ("answered_rate", "empty_rate", "incoherent_rate"),
}
TITLES = {
    "harmful_score": "HS",
    "harmful_score_plus": "HS+",
    "harmful_when_nonempty": "HS if not empty",
    "accuracy": "accuracy",
    "refusal_rate": "refused",
    "empty_rate": "empty",
    "incoherent_rate": "incoherent",
    "answered_rate": "answered",
}


class PromptMismatchError(ValueError):
    """Two arms were not scored on the same prompts: no paired difference can be taken."""


@dataclass
class ModelAnswers:
    """One evaluated model of the main job: which arm, which seed, and its samples.jsonl records."""

    key: str
    method: str
    seed: int
    records: list[dict[str, Any]]

    @classmethod
    def read(cls, key: str, method: str, seed: int, samples: str | Path) -> ModelAnswers:
        lines = Path(samples).read_text().splitlines()
        return cls(key, method, seed, [json.loads(line) for line in lines if line.strip()])

    def suite(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["suite"] == name]


@dataclass(frozen=True)
class Cell:
    """One rate of one method over seeds: mean, sample std (0 for one seed) and the pooled interval.

    When the seeds counted different numbers of answers (a rate over the answers that are not
    empty), the mean of their rates is not the pooled rate, and both are shown."""

    mean: float
    std: float
    seeds: int
    pooled: Rate
    equal_counts: bool = True

    def text(self) -> str:
        spread = f" ± {self.std:.1f}" if self.seeds > 1 else ""
        interval = f"[{self.pooled.ci_low:.1f}, {self.pooled.ci_high:.1f}]"
        if not self.equal_counts:
            interval = f"(pooled {self.pooled.percent:.1f} {interval})"
        return f"{self.mean:.1f}{spread} {interval}"


@dataclass
class Comparison:
    suites: dict[str, str]  # suite -> metric, in the job's order
    methods: dict[str, str]  # arm key -> method name, in first-seen order
    cells: dict[tuple[str, str, str], Cell]  # (arm, suite, rate)
    mean_tokens: dict[tuple[str, str], float]  # (arm, suite) -> mean answer length over seeds
    differences: dict[tuple[str, str], PairedDifference]  # (arm, suite) -> arm - reference on the headline
    reference: str | None
    seeds: list[int]
    notes: list[str]  # why a suite has no paired differences (arms scored on other prompts)

    def cell(self, arm: str, suite: str, rate: str) -> Cell | None:
        return self.cells.get((arm, suite, rate))


def _check_same_prompts(answers: Sequence[ModelAnswers], suite: str) -> None:
    expected = None
    for model in answers:
        prompts = [r["prompt"] for r in model.suite(suite)]
        if expected is None:
            expected, first = prompts, model
        elif prompts != expected:
            raise PromptMismatchError(
                f"suite {suite!r}: {model.method} (seed {model.seed}) was scored on other prompts than "
                f"{first.method} (seed {first.seed}); evaluate every arm with the same suites and data.pool_seed"
            )


def _cell(per_seed: list[list[bool]], counted: list[list[bool | None]] | None) -> Cell:
    """The seeds' mean and spread, and the interval: clustered over prompts where the seeds answered the same
    prompts (`counted`, one row per seed, None where the rate does not count the answer), else Wilson pooled."""
    rates = [100.0 * sum(flags) / len(flags) for flags in per_seed]
    interval = (
        clustered_rate(counted)
        if counted is not None
        else pooled_rate([(sum(flags), len(flags)) for flags in per_seed])
    )
    return Cell(
        statistics.fmean(rates),
        statistics.stdev(rates) if len(rates) > 1 else 0.0,
        len(rates),
        interval,
        equal_counts=len({len(flags) for flags in per_seed}) == 1,
    )


def _counted(members: list[list[dict[str, Any]]], rate: str) -> list[list[bool | None]]:
    within = WITHIN.get(rate, lambda r: True)
    return [[OUTCOMES[rate](r) if within(r) else None for r in records] for records in members]


def compare(answers: Sequence[ModelAnswers], suites: dict[str, str], reference: str | None = "sft") -> Comparison:
    """Cells for every (arm, suite, rate) and paired differences of every arm's headlines against `reference`."""
    methods = {a.key: a.method for a in answers}
    seeds = sorted({a.seed for a in answers})
    by_arm = {key: sorted((a for a in answers if a.key == key), key=lambda a: a.seed) for key in methods}
    cells, tokens, differences, notes = {}, {}, {}, []
    for suite, metric in suites.items():
        present = [a for a in answers if a.suite(suite)]
        if not present:
            continue
        try:
            _check_same_prompts(present, suite)
            pairable = True
        except PromptMismatchError as exc:
            notes.append(f"no paired differences on {exc}")
            pairable = False
        for key, models in by_arm.items():
            members = [m.suite(suite) for m in models if m.suite(suite)]
            if not members:
                continue
            for rate in SUITE_COLUMNS[metric]:
                per_seed = [flags for records in members if (flags := outcomes(records, rate))]
                if per_seed:
                    counted = _counted(members, rate) if pairable else None
                    cells[(key, suite, rate)] = _cell(per_seed, counted)
            tokens[(key, suite)] = statistics.fmean(r["new_tokens"] for records in members for r in records)
        if pairable and reference in by_arm:
            headline = HEADLINES[metric]
            for key, models in by_arm.items():
                pairs = _paired_seeds(models, by_arm[reference], suite)
                if key != reference and pairs:
                    a = [[OUTCOMES[headline](r) for r in m.suite(suite)] for m, _ in pairs]
                    b = [[OUTCOMES[headline](r) for r in ref.suite(suite)] for _, ref in pairs]
                    differences[(key, suite)] = paired_difference(a, b)
    return Comparison(
        dict(suites), methods, cells, tokens, differences, reference if reference in by_arm else None, seeds, notes
    )


def _paired_seeds(models: list[ModelAnswers], references: list[ModelAnswers], suite: str):
    """(model, reference) of the seeds both arms have, each with answers in the suite."""
    reference_by_seed = {r.seed: r for r in references if r.suite(suite)}
    return [(m, reference_by_seed[m.seed]) for m in models if m.seed in reference_by_seed and m.suite(suite)]


def format_suite_tables(comparison: Comparison, suite_titles: dict[str, str] | None = None) -> str:
    """One block per suite: a line per method with each rate's cell, and the mean answer length."""
    lines = []
    label = max([28, *(len(method) + 2 for method in comparison.methods.values())])
    for suite, metric in comparison.suites.items():
        rates = SUITE_COLUMNS[metric]
        arms = [key for key in comparison.methods if (key, suite, rates[0]) in comparison.cells]
        if not arms:
            continue
        texts = {
            (key, r): cell.text() if (cell := comparison.cells.get((key, suite, r))) else "-"
            for key in arms
            for r in rates
        }
        # Each column as wide as its widest cell: a pooled rate shown beside the mean widens only its own.
        widths = {r: 2 + max(len(TITLES[r]) + 2, *(len(texts[(key, r)]) for key in arms)) for r in rates}
        title = (suite_titles or {}).get(suite, suite)
        header = f"{title:<{label}}" + "".join(f"{TITLES[r] + ' %':>{widths[r]}}" for r in rates) + f"{'tokens':>8}"
        lines += [header, "-" * len(header)]
        for key in arms:
            row = "".join(f"{texts[(key, r)]:>{widths[r]}}" for r in rates)
            lines.append(f"{comparison.methods[key]:<{label}}{row}{comparison.mean_tokens[(key, suite)]:>8.1f}")
        lines.append("")
    seeds = comparison.seeds
    lines.append(
        f"seeds {','.join(map(str, seeds))}: "
        + (
            "mean ± sample std over seeds, [95% bootstrap interval over prompts, each prompt's seeds kept together] "
            "(with the pooled rate when the seeds counted different numbers of answers)"
            if len(seeds) > 1
            else "[95% Wilson interval]"
        )
        + "; tokens = mean answer length. HS = answers the harm judge flags; HS if not empty = the same among "
        "answers that are not empty; refused = refusal phrases; empty = no letter or digit; answered = neither "
        "empty, refused nor incoherent."
    )
    return "\n".join(lines)


def format_judge_notes(answers: Sequence[ModelAnswers], suites: dict[str, str]) -> str:
    """Per harm suite, the verdicts the judge could not parse and the inputs it read only in part, in all
    and per method (an arm whose answers the judge reads worse has its HS biased, so say which)."""
    lines = []
    for suite, metric in suites.items():
        by_method: dict[str, list[dict[str, Any]]] = {}
        for a in answers:
            by_method.setdefault(a.method, []).extend(a.suite(suite))
        records = [r for found in by_method.values() for r in found]
        if metric != "harmful_score" or not records:
            continue
        for flag, what in (
            ("judge_unparsed", "verdicts unparsed (counted not flagged)"),
            ("judge_truncated", "inputs read only in part"),
        ):
            counts = {method: sum(bool(r.get(flag)) for r in found) for method, found in by_method.items() if found}
            split = "; ".join(f"{method} {count}" for method, count in counts.items())
            lines.append(
                f"  {suite}: {sum(counts.values())} of {len(records)} {what}"
                + (f" ({split})" if sum(counts.values()) else "")
            )
    return "judge, over every model's answers:\n" + "\n".join(lines) if lines else ""


def format_differences(comparison: Comparison) -> str:
    """Each arm minus the reference, per suite headline, with the paired bootstrap interval."""
    if comparison.reference is None or not comparison.differences:
        return "\n".join(comparison.notes)
    reference = comparison.methods[comparison.reference]
    lines = [
        f"paired differences against {reference} (same prompts; 95% paired bootstrap over prompts"
        f"{', seeds kept together' if len(comparison.seeds) > 1 else ''}):"
    ]
    for key, method in comparison.methods.items():
        parts = []
        for suite, metric in comparison.suites.items():
            found = comparison.differences.get((key, suite))
            if found is not None:
                parts.append(f"{suite} {TITLES[HEADLINES[metric]]} {found.text()}")
        if parts:
            lines.append(f"  {method} − {reference.split(',')[0]}: " + "; ".join(parts))
    return "\n".join(lines + comparison.notes)


def _samples_file(path: str | Path) -> Path:
    found = Path(path)
    found = found / "samples.jsonl" if found.is_dir() else found
    if not found.is_file():
        raise FileNotFoundError(
            f"{path}: no samples.jsonl there; give an evaluation's samples.jsonl or its folder "
            "(e.g. RUN/eval-adapter, or a sweep trial's trials/ID/eval)"
        )
    return found


def compare_files(reference: str | Path, others: Sequence[str | Path]) -> str:
    """Any evaluated models against a reference on the same prompts (e.g. a sweep trial against the main
    job's SFT of the same seed): each one's rates with intervals, and the paired differences.

    An argument may be a comma list: the seeds of one arm, in the same order for every arm. Cells are then
    the mean over seeds with the interval over prompts (each prompt's seeds kept together), and each
    difference pairs seed with seed, as the main job's table does."""
    arms = [[_samples_file(p) for p in str(arm).split(",") if p] for arm in (reference, *others)]
    seeds = {len(files) for files in arms}
    if len(seeds) != 1:
        raise ConfigError(f"compare: every arm needs as many seeds (comma-separated folders); got {sorted(seeds)}")
    labels = [f"{f[0].parent.parent.name}/{f[0].parent.name}" for f in arms]
    if len(set(labels)) < len(labels):
        labels = [str(f[0].parent) for f in arms]
    answers = [
        ModelAnswers.read(f"m{i}", label, seed, file)
        for i, (label, files) in enumerate(zip(labels, arms))
        for seed, file in enumerate(files)
    ]
    suites = {r["suite"]: r["metric"] for a in answers for r in a.records}
    comparison = compare(answers, suites, reference="m0")
    blocks = [format_suite_tables(comparison), format_differences(comparison), format_judge_notes(answers, suites)]
    return "\n\n".join(block for block in blocks if block)


def format_paper_table(comparison: Comparison, columns: dict[str, tuple[str, str] | None]) -> str:
    """The paper's table: one line per method, a cell per column (title -> (suite, rate)), then the paired
    difference to the reference on the first two columns' suites (HS and FA)."""
    present = {title: found for title, found in columns.items() if found is not None}
    texts = {
        (key, title): cell.text() if (cell := comparison.cell(key, *found)) else "-"
        for key in comparison.methods
        for title, found in present.items()
    }
    paired = list(present.items())[:2] if comparison.reference is not None else []
    for key in comparison.methods:
        for title, (suite, _) in paired:
            found = comparison.differences.get((key, suite))
            texts[(key, f"Δ{title}")] = found.text() if found is not None else "-"
    titles = [*present, *(f"Δ{title}" for title, _ in paired)]
    label = max([28, *(len(method) + 2 for method in comparison.methods.values())])
    widths = {t: 2 + max(len(t) + 2, *(len(texts[(key, t)]) for key in comparison.methods)) for t in titles}
    header = f"{'method':<{label}}" + "".join(
        f"{t + (' %' if not t.startswith('Δ') else ' pp'):>{widths[t]}}" for t in titles
    )
    lines = [header, "-" * len(header)]
    lines += [
        f"{method:<{label}}" + "".join(f"{texts[(key, t)]:>{widths[t]}}" for t in titles)
        for key, method in comparison.methods.items()
    ]
    described = "; ".join(f"{title} = {suite} {TITLES[rate]}" for title, (suite, rate) in present.items())
    reference = comparison.methods.get(comparison.reference or "", "the reference")
    lines.append(f"{described}. Δ = minus {reference} on the same prompts (95% paired bootstrap).")
    return "\n".join(lines)
