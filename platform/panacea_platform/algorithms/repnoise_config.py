"""RepNoise's settings, beside its step (repnoise.py). Defaults: Booster's repNoise.sh, the setting the
Panacea paper's comparison descends from."""

from pydantic import BaseModel, ConfigDict, Field


class RepNoiseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alpha: float = Field(0.1, ge=0, description="Weight of the harmful-loss ascent term (their --rho; original "
                         "demo 1, Booster 0.1, Panacea 0.02).")
    beta: float = Field(0.001, ge=0, description="Weight of the MMD noising term (their --lamb; original and "
                        "Booster 0.001, Panacea 0.1).")
