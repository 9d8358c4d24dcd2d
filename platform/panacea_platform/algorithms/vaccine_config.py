"""Vaccine's settings, beside its step (vaccine.py). Default: the authors' README and Vaccine.sh."""

from pydantic import Field

from panacea_platform.algorithms.convention_config import FineTuneConvention
from panacea_platform.config_base import Section


class VaccineConfig(Section):
    rho: float = Field(
        2.0,
        ge=0,
        description="Norm of the hidden-state perturbation over all attention outputs "
        "(authors 2; Booster's runs 5; Panacea's runs 20).",
    )
    fine_tuning: FineTuneConvention = Field(
        default_factory=lambda: FineTuneConvention(after_alignment="merge"),
        description="Fine-tuning after Vaccine's alignment (model.after_alignment: authors): the Panacea paper's "
        "runs merge the aligned LoRA and train a fresh one of the run's shape (vaccine_gsm8k.sh).",
    )
