"""One entry point for a stage: in this process (plain PyTorch strategy), or on Ray Train workers
(DeepSpeed strategy)."""

from __future__ import annotations

from collections.abc import Callable

from panacea_platform.config import RunConfig


def train(config: RunConfig, stage: str, parent_run_id: str | None = None, out: Callable[[str], None] = print):
    """Run `stage` as `config.scaling` asks; returns a result with run_dir, adapter_dir, summary."""
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.algorithms.convention import check_fits, with_convention
    from panacea_platform.config import ConfigError
    from panacea_platform.config_checks import check_config

    check_config(config)  # what it names exists, however the config was made
    if stage == "finetune":
        check_fits(config)
        config = with_convention(config)
    problem = DEFENCES.get(config.defence).stage_problem(config, stage)
    if problem:
        raise ConfigError(problem)
    if not config.scaling.distributed:
        from panacea_platform.training.loop import run_stage

        return run_stage(config, stage, parent_run_id=parent_run_id, out=out)
    from panacea_platform.training.launch_ray import run_distributed

    return run_distributed(config, stage, parent_run_id=parent_run_id, out=out)
