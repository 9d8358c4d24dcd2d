"""Harm judges, registered by name and imported only when chosen.

Every judge maps (prompts, answers) to one Verdict per answer; the pipeline
never needs to know which judge it runs.
"""

from typing import TYPE_CHECKING

from panacea_platform.evaluation.judges.base import Judge, Verdict
from panacea_platform.registry import Registry

if TYPE_CHECKING:
    from panacea_platform.config import EvaluationConfig

JUDGES: Registry = Registry("judge")
JUDGES.register("offline", "panacea_platform.evaluation.judges.offline:OfflineJudge")
JUDGES.register("beaver_dam", "panacea_platform.evaluation.judges.beaver_dam:BeaverDamJudge")
JUDGES.register("llama_guard", "panacea_platform.evaluation.judges.llama_guard:LlamaGuardJudge")
JUDGES.register("refusal", "panacea_platform.evaluation.judges.refusal:RefusalJudge")

__all__ = ["JUDGES", "Judge", "Verdict", "build_judge"]


def build_judge(config: "EvaluationConfig", name: str | None = None) -> Judge:
    """The judge `name` (default: config.judge), built from the run's evaluation settings."""
    return JUDGES.get(name or config.judge)(config)
