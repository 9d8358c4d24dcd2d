"""The fine-tuning convention's settings (algorithms/convention.py applies them): a leaf each defence's
config takes its `fine_tuning` default from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from panacea_platform.config_base import Section


class FineTuneConvention(Section):
    """What fine-tuning does with the aligned adapter; unset values are the run's own (lora, optim)."""

    after_alignment: Literal["continue", "merge"] = Field(
        "continue",
        description="'continue' keeps training the aligned LoRA; 'merge' merges it into the base "
        "weights and trains a fresh LoRA.",
    )
    lora_rank: int | None = Field(None, ge=1, description="The fresh LoRA's rank (merge only); null: lora.rank.")
    lora_alpha: float | None = Field(None, gt=0, description="The fresh LoRA's alpha (merge only); null: lora.alpha.")
    lora_dropout: float | None = Field(
        None, ge=0, lt=1, description="The fresh LoRA's dropout (merge only); null: lora.dropout."
    )
    lora_target_modules: list[str] | None = Field(
        None, min_length=1, description="The fresh LoRA's modules (merge only); null: lora.target_modules."
    )
    lr: float | None = Field(None, gt=0, description="Fine-tuning learning rate; null: optim.lr.")
    batch_size: int | None = Field(None, ge=1, description="Fine-tuning batch size; null: optim.batch_size.")
    weight_decay: float | None = Field(None, ge=0, description="Fine-tuning weight decay; null: optim.weight_decay.")

    @model_validator(mode="after")
    def _fresh_lora_only_when_merged(self) -> FineTuneConvention:
        shaped = [k for k, v in self.model_dump().items() if k.startswith("lora_") and v is not None]
        if self.after_alignment == "continue" and shaped:
            raise ValueError(
                f"{', '.join(shaped)}: the shape of a fresh LoRA, but after_alignment is 'continue' (the "
                "aligned LoRA keeps its own); set after_alignment: merge or drop them"
            )
        return self

    def lora_settings(self) -> dict[str, Any]:
        names = {
            "lora_rank": "rank",
            "lora_alpha": "alpha",
            "lora_dropout": "dropout",
            "lora_target_modules": "target_modules",
        }
        return {f"lora.{names[k]}": v for k, v in self.model_dump().items() if k in names and v is not None}

    def optim_settings(self) -> dict[str, Any]:
        return {
            f"optim.{k}": v
            for k, v in self.model_dump().items()
            if k in ("lr", "batch_size", "weight_decay") and v is not None
        }
