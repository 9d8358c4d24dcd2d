"""The GPU check (panacea_platform.diagnostics.gpu_check) in its CPU smoke mode, and its shell script's syntax.

The smoke run is the GPU run's code on the tiny random Llama, on CPU, in float32: a DeepSpeed ZeRO-2
engine on a one-process gloo group, SFT and Panacea steps, and the evaluation decoder against HF
generate(). It runs as a subprocess, as on the GPU machine: its own torch.distributed group and
environment never touch the test process. About 10-20 s on 2 cores.

In float32 on the tiny model the two decoders agree on every prompt (measured: 6 of 6, every token),
so the test asks for exact agreement; on a bf16 7B model near-tied logits may flip an argmax, which is
what the GPU run reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TABLE_ROWS = (
    "SFT step, median of",
    "Panacea step, median of",
    "Panacea / SFT step time",
    "SFT peak memory, measured",
    "Panacea peak memory, planned",
    "Panacea peak memory, measured/planned",
    "greedy answers identical to HF",
    "mean common prefix with HF",
    "platform decoder",
    "HF generate()",
    "mlflow or ray imported",
    "date",
)


def _run_smoke(model_dir: Path, json_path: Path) -> subprocess.CompletedProcess:
    # One thread: the check is a smoke run here, and the machine is shared.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "platform"), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "panacea_platform.diagnostics.gpu_check",
        "--cpu-smoke",
        "--model",
        str(model_dir),
        "--json",
        str(json_path),
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _table_value(stdout: str, label: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith(label))
    return line[len(label) :].split()[0]


def test_cpu_smoke_prints_one_table_with_positive_times_and_full_decoder_agreement(tiny_llama, tmp_path):
    figures_path = tmp_path / "figures.json"
    result = _run_smoke(tiny_llama, figures_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert out.count("unit / note") == 1, "expected exactly one table"
    table = out[out.index("unit / note") :]
    for label in TABLE_ROWS:
        assert any(line.startswith(label) for line in table.splitlines()), f"row {label!r} missing:\n{table}"
    assert float(_table_value(table, "SFT step, median of 2")) > 0
    assert float(_table_value(table, "Panacea step, median of 2")) > 0
    assert _table_value(table, "SFT peak memory, measured") == "n/a"  # no torch.cuda on CPU

    figures = json.loads(figures_path.read_text())
    for step in ("sft", "panacea"):
        assert len(figures[step]["seconds"]) == 2 and all(s > 0 for s in figures[step]["seconds"])
        assert figures[step]["peak_gib"] is None and figures[step]["planned_gib"] > 0
    assert figures["panacea_over_sft"] > 0 and figures["losses_finite"]
    assert figures["lora_dtypes"] == ["float32"]
    generation = figures["generation"]
    # Otherwise generate() fell back to HF's generate() and the comparison would be HF against itself.
    assert generation["path"] == "platform KV-cache decoder"
    assert generation["identical"] == 1.0 and generation["common_prefix"] == 1.0
    assert generation["platform_tokens_per_s"] > 0 and generation["hf_tokens_per_s"] > 0
    assert generation["platform_tokens"] == generation["hf_tokens"] > 0
    assert figures["mlflow_or_ray_imported"] == []
    assert _table_value(table, "mlflow or ray imported") == "no"


def test_the_platform_modules_the_check_imports_load_neither_mlflow_nor_ray():
    """The GPU machine has neither: these imports must not need them (DeepSpeed itself tries mlflow,
    which the check blocks; see gpu_check.block_unwanted_imports)."""
    modules = [
        "panacea_platform.diagnostics.gpu_check",
        "panacea_platform.training.strategy.deepspeed",
        "panacea_platform.training.losses",
        "panacea_platform.training.schedule",
        "panacea_platform.algorithms",
        "panacea_platform.diagnostics.steps",
        "panacea_platform.diagnostics.memory_plan",
        "panacea_platform.evaluation.generation",
        "panacea_platform.config",
        "panacea_platform.models",
    ]
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "print(sorted(m for m in ('mlflow', 'ray') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
