"""Defences by stage on the tiny model: each acts where it declares, gets what it needs, and refuses
what it cannot do with one line naming the field."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from panacea_platform.cli import main
from panacea_platform.config import ConfigError, with_changes
from panacea_platform.config_checks import check_config
from panacea_platform.training.dispatch import train

QUIET = {"out": lambda line: None}


def _history(result):
    return [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def aligned(tiny_llama, placeholder_harmful_file, tmp_path_factory):
    """The shared (SFT) aligned adapter and one per alignment-stage defence, each 2 steps."""
    from conftest import tiny_config

    out = tmp_path_factory.mktemp("stages")
    made = {}
    for defence in ("sft", "vaccine", "booster", "repnoise"):
        config = tiny_config(
            tiny_llama, placeholder_harmful_file, out, f"align-{defence}", defence=defence, vaccine={"rho": 0.5}
        )
        made[defence] = (config, train(config, "align", **QUIET))
    return made


def test_alignment_stage_defences_align_and_record_it(aligned):
    for defence, key in (
        ("vaccine", "hidden_perturbation_norm"),
        ("booster", "harmful_loss_after_step"),
        ("repnoise", "task_loss"),
    ):
        config, result = aligned[defence]
        rows = _history(result)
        assert len(rows) == 2 and all(key in row and row[key] == row[key] for row in rows), defence
        made = json.loads((result.run_dir / "alignment.json").read_text())
        assert made["defence"] == defence
    assert _history(aligned["vaccine"][1])[0]["hidden_perturbation_norm"] == pytest.approx(0.5, rel=1e-5)
    assert json.loads((aligned["sft"][1].run_dir / "alignment.json").read_text())["defence"] == "sft"
    # Booster's second pass is on the same harmful batch after one normalised step down its gradient.
    row = _history(aligned["booster"][1])[0]
    assert row["harmful_loss_after_step"] < row["harmful_loss"]


def test_fine_tuning_after_an_alignment_defence_is_sft_from_its_adapter(aligned):
    config, result = aligned["vaccine"]
    tuned = train(
        with_changes(config, {"run_name": "ft-vaccine", "model.adapter": str(result.adapter_dir)}), "finetune", **QUIET
    )
    assert tuned.perturbation_path is None and set(_history(tuned)[0]) == {"step", "task_loss", "update_norm", "lr"}


def test_an_alignment_defence_refuses_an_adapter_it_did_not_make(aligned):
    config, _ = aligned["vaccine"]
    with pytest.raises(ConfigError, match=r"model.adapter = .*aligned by 'sft'"):
        check_config(with_changes(config, {"model.adapter": str(aligned["sft"][1].adapter_dir)}))
    with pytest.raises(ConfigError, match=r"model.adapter = .*aligned with \{'rho': 0.5\}"):
        check_config(
            with_changes(config, {"model.adapter": str(aligned["vaccine"][1].adapter_dir), "vaccine.rho": 3.0})
        )
    with pytest.raises(ConfigError, match="model.adapter = None: defence 'vaccine' acts at alignment"):
        train(with_changes(config, {"run_name": "no-adapter"}), "finetune", **QUIET)


def test_lisa_alternates_between_alignment_and_user_batches(aligned):
    config, result = aligned["sft"]
    lisa = with_changes(
        config,
        {
            "run_name": "lisa",
            "defence": "lisa",
            "model.adapter": str(result.adapter_dir),
            "optim.max_steps": 5,
            "lisa.align_steps": 1,
            "lisa.finetune_steps": 2,
            "lisa.warmup_ratio": 0.2,
        },
    )
    rows = _history(train(lisa, "finetune", **QUIET))
    assert [row["alignment_state"] for row in rows] == [1.0, 0.0, 0.0, 1.0, 0.0]
    # Warm-up: 20% of 5 steps = 1. Step 2 starts at the alignment anchor it just left (pull 0); step 3 is pulled.
    assert rows[0]["proximal"] == 0.0 and rows[1]["proximal"] == 0.0 and rows[2]["proximal"] > 0
    assert "alignment_loss" in rows[0] and "task_loss" in rows[1]


def test_merge_convention_trains_a_fresh_lora_on_the_merged_aligned_model(aligned):
    from panacea_platform.models import load_for_eval

    config, result = aligned["sft"]
    merged = with_changes(
        config,
        {
            "run_name": "merged",
            "defence": "sft",
            "model.adapter": str(result.adapter_dir),
            "model.after_alignment": "merge",
            "optim.max_steps": 0,
        },
    )
    released = train(merged, "finetune", **QUIET)
    fresh = load_file(str(released.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(t) == 0 for n, t in fresh.items() if "lora_B" in n)  # a new LoRA, B = 0
    ids = torch.tensor([[1, 5, 9, 3]])
    as_merged = load_for_eval(merged.model, str(released.adapter_dir))(ids).logits
    continued = with_changes(merged, {"model.after_alignment": "continue"})
    as_aligned = load_for_eval(continued.model, str(result.adapter_dir))(ids).logits
    torch.testing.assert_close(as_merged, as_aligned, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "defence_stages=[align]",
            "defence_stages = ['align']: expected a non-empty subset of the stages defence 'lisa'",
        ),
        ("lisa.align_steps=0", "lisa.align_steps"),
        ("antidote.prune_ratio=1.5", "antidote.prune_ratio"),
        ("defence_stages=[]", "defence_stages = []: expected a non-empty subset"),
    ],
)
def test_bad_defence_settings_exit_2_with_one_line(tiny_run_config, tmp_path, capsys, override, fragment):
    config = tiny_run_config(defence="lisa" if "defence_stages" in override else "antidote")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["finetune", "--config", str(path), override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], errors


def test_the_demo_refuses_an_alignment_defence_on_a_given_adapter_before_any_work(tiny_run_config, tmp_path, capsys):
    adapter = tmp_path / "someone-elses-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(model={"adapter": str(adapter)}).to_dict()))
    assert main(["demo", "--config", str(path), "--defences", "sft,booster", "--no-eval"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.adapter" in errors[0] and "aligned by 'booster'" in errors[0], errors
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("history.jsonl"))
