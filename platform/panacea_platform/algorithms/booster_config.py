"""Booster's settings, beside its step (booster.py). Defaults: the authors' smooth_align.sh."""

from pydantic import Field

from panacea_platform.config_base import Section


class BoosterConfig(Section):
    lam: float = Field(
        5.0,
        ge=0,
        alias="lambda",
        description="Weight of the harmful-loss reduction term (authors 5; Panacea's runs 100).",
    )
    alpha: float = Field(
        0.1, gt=0, description="Length of the simulated normalised harmful step (authors 0.1; Panacea's runs 0.01)."
    )
    harmful_batch_size: int = Field(
        10,
        ge=1,
        description="Rows of each harmful batch (their trainer hard-codes 10, whatever the run's harmful batch size).",
    )
