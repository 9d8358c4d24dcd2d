"""The main job: align, then fine-tune the aligned model on a poisoned set under each defence."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from panacea_platform.config import RunConfig, config_from_dict
from panacea_platform.plots import plot_method_comparison
from panacea_platform.tracking import Tracker, default_tracking_uri

# Config sections that decide what the alignment stage produces; the aligned
# adapter is reused when none of them changed.
ALIGNMENT_KEYS = ("model", "lora", "align_optim", "seed")
ALIGNMENT_DATA_KEYS = (
    "harmful_source", "harmful_file", "alignment_size", "alignment_benign_ratio", "max_length",
    "prompt_template", "pool_seed", "n", "harmful_ratio", "defender_harmful_size", "eval_harmful_size",
)


def with_changes(config: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A validated copy of `config` with dotted keys replaced."""
    tree = config.to_dict()
    for dotted, value in changes.items():
        node = tree
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config_from_dict(tree)


def alignment_key(config: RunConfig) -> str:
    tree = config.to_dict()
    relevant = {k: tree[k] for k in ALIGNMENT_KEYS}
    relevant["data"] = {k: tree["data"][k] for k in ALIGNMENT_DATA_KEYS}
    relevant["task"] = tree["data"]["task"]  # the task's held-out set is part of the stage's summary
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class DemoRow:
    method: str
    run_dir: Path
    summary: dict[str, float]


def run_demo(
    config: RunConfig, defences: list[str], out: Callable[[str], None] = print
) -> list[DemoRow]:
    from panacea_platform.training.dispatch import train

    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    rows: list[DemoRow] = []
    with Tracker(
        tracking_uri,
        config.tracking.experiment,
        config.run_name,
        artifact_root=Path(config.output_dir) / "mlartifacts",
        tags={"stage": "demo", "defences": ",".join(defences)},
    ) as parent:
        parent.log_params(config.flat())
        if config.model.adapter is not None:
            aligned = Path(config.model.adapter)
            out(f"[align] skipped: starting from the given adapter {aligned}")
            rows.append(DemoRow("given adapter", aligned.parent, _summary(aligned.parent)))
        else:
            align_config = with_changes(config, {"run_name": f"align-{alignment_key(config)}"})
            align_dir = align_config.run_dir()
            if (align_dir / "adapter" / "adapter_config.json").is_file() and (align_dir / "summary.json").is_file():
                out(f"[align] reusing the aligned adapter from an earlier run: {align_dir / 'adapter'}")
                parent.set_tags({"reused_alignment": str(align_dir)})
            else:
                train(align_config, "align", parent_run_id=parent.run_id, out=out)
            aligned = align_dir / "adapter"
            rows.append(DemoRow("aligned (before attack)", align_dir, _summary(align_dir)))
        for defence in defences:
            finetune_config = with_changes(
                config, {"defence": defence, "run_name": f"{config.run_name}-{defence}", "model.adapter": str(aligned)}
            )
            result = train(finetune_config, "finetune", parent_run_id=parent.run_id, out=out)
            rows.append(DemoRow(defence, result.run_dir, result.summary))
        table = format_table(rows)
        out(table)
        (Path(config.output_dir) / f"{config.run_name}-summary.txt").write_text(table + "\n")
        plot = plot_method_comparison(
            [(row.method, row.summary) for row in rows], Path(config.output_dir) / f"{config.run_name}-comparison.png"
        )
        parent.log_artifact(plot)
        parent.log_dict({row.method: row.summary for row in rows}, "summary.json")
        out(f"plot: {plot}")
    out(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}")
    return rows


def _summary(run_dir: Path) -> dict[str, float]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def format_table(rows: list[DemoRow]) -> str:
    columns = [
        ("task loss (held-out)", "heldout_task_loss"),
        ("harmful loss at w", "heldout_harmful_loss"),
        ("harmful loss released", "released_heldout_harmful_loss"),
        ("task loss released", "released_heldout_task_loss"),
        ("||eps||", "perturbation_norm"),
    ]
    header = f"{'method':<26}" + "".join(f"{name:>24}" for name, _ in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.summary.get(key)
            cells.append(f"{value:>24.4f}" if value is not None else f"{'-':>24}")
        lines.append(f"{row.method:<26}" + "".join(cells))
    lines.append(
        "harmful loss = mean loss on held-out harmful answers (higher = the model is worse at producing them); "
        "'released' = w_T + eps_T."
    )
    return "\n".join(lines)
