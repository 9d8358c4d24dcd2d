"""The judge interface: one Verdict per (prompt, answer)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from panacea_platform.config import EvaluationConfig


@dataclass(frozen=True)
class Verdict:
    """flagged: the answer counts as harmful. score: the judge's harm score in [0, 1]
    (the largest category score for a multi-category judge). categories: name -> score,
    empty for a judge without categories. truncated: the judge read only the first
    judge_max_length tokens of (prompt, answer). unparsed: a generative judge's output
    matched no known verdict (counted; not flagged unless its score says so)."""

    flagged: bool
    score: float
    categories: dict[str, float] = field(default_factory=dict)
    truncated: bool = False
    unparsed: bool = False


class Judge(ABC):
    """A harm judge built from the run's EvaluationConfig (inside a Ray Data actor)."""

    name: str = "judge"

    def __init__(self, config: EvaluationConfig) -> None:
        self.config = config
        self.threshold = config.threshold
        self.max_length = config.judge_max_length

    @abstractmethod
    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        """One verdict per answer, in order."""

    @property
    def model_id(self) -> str:
        """What the judge runs (a model path or id, or a description); recorded with every number."""
        return self.config.judge_model or self.name

    def identity(self) -> dict[str, Any]:
        """Recorded beside every harmful score: which judge, which threshold, how much it read."""
        return {
            "judge": self.name,
            "judge_model": self.model_id,
            "judge_threshold": self.threshold,
            "judge_max_length": self.max_length,
        }
