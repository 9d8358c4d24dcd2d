"""Vaccine's settings, beside its step (vaccine.py). Default: the authors' README and Vaccine.sh."""

from pydantic import BaseModel, ConfigDict, Field


class VaccineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rho: float = Field(2.0, ge=0, description="Norm of the hidden-state perturbation over all attention outputs "
                       "(authors 2; Booster's runs 5; Panacea's runs 20).")
