"""After training, by whoever owns the run (this process, or the driver of a Ray Train run): the
training curves, where eps goes layer by layer, and the MLflow uploads. Nothing here is collective,
so no rank waits inside a collective while it runs."""

from __future__ import annotations

from collections.abc import Callable

from panacea_platform.analysis import analyse_run, write_layer_analysis
from panacea_platform.config import RunConfig
from panacea_platform.models import resolve_model_path
from panacea_platform.plots import plot_training_curves
from panacea_platform.tracking import Tracker
from panacea_platform.training.result import StageResult


def publish_stage(
    config: RunConfig, stage: str, result: StageResult, tracker: Tracker | None, out: Callable[[str], None] = print
) -> None:
    run_dir = result.run_dir
    label = f"{stage} {config.defence}" if stage == "finetune" else stage
    curves = (
        plot_training_curves(result.history, f"{label}: {config.run_name}", run_dir / "training_curves.png")
        if result.history
        else None
    )
    # Where eps goes, layer by layer (the paper's safety-affinity observation), for any model.
    layer_files = (
        []
        if result.perturbation_path is None
        else write_layer_analysis(
            analyse_run(run_dir, resolve_model_path(config.model.name)), run_dir, f"eps per layer: {config.run_name}"
        )
    )
    if tracker is None:
        return
    for path in (
        result.adapter_dir,
        result.unperturbed_adapter_dir,
        result.perturbation_path,
        run_dir / "history.jsonl",
        run_dir / "summary.json",
        curves,
        *layer_files,
    ):
        if path is not None:
            tracker.log_artifact(path)
