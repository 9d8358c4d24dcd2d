"""Antidote's settings, beside its pruning (antidote.py). Defaults: the authors' README (SST2)."""

from pydantic import BaseModel, ConfigDict, Field


class AntidoteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prune_ratio: float = Field(0.1, gt=0, lt=1, description="delta: the fraction of each LoRA factor row's "
                               "entries removed (their --dense_ratio; 0.1 SST2, 0.05 GSM8K).")
    calibration_samples: int = Field(2000, ge=1, description="Samples of the provider's harmful set the scores "
                                     "are measured on (their --sample_num; capped at the set's size).")
