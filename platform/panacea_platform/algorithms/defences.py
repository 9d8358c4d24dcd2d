"""Defences as registered plugins: a per-step rule and a post-training perturbation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from panacea_platform.algorithms.interface import Tensors, TrainableWeights
from panacea_platform.algorithms.panacea import panacea_step
from panacea_platform.algorithms.random_perturbation import gaussian_perturbation
from panacea_platform.algorithms.sft import sft_step

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig


class Defence:
    """Base: plain fine-tuning, nothing added afterwards."""

    name = "sft"
    uses_harmful_batches = False

    def step(self, weights: TrainableWeights, finetune_batch: Any, harmful_batch: Any | None) -> dict[str, float]:
        result = sft_step(weights, finetune_batch)
        return {"task_loss": result.task_loss, "update_norm": result.update_norm}

    def final_perturbation(self, weights: TrainableWeights) -> Tensors | None:
        """The perturbation added to w_T for release, or None."""
        return None

    @classmethod
    def trains_as_sft(cls) -> bool:
        """Whether each step is plain SFT's (the step is not overridden): such a defence acts only after
        training, so it can be applied to an SFT run's w_T without training again (optim.max_steps = 0).
        Derived, not declared, so that a new defence with its own step is never replaced by SFT's."""
        return cls.step is Defence.step and not cls.uses_harmful_batches

    @classmethod
    def from_config(cls, config: "RunConfig") -> "Defence":
        return cls()


class RandomPerturbation(Defence):
    name = "random_perturbation"

    def __init__(self, sigma: float, seed: int) -> None:
        self.sigma = sigma
        self.seed = seed

    def final_perturbation(self, weights: TrainableWeights) -> Tensors:
        return gaussian_perturbation(weights, self.sigma, self.seed)

    @classmethod
    def from_config(cls, config: "RunConfig") -> "RandomPerturbation":
        return cls(sigma=config.random_perturbation.sigma, seed=config.seed)


class Panacea(Defence):
    name = "panacea"
    uses_harmful_batches = True

    def __init__(self, rho: float, lam: float, harmful_loss_clamp: float) -> None:
        self.rho = rho
        self.lam = lam
        self.harmful_loss_clamp = harmful_loss_clamp
        self.last_eps: Tensors | None = None

    def step(self, weights: TrainableWeights, finetune_batch: Any, harmful_batch: Any | None) -> dict[str, float]:
        if harmful_batch is None:
            raise ValueError("panacea needs a harmful batch at every step")
        result = panacea_step(weights, finetune_batch, harmful_batch, self.rho, self.lam, self.harmful_loss_clamp)
        self.last_eps = result.eps
        return {
            "task_loss": result.task_loss,
            "harmful_loss": result.harmful_loss,
            "harmful_loss_perturbed": result.harmful_loss_perturbed,
            "eps_norm": result.eps_norm,
            "update_norm": result.update_norm,
        }

    def final_perturbation(self, weights: TrainableWeights) -> Tensors:
        if self.last_eps is None:
            raise RuntimeError("panacea produced no eps: training ran zero steps")
        return self.last_eps

    @classmethod
    def from_config(cls, config: "RunConfig") -> "Panacea":
        p = config.panacea
        return cls(rho=p.rho, lam=p.lam, harmful_loss_clamp=p.harmful_loss_clamp)
