"""Search spaces as data: the schema of search_spaces/*.yaml, checked against RunConfig up front.

A space names RunConfig fields by dotted path (``panacea.rho``, ``panacea.lambda``,
``optim.lr``, any leaf field) with one distribution each, and says how to search
(searcher, scheduler, metric, score, Pareto objectives, resources per trial).
Every bound and every listed value is checked against the field's own schema
before any trial starts, so no trial fails on a value the config would refuse.
Errors are SearchSpaceError (a ConfigError): one line naming the key and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from panacea_platform.config import ConfigError, RunConfig, read_yaml_mapping, with_changes
from panacea_platform.config_checks import check_config
from panacea_platform.search.study_config import StudySpec, study_problem

# Fields the sweep itself sets for each trial; searching them would fight the sweep.
RESERVED_PREFIXES = ("run_name", "output_dir", "tracking", "scaling")
FIXED_RESERVED_PREFIXES = ("run_name", "output_dir", "tracking")  # every trial scales alike: fixed may set scaling.*

# Searchers beyond Ray's built-in ones: name -> (module Ray imports, pip package that provides it).
OPTIONAL_SEARCHERS: dict[str, tuple[str, str]] = {
    "optuna": ("optuna", "optuna"),
    "hyperopt": ("hyperopt", "hyperopt"),
    "bayesopt": ("bayes_opt", "bayesian-optimization"),
    "hebo": ("hebo", "HEBO"),
    "ax": ("ax", "ax-platform"),
    "nevergrad": ("nevergrad", "nevergrad"),
    "zoopt": ("zoopt", "zoopt"),
}
BUILTIN_SEARCHERS = ("random", "grid")

# Metrics every trial reports (cheap signals during training, final ones at the end).
CHEAP_SIGNALS = (
    "heldout_task_loss",
    "heldout_harmful_loss",
    "released_heldout_harmful_loss",
    "released_heldout_task_loss",
)


class SearchSpaceError(ConfigError):
    """A search space that cannot be run; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of grid, choice, uniform, loguniform."""

    grid: list[Any] | None = Field(None, description="Every value, each in its own trial (times num_samples).")
    choice: list[Any] | None = Field(None, description="One value drawn at random per trial.")
    uniform: list[float] | None = Field(None, description="[lo, hi]: drawn uniformly.")
    loguniform: list[float] | None = Field(None, description="[lo, hi], lo > 0: drawn uniformly in log space.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} is empty: list at least one value")
        if given[0] in ("uniform", "loguniform"):
            if len(values) != 2:
                raise ValueError(f"{given[0]} takes [lo, hi], got {len(values)} numbers")
            lo, hi = values
            if not lo < hi:
                raise ValueError(f"{given[0]} [{lo}, {hi}]: lo must be below hi")
            if given[0] == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform [{lo}, {hi}]: lo must be > 0 (log of {lo} is undefined)")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any]:
        return list(getattr(self, self.kind))

    def tune_domain(self) -> Any:
        """The Ray Tune domain for this distribution (imported lazily)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "choice":
            return tune.choice(self.values)
        lo, hi = self.values
        return tune.uniform(lo, hi) if self.kind == "uniform" else tune.loguniform(lo, hi)


