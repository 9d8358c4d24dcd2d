"""The paper's baselines as defences (algorithms/defences.py): Vaccine, RepNoise and Booster at
alignment, Lisa during fine-tuning, Antidote after it. Each step is in its own module, beside its config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from panacea_platform.algorithms import lisa as lisa_method
from panacea_platform.algorithms.antidote import antidote_perturbation
from panacea_platform.algorithms.booster import booster_step
from panacea_platform.algorithms.convention_config import FineTuneConvention
from panacea_platform.algorithms.defences import ALIGN, FINETUNE, POST_FINETUNE, Defence
from panacea_platform.algorithms.interface import Tensors, TrainableWeights
from panacea_platform.algorithms.repnoise import RepNoiseObjective, repnoise_step
from panacea_platform.algorithms.vaccine import vaccine_step

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig


class Vaccine(Defence):
    name = "vaccine"
    stages = (ALIGN,)

    def __init__(self, rho: float) -> None:
        super().__init__()
        self.rho = rho

    def align_step(self, weights: TrainableWeights, batch: Any, extra: dict[str, Any]) -> dict[str, float]:
        result = vaccine_step(weights, batch, self.rho)
        return {
            "task_loss": result.alignment_loss,
            "perturbed_loss": result.perturbed_loss,
            "hidden_perturbation_norm": result.hidden_perturbation_norm,
            "update_norm": result.update_norm,
        }

    def settings(self) -> dict[str, Any]:
        return {"rho": self.rho}

    @classmethod
    def fine_tuning(cls, config: RunConfig) -> FineTuneConvention:
        return config.vaccine.fine_tuning

    @classmethod
    def build(cls, config: RunConfig) -> Vaccine:
        return cls(rho=config.vaccine.rho)


class RepNoise(Defence):
    name = "repnoise"
    stages = (ALIGN,)
    needs = {ALIGN: ("harmful",)}
    pairs_harmful_rows = True

    def __init__(self, alpha: float, beta: float, compute_dtype: str = "float32", mask: str = "answer") -> None:
        super().__init__()
        self.objective = RepNoiseObjective(
            alpha, beta, compute_dtype=torch.bfloat16 if compute_dtype == "bfloat16" else None, mask=mask
        )

    def align_step(self, weights: TrainableWeights, batch: Any, extra: dict[str, Any]) -> dict[str, float]:
        result = repnoise_step(weights, batch, extra["harmful"], self.objective)
        return {"task_loss": result.loss, "update_norm": result.update_norm}

    def restore_tensors(self, tensors: Tensors, step: int) -> None:
        self.objective.step = step  # the noise of step s depends on s

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.objective.alpha, "beta": self.objective.beta, "mask": self.objective.mask}

    @classmethod
    def fine_tuning(cls, config: RunConfig) -> FineTuneConvention:
        return config.repnoise.fine_tuning

    @classmethod
    def build(cls, config: RunConfig) -> RepNoise:
        return cls(
            alpha=config.repnoise.alpha,
            beta=config.repnoise.beta,
            compute_dtype=config.model.compute_dtype,
            mask=config.repnoise.mask,
        )


class Booster(Defence):
    name = "booster"
    stages = (ALIGN,)
    needs = {ALIGN: ("harmful",)}

    def __init__(self, lam: float, alpha: float, harmful_batch: int = 10) -> None:
        super().__init__()
        self.lam, self.alpha, self.harmful_batch = lam, alpha, harmful_batch

    def harmful_batch_size(self, optim: Any) -> int:
        return self.harmful_batch  # their BoosterAlignmentTrainer's, not the run's

    def align_step(self, weights: TrainableWeights, batch: Any, extra: dict[str, Any]) -> dict[str, float]:
        result = booster_step(weights, batch, extra["harmful"], self.lam, self.alpha)
        return {
            "task_loss": result.alignment_loss,
            "harmful_loss": result.harmful_loss,
            "harmful_loss_after_step": result.harmful_loss_after_step,
            "update_norm": result.update_norm,
        }

    def settings(self) -> dict[str, Any]:
        return {"lambda": self.lam, "alpha": self.alpha, "harmful_batch_size": self.harmful_batch}

    @classmethod
    def build(cls, config: RunConfig) -> Booster:
        return cls(lam=config.booster.lam, alpha=config.booster.alpha, harmful_batch=config.booster.harmful_batch_size)


class Lisa(Defence):
    name = "lisa"
    stages = (FINETUNE,)
    needs = {FINETUNE: ("alignment",)}

    def __init__(self, rho: float, align_steps: int, finetune_steps: int, warmup_ratio: float) -> None:
        super().__init__()
        self.warmup_ratio = warmup_ratio
        self.state = lisa_method.LisaState(align_steps, finetune_steps, rho, warmup_steps=0.0)

    def begin(self, steps: int) -> None:
        self.state.warmup_steps = self.warmup_ratio * steps

    def step(self, weights: TrainableWeights, batch: Any, extra: dict[str, Any]) -> dict[str, float]:
        result = lisa_method.lisa_step(weights, self.state, extra["alignment"], batch)
        # task_loss is the user's loss on fine-tuning steps; on alignment steps it is alignment_loss.
        loss_key = "alignment_loss" if result.mode == lisa_method.ALIGN else "task_loss"
        return {
            loss_key: result.loss,
            "proximal": result.proximal,
            "update_norm": result.update_norm,
            "alignment_state": float(result.mode == lisa_method.ALIGN),
        }

    def checkpoint_tensors(self) -> Tensors | None:
        anchors = self.state.anchors
        return [*anchors[lisa_method.ALIGN], *anchors[lisa_method.FINETUNE]] if anchors else None

    def restore_tensors(self, tensors: Tensors, step: int) -> None:
        half = len(tensors) // 2
        self.state.step = step
        if not tensors:
            return
        self.state.anchors = {lisa_method.ALIGN: list(tensors[:half]), lisa_method.FINETUNE: list(tensors[half:])}

    def settings(self) -> dict[str, Any]:
        s = self.state
        return {"rho": s.rho, "align_steps": s.align_steps, "finetune_steps": s.finetune_steps}

    @classmethod
    def fine_tuning(cls, config: RunConfig) -> FineTuneConvention:
        return config.lisa.fine_tuning

    @classmethod
    def build(cls, config: RunConfig) -> Lisa:
        lisa = config.lisa
        return cls(lisa.rho, lisa.align_steps, lisa.finetune_steps, lisa.warmup_ratio)


class Antidote(Defence):
    name = "antidote"
    stages = (POST_FINETUNE,)
    needs = {POST_FINETUNE: ("calibration",)}

    def __init__(self, prune_ratio: float, calibration_samples: int) -> None:
        super().__init__()
        self.prune_ratio, self.calibration_samples = prune_ratio, calibration_samples
        self.batches: list[Any] = []

    def calibrate(self, batches: list[Any]) -> None:
        self.batches = batches

    def final_perturbation(self, weights: TrainableWeights) -> Tensors | None:
        if not self.acts_at(POST_FINETUNE):
            return None
        if not self.batches:
            raise RuntimeError("antidote was given no calibration batches")
        return antidote_perturbation(weights, self.batches, self.prune_ratio)

    def settings(self) -> dict[str, Any]:
        return {"prune_ratio": self.prune_ratio, "calibration_samples": self.calibration_samples}

    @classmethod
    def fine_tuning(cls, config: RunConfig) -> FineTuneConvention:
        return config.antidote.fine_tuning

    @classmethod
    def build(cls, config: RunConfig) -> Antidote:
        return cls(config.antidote.prune_ratio, config.antidote.calibration_samples)
