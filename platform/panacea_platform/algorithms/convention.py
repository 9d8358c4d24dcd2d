"""How a defence's fine-tuning starts from the aligned adapter, as its authors ran it (../shared/defences.md).

The scripts behind the Panacea paper's numbers do one of two things after alignment:
- `continue`: keep training the aligned LoRA (SFT, Panacea, Booster: `--alternating single_lora`);
- `merge`: merge it into the base weights and train a fresh LoRA (Vaccine and RepNoise with the run's LoRA;
  Lisa with its own r8 on q, v, lr 1e-5, batch 5 and no weight decay; Antidote with its r256 on q, k, v,
  which it then prunes, so that pruning never touches the alignment).
Each defence declares its convention (`Defence.fine_tuning`); `model.after_alignment: authors`, the default,
runs each defence under its own, and `continue` or `merge` runs every defence alike (an ablation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from panacea_platform.algorithms.convention_config import FineTuneConvention

if TYPE_CHECKING:
    from panacea_platform.config import RunConfig

AUTHORS = "authors"
__all__ = [
    "AUTHORS",
    "FineTuneConvention",
    "check_fits",
    "convention_changes",
    "describe",
    "set_by_convention",
    "with_convention",
]


def describe(config: RunConfig) -> str:
    """The convention a resolved fine-tuning config runs under, as the report and MLflow show it."""
    lora, optim = config.lora, config.optim
    if config.model.adapter is None:
        start = "a fresh LoRA on the base model"
    elif config.model.after_alignment == "merge":
        start = "aligned LoRA merged, a fresh LoRA"
    else:
        start = "the aligned LoRA continued"
    return (
        f"{start} (r{lora.rank} a{lora.alpha:g} on {','.join(lora.target_modules)}, dropout {lora.dropout:g}); "
        f"lr {optim.lr:g}, batch {optim.batch_size}, weight decay {optim.weight_decay:g}"
    )


def convention_changes(config: RunConfig) -> dict[str, Any]:
    """The dotted changes that put a fine-tuning config under its defence's authors' convention ({} when the user
    chose one convention for every defence)."""
    from panacea_platform.algorithms import DEFENCES

    if config.model.after_alignment != AUTHORS:
        return {}
    convention = DEFENCES.get(config.defence).fine_tuning(config)
    fresh = convention.after_alignment == "merge" or config.model.adapter is None
    return {
        "model.after_alignment": convention.after_alignment,
        **convention.optim_settings(),
        **(convention.lora_settings() if fresh else {}),
    }


def with_convention(config: RunConfig) -> RunConfig:
    """The fine-tuning config under its convention: the defence's authors' (model.after_alignment: authors) or
    the one the user set for every defence. Idempotent: a resolved config comes back unchanged."""
    from panacea_platform.config import with_changes

    changes = convention_changes(config)
    return with_changes(config, changes) if changes else config


def set_by_convention(config: RunConfig, path: str) -> str | None:
    """The defence setting that replaces `path` (e.g. optim.lr) under the authors' convention, or None: a sweep
    that samples such a path would change nothing."""
    if path not in convention_changes(config) or path == "model.after_alignment":
        return None
    field = {
        "optim.lr": "lr",
        "optim.batch_size": "batch_size",
        "optim.weight_decay": "weight_decay",
        "lora.rank": "lora_rank",
        "lora.alpha": "lora_alpha",
        "lora.dropout": "lora_dropout",
        "lora.target_modules": "lora_target_modules",
    }[path]
    return f"{config.defence}.fine_tuning.{field}"


def check_fits(config: RunConfig) -> None:
    """A fresh LoRA the convention asks for fits the model's weights; else a ConfigError naming the setting."""
    from panacea_platform.config import ConfigError
    from panacea_platform.models import lora_fit_problem

    changes = convention_changes(config)
    if "lora.rank" not in changes and "lora.target_modules" not in changes:
        return
    resolved = with_convention(config)
    problem = lora_fit_problem(resolved.model, resolved.lora.rank, list(resolved.lora.target_modules))
    if problem:
        path, why = problem
        field = set_by_convention(config, path) or path
        value = getattr(resolved.lora, path.split(".")[1])
        raise ConfigError(
            f"{field} = {value!r}: {why}; set {field} for this model (the authors' "
            "values are for a 7B model), or model.after_alignment: continue"
        )
