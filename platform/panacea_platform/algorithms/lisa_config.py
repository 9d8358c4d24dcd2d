"""Lisa's settings, beside its step (lisa.py). Defaults: the authors' lisa_poison_ratio.sh."""

from pydantic import Field

from panacea_platform.algorithms.convention_config import FineTuneConvention
from panacea_platform.config_base import Section


class LisaConfig(Section):
    rho: float = Field(1.0, ge=0, description="Weight of the proximal term to the other state's anchor.")
    align_steps: int = Field(100, ge=1, description="Consecutive steps on alignment data (K_a).")
    finetune_steps: int = Field(900, ge=1, description="Consecutive steps on the user's data (K_f).")
    warmup_ratio: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction of the steps before the proximal term applies (theirs: 10% of the steps).",
    )
    fine_tuning: FineTuneConvention = Field(
        default_factory=lambda: FineTuneConvention(
            after_alignment="merge",
            lora_rank=8,
            lora_alpha=4.0,
            lora_dropout=0.1,
            lora_target_modules=["q_proj", "v_proj"],
            lr=1e-5,
            batch_size=5,
            weight_decay=0.0,
        ),
        description="Lisa's fine-tuning (model.after_alignment: authors), its authors' lisa_poison_ratio.sh and "
        "train.py: the aligned LoRA merged, a fresh r8 alpha-4 LoRA on q, v (dropout 0.1), lr 1e-5, batch 5, "
        "weight decay 0, where every other defence of the paper fine-tunes at lr 2e-5, batch 10, decay 0.1.",
    )
