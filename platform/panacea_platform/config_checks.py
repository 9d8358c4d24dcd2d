"""The run configuration checked against what it names, before any work.

config.py checks each field on its own. This module checks what needs the registries, the data or
the models: that the defence, task, harmful source, judge, template and every suite's source, judge
and rule are registered; that the counts the data pools draw fit; that the batch splits into its
micro-batches; that the defence acts at the stages asked of it and made the aligned adapter it is
given; that the model name can be one. Every command that loads a config (`load_checked`), the
main job's arms and a sweep's trials pass through `check_config`; a failure is one ConfigError
naming the field, as config.py's own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from panacea_platform.config import ConfigError, RunConfig, field_error, load_config

__all__ = ["check_config", "load_checked"]


def load_checked(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """`load_config` and `check_config`: the config a command runs with."""
    return check_config(load_config(path, overrides))


def check_config(config: RunConfig) -> RunConfig:
    """`config` itself when everything it names exists and fits; else ConfigError naming the field."""
    for check in _CHECKS:
        problem = check(config)
        if problem:
            raise ConfigError(f"invalid configuration: {problem}")
    return config


def _registered_names(config: RunConfig) -> str | None:
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.data import HARMFUL_SOURCES, TASKS
    from panacea_platform.evaluation.judges import JUDGES

    for field, value, registry in (
        ("defence", config.defence, DEFENCES),
        ("data.task", config.data.task, TASKS),
        ("data.harmful_source", config.data.harmful_source, HARMFUL_SOURCES),
        ("evaluation.judge", config.evaluation.judge, JUDGES),
    ):
        problem = registry.problem(value)
        if problem:
            return f"{field} = {value!r}: {problem}"
    return None


def _template(config: RunConfig) -> str | None:
    from panacea_platform.data.templates import TEMPLATES

    template = config.data.prompt_template
    if template not in TEMPLATES and "{instruction}" not in template:
        return (
            f"data.prompt_template = {template!r}: must be one of {sorted(TEMPLATES)} or a string "
            "containing '{instruction}'"
        )
    return None


def _suites(config: RunConfig) -> str | None:
    from panacea_platform.evaluation.suites import suite_name_problem

    for suite in config.evaluation.suites:
        problem = suite_name_problem(suite)
        if problem:
            return f"evaluation.suites[{suite.name}].{problem}"
    return None


def _task_rule(config: RunConfig) -> str | None:
    """FA is an exact, rule-checked accuracy: a suite scored with the task's rule needs a task that has one."""
    from panacea_platform.evaluation.metrics import ACCURACY_RULES

    scored = [
        s.name
        for s in config.evaluation.suites
        if s.metric == "accuracy" and (s.rule or ("task" if s.source == "task" else None)) == "task"
    ]
    if scored and config.data.task not in ACCURACY_RULES:
        return str(
            field_error(
                "data.task",
                config.data.task,
                f"a task whose answers an accuracy rule checks (suite {scored[0]!r} scores the task: register one with "
                f"ACCURACY_RULES.register({config.data.task!r}, rule), or give the suite another rule); tasks with a "
                "rule: " + ", ".join(ACCURACY_RULES.names()),
            )
        )
    return None


def _fine_tuning_length(config: RunConfig) -> str | None:
    from panacea_platform.algorithms import DEFENCES

    if config.optim.max_steps == 0 and (
        config.model.adapter is None or not DEFENCES.get(config.defence).trains_as_sft()
    ):
        return str(
            field_error(
                "optim.max_steps",
                0,
                "at least 1, or 0 with model.adapter set and a defence that "
                "trains as SFT does (sft, random_perturbation): 0 steps release that adapter",
            )
        )
    return None


def _data_counts(config: RunConfig) -> str | None:
    """What the pools draw fits: the self-distilled requests within the benign samples they replace."""
    from panacea_platform.data.pools import poison_count
    from panacea_platform.data.self_distill import check_request_ranges

    data = config.data
    benign = poison_count(data.alignment_size, data.alignment_benign_ratio)
    if data.alignment_self_distill > benign:
        return str(
            field_error(
                "data.alignment_self_distill",
                data.alignment_self_distill,
                f"at most the alignment's benign half, {benign} (data.alignment_size x data.alignment_benign_ratio)",
            )
        )
    clean = data.n - poison_count(data.n, data.harmful_ratio)
    if data.task_self_distill > clean:
        return str(
            field_error(
                "data.task_self_distill",
                data.task_self_distill,
                f"at most the user's benign samples, {clean} (data.n minus the harmful ones)",
            )
        )
    problem = check_request_ranges(data.alignment_self_distill, data.task_self_distill)
    return str(field_error("data.task_self_distill", data.task_self_distill, problem)) if problem else None


def _accumulation(config: RunConfig) -> str | None:
    from panacea_platform.training.microbatch import check_accumulation

    for section in ("optim", "align_optim"):
        optim = getattr(config, section)
        try:
            check_accumulation(optim.batch_size, optim.grad_accum_steps, f"{section}.batch_size")
        except ConfigError as exc:
            return str(exc)
    return None


def _defence_stages(config: RunConfig) -> str | None:
    """The defence's stages exist for it, and an aligned adapter is one it made."""
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.algorithms.provenance import alignment_problem

    defence = DEFENCES.get(config.defence)
    if config.defence_stages is not None:
        unsupported = [s for s in config.defence_stages if s not in defence.stages]
        if unsupported or not config.defence_stages:
            acts = ", ".join(defence.stages) or "no stage (plain SFT)"
            return str(
                field_error(
                    "defence_stages",
                    config.defence_stages,
                    f"a non-empty subset of the stages defence {config.defence!r} acts at: {acts}",
                )
            )
    stages = config.defence_stages if config.defence_stages is not None else defence.stages
    if config.model.adapter is not None and "align" in stages:
        problem = alignment_problem(config.model.adapter, config.defence, defence.build(config).settings())
        if problem:
            return str(field_error("model.adapter", config.model.adapter, problem))
    return None


def _refresh_interval(config: RunConfig) -> str | None:
    """panacea.refresh_every amortises Panacea's own step: refused for a defence without it."""
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.algorithms.defences import Panacea

    if config.panacea.refresh_every == 1:
        return None
    builder = getattr(DEFENCES.get(config.defence), "build", None)
    if getattr(builder, "__func__", None) is not getattr(Panacea.build, "__func__", None):
        return (
            f"panacea.refresh_every = {config.panacea.refresh_every}: defence {config.defence!r} does not take "
            "Panacea's step, so it has no eps to refresh (it applies to defence panacea); leave it at 1"
        )
    return None


def _model_name(config: RunConfig) -> str | None:
    from panacea_platform.models import check_model_name

    problem = check_model_name(config.model.name)
    return str(field_error("model.name", config.model.name, problem)) if problem else None


def _storage(config: RunConfig) -> str | None:
    from panacea_platform.storage import scheme_problem

    storage = config.scaling.storage
    problem = scheme_problem(storage) if storage is not None else None
    return f"scaling.storage = {storage!r}: {problem}" if problem else None


# In the order a reader fixes them: names first, then what they draw and how they run.
_CHECKS: tuple[Callable[[RunConfig], str | None], ...] = (
    _registered_names,
    _template,
    _suites,
    _task_rule,
    _fine_tuning_length,
    _data_counts,
    _accumulation,
    _defence_stages,
    _refresh_interval,
    _model_name,
    _storage,
)
