"""A suite's settings (SuiteConfig) and the presets a job names, apart from the sources that load them.

A leaf beside config.py: the fields and how they contradict each other are checked here; that a
source, judge or rule is registered is checked against the registries by config_checks.py
(evaluation/suites.py holds the sources).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from panacea_platform.config_base import ConfigError, Section, read_yaml_mapping

METRICS: dict[str, str] = {
    "harmful_score": "share of answers the harm judge flags",
    "accuracy": "share of answers the rule reads as correct",
    "over_refusal": "refusal and empty-answer rates on benign prompts that sound dangerous",
    "helpfulness": "empty-answer rate, mean answer length and incoherent rate on ordinary open requests",
}

# A job that lists no suites is evaluated as before suites existed: held-out harmful + task accuracy.
DEFAULT_SUITES: tuple[dict[str, Any], ...] = (
    {"name": "harmful", "source": "harmful_heldout", "metric": "harmful_score"},
    {"name": "task", "source": "task", "metric": "accuracy", "rule": "task"},
)

SUITE_KEYS = "name, source, metric, judge, rule, size, max_new_tokens, optional"


class SuiteConfig(Section):
    """One evaluation suite (see evaluation/suites.py's docstring)."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="Suite name; metric keys are eval/NAME/...")
    source: str = Field(..., description="Registered prompt source (see `panacea list`).")
    metric: str = Field(..., description=f"One of: {', '.join(METRICS)}.")
    judge: str | None = Field(None, description="harmful_score: the harm judge; null = evaluation.judge.")
    rule: str | None = Field(
        None, description="accuracy: the rule ('task' = the fine-tuning task's); null = the source's."
    )
    size: int | None = Field(
        None, ge=1, description="Prompts (the first of the source's fixed order); null = the source's default."
    )
    max_new_tokens: int | None = Field(None, ge=1, description="Generation budget; null = the source's default.")
    optional: bool = Field(
        False, description="A hub source that is unreachable is skipped with a warning instead of an error."
    )

    @field_validator("metric")
    @classmethod
    def _metric_known(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"unknown metric; one of: {', '.join(METRICS)}")
        return value

    def problem(self) -> tuple[str, str] | None:
        """(field, message) when the fields contradict each other, else None."""
        if self.judge is not None and self.metric != "harmful_score":
            return "judge", f"only a harmful_score suite has a judge (metric is {self.metric!r})"
        if self.rule is not None and self.metric != "accuracy":
            return "rule", f"only an accuracy suite has a rule (metric is {self.metric!r})"
        return None


def preset_dirs() -> list[Path]:
    """Where suite presets are looked up: evaluation/suites/ beside the working directory, then the repository's."""
    repository = Path(__file__).resolve().parents[3] / "evaluation" / "suites"
    return list(dict.fromkeys([Path.cwd() / "evaluation" / "suites", repository]))


def _preset(name: str) -> dict[str, Any]:
    for folder in preset_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            tree = read_yaml_mapping(path, "suite preset", "presets live in evaluation/suites/")
            return {"name": name, **tree}
    known = sorted({p.stem for folder in preset_dirs() if folder.is_dir() for p in folder.glob("*.yaml")})
    raise ConfigError(
        f"evaluation.suites: no preset {name!r} in evaluation/suites/ (presets: {', '.join(known) or 'none'})"
    )


def resolve_suite_entries(entries: list[Any]) -> list[dict[str, Any]]:
    """Preset names and {preset: NAME, ...} entries expanded to full suite mappings (inline ones pass through)."""
    resolved = []
    for position, entry in enumerate(entries):
        if isinstance(entry, str):
            resolved.append(_preset(entry))
        elif isinstance(entry, dict) and "preset" in entry:
            changes = {k: v for k, v in entry.items() if k != "preset"}
            resolved.append({**_preset(str(entry["preset"])), **changes})
        elif isinstance(entry, dict):
            resolved.append(dict(entry))
        else:
            raise ConfigError(f"evaluation.suites[{position}] = {entry!r}: expected a preset name or a mapping")
    return resolved
