"""RepNoise's settings, beside its step (repnoise.py). Defaults: Booster's repNoise.sh, the setting the
Panacea paper's comparison descends from."""

from typing import Literal

from pydantic import Field

from panacea_platform.algorithms.convention_config import FineTuneConvention
from panacea_platform.config_base import Section


class RepNoiseConfig(Section):
    alpha: float = Field(
        0.1,
        ge=0,
        description="Weight of the harmful-loss ascent term (their --rho; original demo 1, Booster 0.1, Panacea 0.02).",
    )
    beta: float = Field(
        0.001,
        ge=0,
        description="Weight of the MMD noising term (their --lamb; original and Booster 0.001, Panacea 0.1).",
    )
    mask: Literal["answer", "paper"] = Field(
        "answer",
        description="m, the tokens the harmful terms (and, under 'paper', the retain CE) count. 'answer': "
        "the harmful answer tokens (the original's paired design). 'paper': the tokens where the harmful row differs "
        "from its alignment row zero-padded or cut to its width, prompt and padding included, and the retain CE over "
        "the alignment row's tokens that differ from the harmful row (the Booster/Panacea copy the Panacea paper "
        "ran, repnoise_loss.py).",
    )
    fine_tuning: FineTuneConvention = Field(
        default_factory=lambda: FineTuneConvention(after_alignment="merge"),
        description="Fine-tuning after RepNoise's alignment (model.after_alignment: authors): the Panacea paper's "
        "runs merge the aligned LoRA and train a fresh one of the run's shape (repnoise_gsm8k.sh).",
    )
