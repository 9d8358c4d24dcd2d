"""`panacea bench eval`: the Ray Data pipeline against a one-prompt-at-a-time loop like the authors'.

Both sides answer the same prompts with the same model, greedy, with the same
token budget, and do the same judging work (the run's judge on every harmful
answer, the refusal judge on every harmful answer, the accuracy rule on every
task answer). The loop is the authors' shape: batch size 1, the judge called
once per answer, in this process with torch's default threads.

Timing. The headline compares the work after start-up on both sides: for the
pipeline, from the moment the first generation actor has loaded its model to
the last answer judged (Ray start-up, actor start-up and model loading
excluded; Ray Data's batching, transfers and the judge pool included); for the
loop, generation and judging after model and judge are loaded.

Threads. The loop runs with torch's default threads (one per core, as the
authors' script would) unless `loop_threads` is given. On a CPU shared with
other processes two threads can be many times slower than one (each op waits
for a descheduled thread), which would flatter the pipeline: measure the loop
at its best thread count too (`--loop-threads 1`) and report both. The end-to-end
times (the pipeline's actors starting and loading, the loop loading model and
judge) are printed too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig


class AnswersDifferError(RuntimeError):
    """The pipeline's greedy answers differ from the loop's: a correctness bug, not a user error."""


@dataclass
class Side:
    seconds: float  # work after start-up (see the module docstring)
    end_to_end_seconds: float
    answers: list[str]
    generated_tokens: int

    @property
    def answers_per_second(self) -> float:
        return len(self.answers) / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds


@dataclass
class EvalBenchResult:
    pipeline: Side
    loop: Side
    mismatches: list[int]

    @property
    def speedup(self) -> float:
        return self.loop.seconds / self.pipeline.seconds


def _loop(config: RunConfig, prompts, adapter: str | Path | None) -> Side:
    """The authors' evaluation shape: one prompt per generate call, the judge once per answer."""
    from panacea_platform.evaluation.generation import generate_one_at_a_time
    from panacea_platform.evaluation.judges import build_judge
    from panacea_platform.evaluation.metrics import is_incoherent, score_answer
    from panacea_platform.evaluation.pipeline import load_eval_model
    from panacea_platform.models import load_tokenizer

    start = time.monotonic()
    tokenizer = load_tokenizer(config.model)
    model = load_eval_model(config.model, adapter, decoder_dtype=config.evaluation.decoder_dtype)
    judges = {name: build_judge(config.evaluation, name) for name in {p.judge for p in prompts} | {"refusal"} if name}
    loaded = time.monotonic()
    answers, tokens = [], 0
    for prompt in prompts:
        [answer] = generate_one_at_a_time(model, tokenizer, [prompt.rendered], prompt.budget)
        judges["refusal"].judge([prompt.instruction], [answer.text])
        if prompt.judge and prompt.judge != "refusal":
            judges[prompt.judge].judge([prompt.instruction], [answer.text])
        if prompt.rule:
            score_answer(prompt.rule, answer.text, prompt.label, prompt.reference)
        is_incoherent(answer.text)
        answers.append(answer.text)
        tokens += answer.new_tokens
    done = time.monotonic()
    return Side(done - loaded, done - start, answers, tokens)


def bench_prompts(config: RunConfig, n_prompts: int | None):
    """The run's evaluation prompts (harmful first, then task), the first `n_prompts` of them."""
    from panacea_platform.config import ConfigError
    from panacea_platform.evaluation.pipeline import evaluation_prompts

    prompts = evaluation_prompts(config)
    if n_prompts is not None:
        if n_prompts < 1 or n_prompts > len(prompts):
            raise ConfigError(
                f"--prompts {n_prompts}: expected 1..{len(prompts)} (the run's evaluation suites' prompts, in suite "
                "order; add suites or raise their sizes for more)"
            )
        prompts = prompts[:n_prompts]
    return prompts


def bench_eval(
    config: RunConfig,
    n_prompts: int | None = None,
    adapter: str | Path | None = None,
    out: Callable[[str], None] = print,
    loop_threads: int | None = None,
) -> EvalBenchResult:
    """Run both sides on the first `n_prompts` evaluation prompts (harmful first, then task); print and return."""
    import torch

    from panacea_platform.algorithms.convention import with_convention
    from panacea_platform.config import with_changes
    from panacea_platform.evaluation.pipeline import check_adapter, run_pipeline
    from panacea_platform.ray_instance import connect_ray

    config = with_convention(config)
    if config.evaluation.decoder_dtype not in (None, "float32"):
        # Batching changes the matrix products' shapes; in bfloat16 that rounding flips near-tied argmaxes,
        # so the check that batching changes no answer is made in float32 (--decoder-dtypes compares dtypes).
        out(f"[bench eval] evaluation.decoder_dtype {config.evaluation.decoder_dtype}: both sides decode in float32")
        config = with_changes(config, {"evaluation.decoder_dtype": "float32"})
    check_adapter(config.model, adapter, None)
    prompts = bench_prompts(config, n_prompts)
    connect_ray()  # outside both timings
    budgets = sorted({p.budget for p in prompts})
    out(
        f"[bench eval] {len(prompts)} prompts, max_new_tokens {', '.join(map(str, budgets))}; pipeline first, then "
        "the one-at-a-time loop"
    )
    run = run_pipeline(config, prompts, adapter, out=out)
    pipeline = Side(
        run.work_seconds,
        run.wall_seconds,
        [row["answer"] for row in run.rows],
        sum(row["new_tokens"] for row in run.rows),
    )
    if loop_threads is not None:
        torch.set_num_threads(loop_threads)
    out(f"[bench eval] one-at-a-time loop ({torch.get_num_threads()} torch threads) ...")
    loop = _loop(config, prompts, adapter)
    mismatches = [i for i, (a, b) in enumerate(zip(pipeline.answers, loop.answers)) if a != b]
    result = EvalBenchResult(pipeline, loop, mismatches)
    out(format_bench(result, config))
    return result


def format_bench(result: EvalBenchResult, config: RunConfig) -> str:
    evaluation = config.evaluation
    lines = [
        f"{'':<24}{'answers/s':>10}{'tokens/s':>10}{'seconds':>9}{'end-to-end s':>14}",
    ]
    for name, side in (("pipeline (Ray Data)", result.pipeline), ("one at a time", result.loop)):
        lines.append(
            f"{name:<24}{side.answers_per_second:>10.2f}{side.tokens_per_second:>10.1f}{side.seconds:>9.1f}"
            f"{side.end_to_end_seconds:>14.1f}"
        )
    lines.append(
        f"speed-up: {result.speedup:.1f}x after start-up, "
        f"{result.loop.end_to_end_seconds / result.pipeline.end_to_end_seconds:.1f}x end to end "
        f"({evaluation.generation_actors} generation actor(s) x batch {evaluation.generation_batch_size}, "
        f"{evaluation.torch_threads_per_actor or max(1, round(evaluation.cpus_per_actor))} torch thread(s) each; "
        f"{result.pipeline.generated_tokens} vs {result.loop.generated_tokens} tokens generated)"
    )
    if result.mismatches:
        lines.append(
            f"MISMATCH: {len(result.mismatches)} of {len(result.loop.answers)} greedy answers differ between the "
            f"pipeline and the loop (first at prompt {result.mismatches[0]})"
        )
    else:
        lines.append(f"greedy answers identical: {len(result.loop.answers)}/{len(result.loop.answers)}")
    return "\n".join(lines)
