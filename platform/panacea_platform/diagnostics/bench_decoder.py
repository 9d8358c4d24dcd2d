"""`panacea bench eval --decoder-dtypes float32,bfloat16`: the evaluation decoded in each dtype, on the same prompts.

Each dtype runs the whole Ray Data pipeline (generation and judging) on the
same prompts with the same model, one after the other, so their speeds are
ratios measured in one run. Then, against the first dtype:
- agreement: how many greedy answers are identical, over all prompts and per suite;
- every suite's rates with their 95% intervals, and the paired difference of
  its headline (bootstrap over prompts), as `panacea compare` prints them.
A dtype is fit to be the default where every headline's paired interval holds 0
and its point difference is inside the reference's interval; the table says
which headlines do (`within`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig
    from panacea_platform.recipes.comparison import Comparison


@dataclass
class DecoderRun:
    dtype: str
    work_seconds: float
    generated_tokens: int
    records: list[dict[str, Any]]

    @property
    def answers_per_second(self) -> float:
        return len(self.records) / self.work_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.work_seconds


@dataclass
class DecoderBenchResult:
    runs: list[DecoderRun]
    comparison: Comparison

    def identical(self, run: DecoderRun, suite: str | None = None) -> tuple[int, int]:
        """(identical answers, answers) of `run` against the first dtype's, in one suite or all."""
        pairs = [(a, b) for a, b in zip(self.runs[0].records, run.records) if suite is None or a["suite"] == suite]
        return sum(a["answer"] == b["answer"] for a, b in pairs), len(pairs)

    def headline_within(self, run: DecoderRun, suite: str) -> bool:
        """The paired headline difference holds 0, and its point lies inside the reference's interval."""
        from panacea_platform.evaluation.results import HEADLINES

        metric = self.comparison.suites[suite]
        difference = self.comparison.differences[(run.dtype, suite)]
        reference = self.comparison.cell(self.runs[0].dtype, suite, HEADLINES[metric])
        if reference is None:
            return False
        point = reference.mean + difference.difference
        return (
            difference.ci_low <= 0.0 <= difference.ci_high
            and reference.pooled.ci_low <= point <= reference.pooled.ci_high
        )


DTYPES = ("float32", "bfloat16")


def parse_dtypes(text: str) -> list[str]:
    """`--decoder-dtypes float32,bfloat16`: two or more distinct dtypes, the first the reference."""
    from panacea_platform.config import ConfigError

    dtypes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or len(dtypes) < 2 or len(set(dtypes)) < len(dtypes):
        raise ConfigError(
            f"--decoder-dtypes {text!r}: expected two or more distinct dtypes of {', '.join(DTYPES)}, "
            "the reference first, e.g. float32,bfloat16"
        )
    return dtypes


def bench_decoder_dtypes(
    config: RunConfig,
    dtypes: Sequence[str],
    n_prompts: int | None = None,
    adapter: str | Path | None = None,
    out: Callable[[str], None] = print,
) -> DecoderBenchResult:
    """Evaluate the same prompts once per decoder dtype (the first is the reference); print and return."""
    from panacea_platform.algorithms.convention import with_convention
    from panacea_platform.config import with_changes
    from panacea_platform.diagnostics.bench_eval import bench_prompts
    from panacea_platform.evaluation.pipeline import check_adapter, run_pipeline
    from panacea_platform.evaluation.results import sample_record
    from panacea_platform.ray_instance import connect_ray
    from panacea_platform.recipes.comparison import ModelAnswers, compare

    config = with_convention(config)
    check_adapter(config.model, adapter, None)
    prompts = bench_prompts(config, n_prompts)
    connect_ray()  # outside every timing
    runs = []
    for dtype in dtypes:
        out(f"[bench eval] decoder {dtype}: {len(prompts)} prompts ...")
        run = run_pipeline(with_changes(config, {"evaluation.decoder_dtype": dtype}), prompts, adapter, out=out)
        decoded_in = {row["decoder_dtype"] for row in run.rows}
        if decoded_in != {dtype}:
            raise RuntimeError(f"evaluation.decoder_dtype {dtype}: the generation actors decoded in {decoded_in}")
        records = [sample_record(row) for row in run.rows]
        runs.append(DecoderRun(dtype, run.work_seconds, sum(r["new_tokens"] for r in records), records))
    suites = {r["suite"]: r["metric"] for r in runs[0].records}
    answers = [ModelAnswers(run.dtype, f"decoder {run.dtype}", 0, run.records) for run in runs]
    result = DecoderBenchResult(runs, compare(answers, suites, reference=runs[0].dtype))
    out(format_decoder_bench(result))
    return result


def format_decoder_bench(result: DecoderBenchResult) -> str:
    from panacea_platform.recipes.comparison import format_differences, format_suite_tables

    first = result.runs[0]
    lines = [f"{'decoder':<12}{'answers/s':>10}{'tokens/s':>10}{'seconds':>9}{'speed-up':>10}{'identical answers':>19}"]
    for run in result.runs:
        same, total = result.identical(run)
        lines.append(
            f"{run.dtype:<12}{run.answers_per_second:>10.2f}{run.tokens_per_second:>10.1f}"
            f"{run.work_seconds:>9.1f}{first.work_seconds / run.work_seconds:>9.2f}x{f'{same}/{total}':>19}"
        )
    lines.append(f"speed-up: {first.dtype}'s seconds over each dtype's, generation and judging after start-up")
    for run in result.runs[1:]:
        for suite in result.comparison.suites:
            same, total = result.identical(run, suite)
            verdict = "within" if result.headline_within(run, suite) else "OUTSIDE"
            lines.append(
                f"  {run.dtype} {suite}: {same}/{total} answers identical; headline {verdict} {first.dtype}'s interval"
            )
    tables = [format_suite_tables(result.comparison), format_differences(result.comparison)]
    return "\n\n".join(["\n".join(lines), *(block for block in tables if block)])
