"""Lisa's settings, beside its step (lisa.py). Defaults: the authors' lisa_poison_ratio.sh."""

from pydantic import BaseModel, ConfigDict, Field


class LisaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rho: float = Field(1.0, ge=0, description="Weight of the proximal term to the other state's anchor.")
    align_steps: int = Field(100, ge=1, description="Consecutive steps on alignment data (K_a).")
    finetune_steps: int = Field(900, ge=1, description="Consecutive steps on the user's data (K_f).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of the steps before the proximal term "
                                "applies (theirs: 10% of the steps).")
