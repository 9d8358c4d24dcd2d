"""What a training stage gives back: the stage's run folder, its released adapter and its metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class StageResult:
    run_dir: Path
    adapter_dir: Path
    unperturbed_adapter_dir: Path | None
    perturbation_path: Path | None
    summary: dict[str, float]
    history: list[dict[str, float]]
    mlflow_run_id: str | None
