"""Antidote's settings, beside its pruning (antidote.py). Defaults: the authors' README (SST2)."""

from pydantic import Field

from panacea_platform.algorithms.convention_config import FineTuneConvention
from panacea_platform.config_base import Section


class AntidoteConfig(Section):
    prune_ratio: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="delta: the fraction of each LoRA factor row's "
        "entries removed (their --dense_ratio; 0.1 SST2, 0.05 GSM8K).",
    )
    calibration_samples: int = Field(
        2000,
        ge=1,
        description="Harmful samples the scores are measured on (their "
        "--sample_num): the provider's harmful set, then the source's pairs no "
        "other pool holds (their rows 5001-6999: the provider's 1000 and 1000 more).",
    )
    fine_tuning: FineTuneConvention = Field(
        default_factory=lambda: FineTuneConvention(
            after_alignment="merge", lora_rank=256, lora_target_modules=["q_proj", "k_proj", "v_proj"]
        ),
        description="Fine-tuning before Antidote prunes (model.after_alignment: authors), as its authors' "
        "train.py: the aligned LoRA merged first, so that pruning touches only the fresh fine-tuning LoRA "
        "(r256 on q, k, v, alpha the run's), never the alignment.",
    )
