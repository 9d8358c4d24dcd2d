"""Defences as registered plugins, each acting at the stages it declares.

- align: what makes the aligned model (Vaccine, RepNoise, Booster); a defence that does not act here
  starts from the shared aligned model, aligned by plain SFT on refusals;
- finetune: the per-step rule on the user's data (Panacea, Lisa; SFT's step otherwise);
- post_finetune: what is added to w_T before release (Panacea's eps, random noise, Antidote's pruning).

The harness gives a stage what its defence declares it needs (`needs`): extra batch streams a step
draws from ("harmful": the provider's harmful set; "alignment": the alignment set), and calibration
batches after fine-tuning ("calibration": from the harmful set). Each step sees only TrainableWeights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from panacea_platform.algorithms.convention_config import FineTuneConvention
from panacea_platform.algorithms.interface import Objective, Tensors, TrainableWeights
from panacea_platform.algorithms.panacea import HarmfulDirection, panacea_step
from panacea_platform.algorithms.random_perturbation import gaussian_perturbation
from panacea_platform.algorithms.sft import sft_step

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig

ALIGN, FINETUNE, POST_FINETUNE = "align", "finetune", "post_finetune"
DEFENCE_STAGES = (ALIGN, FINETUNE, POST_FINETUNE)


def _plain(weights: TrainableWeights, batch: Any) -> dict[str, float]:
    result = sft_step(weights, batch)
    return {"task_loss": result.task_loss, "update_norm": result.update_norm}


class Defence:
    """Base: plain SFT at every stage, nothing added after training."""

    name = "sft"
    stages: tuple[str, ...] = ()
    # What the defence's stages draw besides their own data, by stage: {"align": ("harmful",)}.
    needs: dict[str, tuple[str, ...]] = {}
    # Harmful rows paired one to one with the stage's own rows (RepNoise): its harmful batches are the
    # stage's batch size, not optim.harmful_batch_size.
    pairs_harmful_rows = False

    def __init__(self) -> None:
        self.active: tuple[str, ...] = self.stages

    def acts_at(self, stage: str) -> bool:
        return stage in self.active

    def needs_at(self, stage: str) -> tuple[str, ...]:
        return self.needs.get(stage, ()) if self.acts_at(stage) else ()

    def harmful_batch_size(self, optim: Any) -> int:
        """Rows of each harmful batch at a stage optimised by `optim` (its optim or align_optim section)."""
        return optim.batch_size if self.pairs_harmful_rows else optim.harmful_batch_size

    def begin(self, steps: int) -> None:
        """Told the number of steps of the stage before the first (Lisa's warm-up is a fraction of them)."""

    def align_step(self, weights: TrainableWeights, batch: Any, extra: dict[str, Any]) -> dict[str, float]:
        """One alignment step on an alignment batch (refusals and benign answers)."""
        return _plain(weights, batch)

    def step(self, weights: TrainableWeights, batch: Any, extra: dict[str, Any]) -> dict[str, float]:
        """One fine-tuning step on the user's batch; `extra` holds a batch of each stream in needs['finetune']."""
        return _plain(weights, batch)

    def calibrate(self, batches: list[Any]) -> None:
        """The calibration batches (needs['post_finetune']), given before final_perturbation."""

    def final_perturbation(self, weights: TrainableWeights) -> Tensors | None:
        """The perturbation added to w_T for release, or None."""
        return None

    def checkpoint_tensors(self) -> Tensors | None:
        """State a checkpoint must keep to resume the steps exactly (Panacea's eps, Lisa's anchors)."""
        return None

    def restore_tensors(self, tensors: Tensors, step: int) -> None:
        """Restore what checkpoint_tensors returned, at the checkpoint's step."""

    @classmethod
    def trains_as_sft(cls) -> bool:
        """Whether fine-tuning under this defence is plain SFT from the shared aligned model (its step is
        SFT's, it draws nothing besides the user's data and it does not align): such a defence acts only
        after training, so it can be applied to an SFT run's w_T without training again
        (optim.max_steps = 0). Derived, not declared, so a new defence with its own step is never
        replaced by SFT's."""
        return cls.step is Defence.step and ALIGN not in cls.stages and not cls.needs.get(FINETUNE)

    @classmethod
    def fine_tuning(cls, config: RunConfig) -> FineTuneConvention:
        """How its authors fine-tune after alignment (algorithms/convention.py): keep training the aligned LoRA,
        as SFT's, Panacea's and Booster's runs do."""
        return FineTuneConvention()

    def settings(self) -> dict[str, Any]:
        """What the defence was built with (recorded with an aligned adapter)."""
        return {}

    @classmethod
    def build(cls, config: RunConfig) -> Defence:
        return cls()

    @classmethod
    def stage_problem(cls, config: RunConfig, stage: str) -> str | None:
        """Why `config` cannot run `stage` under this defence (None if it can): fine-tuning under an
        alignment-stage defence needs the adapter that defence aligned (checked in the config)."""
        active = config.defence_stages if config.defence_stages is not None else cls.stages
        if stage == FINETUNE and ALIGN in active and config.model.adapter is None:
            return (
                f"model.adapter = None: defence {cls.name!r} acts at alignment, so fine-tuning starts from the "
                f"adapter it aligned: run `panacea align` with defence={cls.name} and pass its adapter, or run "
                "`panacea demo`, which aligns it"
            )
        return None

    @classmethod
    def from_config(cls, config: RunConfig) -> Defence:
        defence = cls.build(config)
        if config.defence_stages is not None:
            defence.active = tuple(config.defence_stages)
        return defence


class RandomPerturbation(Defence):
    name = "random_perturbation"
    stages = (POST_FINETUNE,)

    def __init__(self, sigma: float, seed: int) -> None:
        super().__init__()
        self.sigma, self.seed = sigma, seed

    def final_perturbation(self, weights: TrainableWeights) -> Tensors | None:
        if not self.acts_at(POST_FINETUNE):
            return None
        return gaussian_perturbation(weights, self.sigma, self.seed)

    @classmethod
    def build(cls, config: RunConfig) -> RandomPerturbation:
        return cls(sigma=config.random_perturbation.sigma, seed=config.seed)


class Panacea(Defence):
    name = "panacea"
    stages = (FINETUNE, POST_FINETUNE)
    needs = {FINETUNE: ("harmful",)}

    def __init__(self, rho: float, lam: float, harmful_loss_clamp: float, refresh_every: int = 1) -> None:
        super().__init__()
        self.rho, self.lam, self.harmful_loss_clamp = rho, lam, harmful_loss_clamp
        self.refresh_every = refresh_every
        self.last_eps: Tensors | None = None
        self.kept: HarmfulDirection | None = None  # H and eps of the last refresh (refresh_every > 1)
        self.steps_done = 0
        self.harmful_objective: Objective | None = None  # None: the run's loss (a variant brings its own)

    def step(self, weights: TrainableWeights, batch: Any, extra: dict[str, Any]) -> dict[str, float]:
        if not self.acts_at(FINETUNE):
            return _plain(weights, batch)
        refresh = self.kept is None or self.steps_done % self.refresh_every == 0
        result = panacea_step(
            weights,
            batch,
            extra["harmful"],
            self.rho,
            self.lam,
            self.harmful_loss_clamp,
            harmful_objective=self.harmful_objective,
            kept=None if refresh else self.kept,
        )
        self.last_eps = result.eps
        self.steps_done += 1
        metrics = {
            "task_loss": result.task_loss,
            "harmful_loss": result.harmful_loss,
            "harmful_loss_perturbed": result.harmful_loss_perturbed,
            "eps_norm": result.eps_norm,
            "update_norm": result.update_norm,
        }
        if self.refresh_every > 1:
            self.kept = result.harmful
            metrics["harmful_refreshed"] = float(refresh)  # 0: H, eps and h(w) are the last refresh's
        return metrics

    def final_perturbation(self, weights: TrainableWeights) -> Tensors | None:
        if not self.acts_at(POST_FINETUNE):
            return None
        if self.last_eps is None:
            raise RuntimeError("panacea produced no eps: training ran zero steps")
        return self.last_eps

    def checkpoint_tensors(self) -> Tensors | None:
        if self.refresh_every == 1 or self.kept is None:
            return self.last_eps
        import torch

        # A resume mid-interval reuses all three: eps, H and h(w), which the kept steps report.
        return [*self.kept.eps, *self.kept.grad, torch.tensor(self.kept.loss, dtype=torch.float64)]

    def restore_tensors(self, tensors: Tensors, step: int) -> None:
        self.steps_done = step
        if self.refresh_every == 1 or not tensors:
            self.last_eps = tensors or None
            return
        half = (len(tensors) - 1) // 2
        self.kept = HarmfulDirection(tensors[-1].item(), list(tensors[half:-1]), list(tensors[:half]))
        self.last_eps = self.kept.eps

    @classmethod
    def build(cls, config: RunConfig) -> Panacea:
        p = config.panacea
        return cls(rho=p.rho, lam=p.lam, harmful_loss_clamp=p.harmful_loss_clamp, refresh_every=p.refresh_every)


def stage_defence(config: RunConfig, stage: str) -> Defence:
    """The defence of `stage`: the run's own where it acts there; plain SFT alignment otherwise (the shared
    aligned model every defence that does not align starts from)."""
    from panacea_platform.algorithms import build_defence

    defence = build_defence(config)
    if stage == ALIGN and not defence.acts_at(ALIGN):
        return Defence()
    return defence