class SchedulerSpec(_Strict):
    type: Literal["none", "asha"] = Field("none", description="'asha' stops trials that lag at each rung.")
    grace_period: int = Field(1, ge=1, description="ASHA: training steps before a trial can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    max_t: int | None = Field(None, ge=1, description="ASHA: the longest trial in steps; null = the job's max_steps.")


class Objective(_Strict):
    metric: str = Field(..., min_length=1, description="A metric every finished trial reports.")
    mode: Literal["min", "max"]


MOVED_RESOURCES = ("num_workers", "zero_stage", "cpus_per_worker", "gpus_per_worker", "checkpoint_every")


class Resources(_Strict):
    """What a trial holds besides its Ray Train workers; the workers are the trial config's `scaling`
    (the job's, changed under `fixed:`), their one home."""

    trial_cpus: float = Field(
        0.05, gt=0, description="CPUs the trial's own function holds (it only waits on its workers; Ray refuses 0)."
    )

    @model_validator(mode="before")
    @classmethod
    def _scaling_lives_in_the_config(cls, value: Any) -> Any:
        moved = [key for key in MOVED_RESOURCES if isinstance(value, dict) and key in value]
        if moved:
            field = {"gpus_per_worker": "use_gpu"}.get(moved[0], moved[0])
            raise ValueError(
                f"{moved[0]}: a trial's workers are the job's scaling section; set scaling.{field} "
                "under fixed: (every trial alike) or in the job"
            )
        return value


def default_score() -> dict[str, float]:
    # Lower is better: the released model's (w + eps) task loss down and harmful loss up. Both at w + eps:
    # a perturbation that wrecks the model raises its harmful loss too, and only its task loss shows it
    # (random noise of sigma 0.3 scored best under the task loss at w).
    return {"released_heldout_task_loss": 1.0, "released_heldout_harmful_loss": -0.1}


def default_objectives() -> list[Objective]:
    return [
        Objective(metric="eval/harmful/harmful_score", mode="min"),
        Objective(metric="eval/task/accuracy", mode="max"),
    ]


def default_proxy_objectives() -> list[Objective]:
    # Without the final evaluation: harm proxy = the released model's loss on held-out harmful
    # answers (higher = worse at producing them), accuracy proxy = its held-out task loss.
    return [
        Objective(metric="released_heldout_harmful_loss", mode="max"),
        Objective(metric="released_heldout_task_loss", mode="min"),
    ]


class SearchSpace(_Strict):
    base_job: str | None = Field(None, description="Job YAML the trials start from; `panacea sweep -c` overrides it.")
    parameters: dict[str, Distribution] = Field(
        ..., min_length=1, description="Dotted RunConfig field -> distribution (panacea.lambda included)."
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted field -> one value for every trial (e.g. evaluation.cpus_per_actor).",
    )
    num_samples: int = Field(1, ge=1, description="Samples of the space (grid: repeats of the whole grid).")
    searcher: str = Field(
        "random", description="'random', 'grid', or an installed Ray searcher (optuna, hyperopt, ...)."
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: str = Field(
        "score", description="What the scheduler and 'best so far' rank by: 'score' or a reported metric."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether metric is better low or high.")
    score: dict[str, float] = Field(
        default_factory=default_score,
        description="score = sum(weight * metric) over these reported metrics, added whenever all are present.",
    )
    objectives: list[Objective] = Field(
        default_factory=default_objectives,
        min_length=2,
        max_length=3,
        description="The Pareto objectives over finished trials, two or three (the third colours the plot; needs "
        "evaluate: true), e.g. eval/harmful/harmful_score min, eval/task/accuracy max, "
        "eval/helpfulness/answered_rate max.",
    )
    proxy_objectives: list[Objective] = Field(
        default_factory=default_proxy_objectives,
        min_length=2,
        max_length=2,
        description="The Pareto objectives when evaluate is false (cheap held-out losses).",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Held-out signals every this many steps in each trial (optim.eval_every); null = the job's.",
    )
    resources: Resources = Field(default_factory=Resources)
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="At most this many trials at once; null = as resources allow."
    )
    evaluate: bool = Field(
        True, description="Run the full evaluation (harmful score, accuracy) on each finished trial."
    )
    study: StudySpec | None = Field(
        None,
        description="Print the trials as one of the paper's tables (recipes/study.py): "
        "rows and columns are two grid parameters, e.g. defence x data.harmful_ratio.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpace:
        if self.searcher not in BUILTIN_SEARCHERS and self.searcher not in OPTIONAL_SEARCHERS:
            raise ValueError(
                f"searcher {self.searcher!r}: expected one of "
                f"{', '.join(BUILTIN_SEARCHERS + tuple(OPTIONAL_SEARCHERS))}"
            )
        both = sorted(set(self.parameters) & set(self.fixed))
        if both:
            raise ValueError(f"{both[0]} is both searched (parameters) and fixed: keep one")
        kinds = {path: dist.kind for path, dist in self.parameters.items()}
        if self.searcher == "grid":
            not_grid = [path for path, kind in kinds.items() if kind != "grid"]
            if not_grid:
                raise ValueError(
                    f"searcher 'grid' needs every parameter as grid: [...]; {not_grid[0]} is {kinds[not_grid[0]]}"
                )
        if self.searcher in OPTIONAL_SEARCHERS and "grid" in kinds.values():
            grid_path = next(path for path, kind in kinds.items() if kind == "grid")
            raise ValueError(f"searcher {self.searcher!r} cannot take grid parameters ({grid_path}): use choice")
        if self.metric != "score" and not self.metric:
            raise ValueError("metric is empty")
        if self.metric == "score" and not self.score:
            raise ValueError("metric 'score' needs score: {metric: weight, ...}")
        if self.study is not None:
            problem = study_problem(self.study, self.parameters, self.num_samples, self.evaluate)
            if problem:
                raise ValueError(problem)
        return self

    def active_objectives(self) -> list[Objective]:
        return self.objectives if self.evaluate else self.proxy_objectives

    def scheduler_needs_signals(self) -> bool:
        """Whether the ranking metric comes from the periodic held-out evaluation."""
        names = set(self.score) if self.metric == "score" else {self.metric}
        return bool(names & set(CHEAP_SIGNALS))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# -- checks against the RunConfig schema -----------------------------------------------------------


def canonical_path(path: str) -> str:
    """The path as RunConfig.to_dict() spells it (aliases: panacea.lam -> panacea.lambda)."""
    model: Any = RunConfig
    names = []
    for part in path.split("."):
        found = [(n, i) for n, i in getattr(model, "model_fields", {}).items() if part in (n, i.alias)]
        if not found:
            raise SearchSpaceError(f"{path}: {part!r} is not a config field (`panacea config fields` lists them)")
        name, info = found[0]
        names.append(info.alias or name)
        model = info.annotation
    return ".".join(names)


def resolve_field(path: str):
    """The pydantic FieldInfo that a dotted RunConfig path names (aliases such as panacea.lambda included)."""
    model: type[BaseModel] = RunConfig
    parts = path.split(".")
    for index, part in enumerate(parts):
        found = None
        for name, info in model.model_fields.items():
            if part in (name, info.alias):
                found = info
                break
        where = ".".join(parts[: index + 1])
        if found is None:
            known = ", ".join(sorted(info.alias or name for name, info in model.model_fields.items()))
            raise SearchSpaceError(
                f"parameters.{path}: {where!r} is not a config field (known here: {known}; `panacea config fields` "
                "lists all)"
            )
        annotation = found.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if index < len(parts) - 1:
            if not is_section:
                raise SearchSpaceError(f"parameters.{path}: {where!r} is a value, not a section")
            model = cast(type[BaseModel], annotation)  # is_section
        elif is_section:
            raise SearchSpaceError(
                f"parameters.{path}: is a whole section; name one of its fields, e.g. {path}.<field>"
            )
    return found


def _bounds(info) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in info.metadata:
        for attribute in ("ge", "gt", "le", "lt"):
            value = getattr(item, attribute, None)
            if value is not None:
                bounds[attribute] = value
    return bounds


def _takes_floats(info) -> bool:
    try:
        TypeAdapter(info.annotation).validate_python(0.5, strict=True)
        return True
    except ValidationError:
        return False


def check_parameter(path: str, distribution: Distribution, reserved: tuple[str, ...] = RESERVED_PREFIXES) -> None:
    """The path names a leaf RunConfig field, and every value the distribution can give fits it."""
    if path.split(".")[0] in reserved:
        raise SearchSpaceError(
            f"parameters.{path}: set by the sweep for each trial (run_name, output_dir, tracking.*), or, for "
            "scaling.*, the same for every trial: set it under fixed:"
        )
    info = resolve_field(path)
    if distribution.kind in ("uniform", "loguniform"):
        if not _takes_floats(info):
            raise SearchSpaceError(
                f"parameters.{path}: {distribution.kind} draws real numbers but the field takes {info.annotation}; "
                "use grid or choice"
            )
        lo, hi = distribution.values
        bounds = _bounds(info)
        if "ge" in bounds and lo < bounds["ge"]:
            raise SearchSpaceError(
                f"parameters.{path}: lower bound {lo:g} is below the field's minimum {bounds['ge']:g}"
            )
        if "gt" in bounds and lo <= bounds["gt"]:
            raise SearchSpaceError(
                f"parameters.{path}: lower bound {lo:g} must be above the field's exclusive minimum {bounds['gt']:g}"
            )
        if "le" in bounds and hi > bounds["le"]:
            raise SearchSpaceError(
                f"parameters.{path}: upper bound {hi:g} is above the field's maximum {bounds['le']:g}"
            )
        if "lt" in bounds and hi >= bounds["lt"]:
            raise SearchSpaceError(
                f"parameters.{path}: upper bound {hi:g} must be below the field's exclusive maximum {bounds['lt']:g}"
            )
        return
    adapter = TypeAdapter(info.annotation)
    for value in distribution.values:
        try:
            checked = adapter.validate_python(_expanded(path, value))
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise SearchSpaceError(f"parameters.{path}: value {value!r} is not allowed ({reason})") from None
        bounds = _bounds(info)
        if isinstance(checked, (int, float)) and not isinstance(checked, bool):
            for attribute, ok in (
                ("ge", checked >= bounds.get("ge", checked)),
                ("gt", checked > bounds.get("gt", checked - 1)),
                ("le", checked <= bounds.get("le", checked)),
                ("lt", checked < bounds.get("lt", checked + 1)),
            ):
                if not ok:
                    symbol = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[attribute]
                    raise SearchSpaceError(
                        f"parameters.{path}: value {value!r} is out of range (the field needs {symbol} "
                        f"{bounds[attribute]:g})"
                    )


def _expanded(path: str, value: Any) -> Any:
    """A value as its field's own validator would first rewrite it (suite preset names into suites)."""
    if canonical_path(path) == "evaluation.suites" and isinstance(value, list):
        from panacea_platform.config import ConfigError
        from panacea_platform.evaluation.suites import resolve_suite_entries

        try:
            return resolve_suite_entries(value)
        except ConfigError as exc:
            raise SearchSpaceError(f"parameters.{path}: {exc}") from None
    return value


def check_space(space: SearchSpace) -> None:
    """Schema-level checks that need no job file: fields exist, values fit, the searcher is installed."""
    for path, distribution in space.parameters.items():
        check_parameter(path, distribution)
    for path, value in space.fixed.items():
        try:
            check_parameter(path, Distribution(grid=[value]), FIXED_RESERVED_PREFIXES)
        except SearchSpaceError as exc:
            raise SearchSpaceError(str(exc).replace("parameters.", "fixed.", 1)) from None
    check_searcher_installed(space.searcher)


def check_searcher_installed(searcher: str) -> None:
    if searcher in OPTIONAL_SEARCHERS:
        module, package = OPTIONAL_SEARCHERS[searcher]
        if importlib.util.find_spec(module) is None:
            raise SearchSpaceError(
                f"searcher {searcher!r} needs the package {package!r}, which is not installed: pip install {package} "
                "(or use searcher: random / grid)"
            )


def check_against_job(space: SearchSpace, base: RunConfig) -> None:
    """Every listed value and both bounds of every range give a valid RunConfig with this base job."""
    try:
        base = config_with(base, space.fixed)
    except ConfigError as exc:
        raise SearchSpaceError(f"fixed with the base job: {exc}") from None
    for path, distribution in space.parameters.items():
        for value in distribution.values:  # every listed value, or both bounds of a range
            try:
                config_with(base, {path: value})
            except ConfigError as exc:
                raise SearchSpaceError(f"parameters.{path} = {value!r} with the base job: {exc}") from None
    _check_eval_metrics(space, base)
    _check_convention(space, base)
    steps = base.optim.max_steps
    if space.scheduler.type == "asha" and space.scheduler.max_t is None and steps is None:
        raise SearchSpaceError("scheduler.max_t: the base job sets optim.epochs, not max_steps; give max_t in steps")
    eval_every = space.eval_every if space.eval_every is not None else base.optim.eval_every
    if space.scheduler.type == "asha" and space.scheduler_needs_signals() and not eval_every:
        raise SearchSpaceError(
            f"scheduler asha ranks by {space.metric!r}, which needs held-out signals during training: "
            "set eval_every: N in the space (or optim.eval_every in the job)"
        )
    if base.defence != "panacea" and any(p.startswith("panacea.") for p in space.parameters):
        if not any(p == "defence" for p in space.parameters):
            raise SearchSpaceError(
                f"parameters.panacea.*: the base job's defence is {base.defence!r}, so Panacea's settings change "
                "nothing; "
                "set defence: panacea in the job"
            )


def check_trial_scaling(space: SearchSpace, base: RunConfig) -> None:
    """A sweep's trials train on Ray Train workers: the job with the space's `fixed` names a ZeRO stage."""
    if config_with(base, space.fixed).scaling.zero_stage is None:
        raise SearchSpaceError(
            "scaling.zero_stage = None: a sweep's trials train on Ray Train workers under "
            "DeepSpeed; set scaling.zero_stage (0-3) under fixed: or in the job"
        )


def _check_convention(space: SearchSpace, base: RunConfig) -> None:
    """A sampled value the defence's authors' convention replaces would change nothing: refused."""
    from panacea_platform.algorithms.convention import set_by_convention

    for path in space.parameters:
        setting = set_by_convention(base, path)
        if setting is not None:
            raise SearchSpaceError(
                f"parameters.{path}: defence {base.defence!r} fine-tunes under its authors' convention, which sets "
                f"it ({setting}); search {setting} instead, or set model.after_alignment: continue or merge in the "
                "job (every defence alike)"
            )


def _check_eval_metrics(space: SearchSpace, base: RunConfig) -> None:
    """Objectives, the ranking metric and the score's terms that read eval/SUITE/RATE name what the trials'
    suites report: a name no trial reports would leave every trial off the front, silently."""
    from panacea_platform.evaluation.results import reported_metric_problem

    suites = {s.name: s.metric for s in base.evaluation.suites}
    named = [(f"objectives[{i}].metric", o.metric) for i, o in enumerate(space.active_objectives())]
    named += [("metric", space.metric)] + [(f"score.{key}", key) for key in space.score]
    if space.study is not None:  # a headline no trial reports would print a table of dashes
        named += [(f"study.headlines[{i}]", f"eval/{h.suite}/{h.rate}") for i, h in enumerate(space.study.headlines)]
    for where, metric in named:
        problem = reported_metric_problem(metric, suites)
        if problem:
            raise SearchSpaceError(f"{where} {metric!r}: {problem}")


def config_with(base: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A checked copy of `base` with dotted keys (aliases allowed) replaced: what each trial runs."""
    return check_config(with_changes(base, {canonical_path(dotted): value for dotted, value in changes.items()}))


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space YAML (no job file needed)."""
    tree = read_yaml_mapping(path, "search space", "see search_spaces/", SearchSpaceError)
    space = space_from_dict(tree, where=str(path))
    check_space(space)
    return space


def space_from_dict(tree: dict[str, Any], where: str = "search space") -> SearchSpace:
    try:
        return SearchSpace.model_validate(tree)
    except ValidationError as exc:
        raise SearchSpaceError(f"{where}: {_format(exc)}") from None


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{location}: unknown key (check the spelling; see search_spaces/README.md)")
        else:
            lines.append(f"{location}: {message}" if location else message)
    return "; ".join(lines)
