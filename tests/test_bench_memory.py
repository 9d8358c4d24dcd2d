"""`panacea bench step`'s memory bound on the tiny model: the Panacea step holds 4 copies of the trainable
weights beyond an SFT step on the costlier of its two batches (G, H, eps and the saved w), in this process and
on a one-rank DeepSpeed ZeRO-2 engine; the command exits 0 within the bound (1 past it) and keeps the profiler's
own lines out of its table."""

from __future__ import annotations

import pytest
import yaml


@pytest.mark.parametrize(
    "zero_stage",
    [
        None,
        # Until 2026-12-07 ZeRO-2 held a fifth copy: its optimiser's flat gradient partition of the last pass,
        # kept until its step (DeepSpeedWeights now drops it at each pass; the last pass's stays).
        2,
    ],
    ids=["torch", "zero2"],
)
def test_the_panacea_step_holds_four_copies_beyond_sft_on_its_costlier_batch(tiny_run_config, zero_stage):
    from panacea_platform.diagnostics.bench_step import STATE_BOUND_COPIES, bench_step

    lines: list[str] = []
    result = bench_step(tiny_run_config(), warmup=1, repeats=1, out=lines.append, zero_stage=zero_stage)
    assert result["panacea_state_copies"] == pytest.approx(STATE_BOUND_COPIES, abs=0.05), lines
    assert result["panacea_state_within_bound"] == 1.0
    assert result["panacea_peak_extra_mb"] >= max(result["sft_task_batch_peak_mb"], result["sft_harmful_batch_peak_mb"])
    assert any("within the bound of 4" in line for line in lines)


def test_the_command_exits_0_within_the_bound_and_prints_no_profiler_lines(tiny_run_config, tmp_path, capfd):
    from panacea_platform.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_run_config().to_dict()))
    assert main(["bench", "step", "--config", str(job), "--warmup", "0", "--repeats", "1"]) == 0
    printed = capfd.readouterr()
    assert "Panacea's own state beyond SFT on its costlier batch" in printed.out
    assert "USDT" not in printed.out + printed.err and "profiler_start" not in printed.out + printed.err
