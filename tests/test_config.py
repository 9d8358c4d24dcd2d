"""Configuration: every shipped job file loads; every bad value gets one clear message and exit 2."""

from pathlib import Path

import pytest
import yaml

from panacea_platform.cli import main
from panacea_platform.config import ConfigError, RunConfig, save_config
from panacea_platform.config_checks import load_checked

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((REPO / "jobs").rglob("*.yaml"))


def test_there_are_job_files_for_the_paper_settings():
    names = {p.stem for p in JOB_FILES}
    for model in ("llama2-7b", "gemma2-9b", "qwen2-7b"):
        for task in ("gsm8k", "sst2", "ag_news", "alpaca"):
            assert f"{model}-{task}" in names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_job_file_validates(path):
    config = load_checked(path)
    assert isinstance(config, RunConfig)


@pytest.mark.parametrize("path", [p for p in JOB_FILES if p.parent.name == "paper"], ids=lambda p: p.stem)
def test_paper_jobs_carry_the_authors_settings(path):
    config = load_checked(path)
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (32, 4, 0.0)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert (config.data.n, config.data.harmful_ratio) == (1000, 0.1)
    assert (config.optim.lr, config.optim.epochs, config.optim.batch_size) == (2e-5, 20, 10)
    assert (config.panacea.rho, config.panacea.lam, config.panacea.harmful_loss_clamp) == (1.0, 1e-3, 5.0)
    assert (config.align_optim.lr, config.align_optim.epochs) == (5e-4, 20)
    assert config.data.harmful_source == "beavertails"
    # The authors' evaluation: beaver-dam-7b on 1000 BeaverTails test prompts with 512 new tokens, on GPU actors.
    from panacea_platform.evaluation.suites import suite_budget

    evaluation = config.evaluation
    assert (evaluation.judge, evaluation.judge_model, evaluation.threshold) == (
        "beaver_dam",
        "PKU-Alignment/beaver-dam-7b",
        0.5,
    )
    assert evaluation.gpus_per_actor == 1 and evaluation.generation_actors + evaluation.judge_actors == 8
    suites = {s.name: s for s in evaluation.suites}
    assert (suites["beavertails_test"].size, suite_budget(config, suites["beavertails_test"])) == (1000, 512)
    assert suites["xstest"].optional and {
        "harmbench",
        "donotanswer",
        "capability",
        "over_refusal",
        "helpfulness",
    } <= set(suites)
    task_budget = suite_budget(config, suites["task"])
    assert task_budget == {"gsm8k": 256, "alpaca": 256, "sst2": 16, "ag_news": 16}[config.data.task]


# The Panacea paper's runs (../shared/defences.md): each defence's values in jobs/paper/defences/.
PAPER_DEFENCES = {
    "vaccine": lambda c: c.vaccine.rho == 20.0,
    "repnoise": lambda c: (c.repnoise.alpha, c.repnoise.beta, c.align_optim.batch_size) == (0.02, 0.1, 5),
    "booster": lambda c: (c.booster.lam, c.booster.alpha, c.data.defender_harmful_size) == (100.0, 0.01, 1000),
    "lisa": lambda c: (c.lisa.rho, c.lisa.align_steps, c.lisa.finetune_steps) == (1.0, 100, 900),
    "antidote": lambda c: (c.antidote.prune_ratio, c.antidote.calibration_samples) == (0.05, 2000),
}


@pytest.mark.parametrize("defence", sorted(PAPER_DEFENCES))
def test_paper_defence_jobs_carry_the_papers_values_on_the_papers_base(defence):
    config = load_checked(REPO / "jobs" / "paper" / "defences" / f"llama2-7b-gsm8k-{defence}.yaml")
    base = load_checked(REPO / "jobs" / "paper" / "llama2-7b-gsm8k.yaml")
    assert config.defence == defence and PAPER_DEFENCES[defence](config)
    assert config.model.after_alignment == "authors"  # each defence under its authors' convention
    # Everything but the defence's own choices is the paper's job.
    mine = {"run_name", "defence", "align_optim", *PAPER_DEFENCES}
    assert {k: v for k, v in config.to_dict().items() if k not in mine} == {
        k: v for k, v in base.to_dict().items() if k not in mine
    }


def test_a_job_file_extends_another_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("run_name: base\noptim: {lr: 0.1, max_steps: 5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim: {max_steps: 7}\n")
    config = load_checked(tmp_path / "child.yaml")
    assert (config.run_name, config.optim.lr, config.optim.max_steps) == ("base", 0.1, 7)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="a cycle"):
        load_checked(tmp_path / "loop.yaml")


def test_overrides_are_typed_and_applied():
    config = load_checked(None, ["panacea.rho=0.5", "panacea.lambda=1e-2", "optim.max_steps=7", "defence=sft"])
    assert config.panacea.rho == 0.5
    assert config.panacea.lam == 0.01
    assert config.optim.max_steps == 7
    assert config.defence == "sft"


def test_defaults_are_the_documented_ones():
    config = RunConfig()
    assert config.panacea.harmful_loss_clamp == 5.0
    assert config.model.trust_remote_code is False


@pytest.mark.parametrize(
    "override, field, fragment",
    [
        ("panacea.rho=-1", "panacea.rho", "greater than or equal to 0"),
        ("panacea.lambda=-0.1", "panacea.lambda", "greater than or equal to 0"),
        ("random_perturbation.sigma=-2", "random_perturbation.sigma", "greater than or equal to 0"),
        ("data.harmful_ratio=1.5", "data.harmful_ratio", "less than or equal to 1"),
        ("data.harmful_ratio=-0.1", "data.harmful_ratio", "greater than or equal to 0"),
        ("data.n=0", "data.n", "greater than or equal to 1"),
        (
            "defence=tar",
            "defence",
            "registered: antidote, booster, lisa, panacea, panacea_end_masked, random_perturbation, repnoise, sft, "
            "vaccine",
        ),
        ("data.task=imagenet", "data.task", "offline_arithmetic"),
        ("model.name=not a model!", "model.name", "hub id"),
        ("model.name=./no/such/dir", "model.name", "hub id"),
        ("data.task=local", "data.task_file", "a path to a JSONL, CSV or Parquet file"),
        ("data.harmful_file=/no/such.jsonl", "data.harmful_file", "not found"),
        ("model.adapter=/no/such/adapter", "model.adapter", "adapter_config.json"),
        ("panacea.rhoo=1", "panacea.rhoo", "unknown key"),
        ("optim.lr=fast", "optim.lr", "valid number"),
        ("optim.schedule=step", "optim.schedule", "'constant', 'linear' or 'cosine'"),
        ("scaling.num_workers=2", "scaling.zero_stage", "needs scaling.zero_stage"),
        ("scaling.use_gpu=true", "scaling.use_gpu", "needs scaling.zero_stage"),
        ("scaling.deepspeed_json=/no/ds.json", "scaling.deepspeed_json", "needs scaling.zero_stage"),
        ("scaling.zero_stage=4", "scaling.zero_stage", "less than or equal to 3"),
        ("panacea_end_masked.rho=-1", "panacea_end_masked.rho", "greater than or equal to 0"),
        ("panacea_end_masked.harmful_loss_clamp=0", "panacea_end_masked.harmful_loss_clamp", "greater than 0"),
        ("data.task_self_distill=181", "data.task_self_distill", "at most the user's benign samples, 180"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(override, field, fragment):
    with pytest.raises(ConfigError) as info:
        load_checked(None, [override])
    message = str(info.value)
    assert field in message
    assert fragment in message
    assert message.count("\n") == 0  # one message, one line


def test_self_distilled_user_and_alignment_requests_must_fit_the_train_requests_together():
    load_checked(None, ["data.task_self_distill=50", "data.alignment_self_distill=60"])  # 70 + 83 of 160
    with pytest.raises(ConfigError, match=r"data.task_self_distill = 60: .* ask 166 of the 160 open training requests"):
        load_checked(None, ["data.task_self_distill=60", "data.alignment_self_distill=60"])


def test_a_task_whose_answers_no_rule_checks_is_refused_while_a_suite_scores_it():
    from panacea_platform.data import TASKS

    TASKS.register("placeholder_unscored", "panacea_platform.data.tasks:offline_sentiment")
    try:
        with pytest.raises(
            ConfigError,
            match=r"data.task = 'placeholder_unscored': expected a task whose answers an "
            r"accuracy rule checks \(suite 'task'",
        ):
            load_checked(None, ["data.task=placeholder_unscored"])
        # Without a suite that scores the task, there is no FA to check: accepted.
        load_checked(
            None,
            [
                "data.task=placeholder_unscored",
                "evaluation.suites=[{name: harmful, source: harmful_heldout, metric: harmful_score}]",
            ],
        )
    finally:
        del TASKS._entries["placeholder_unscored"]


def test_unknown_yaml_key_is_an_error_not_ignored(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("panacea:\n  rho: 1.0\n  lamda: 0.1\n")
    with pytest.raises(ConfigError, match=r"panacea\.lamda: unknown key"):
        load_checked(path)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_checked(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("panacea: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_checked(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_checked(None, ["panacea.rho"])


def test_cli_exits_2_with_one_line_before_any_work(tmp_path, capsys):
    code = main(
        ["finetune", "--config", str(REPO / "jobs/offline_default.yaml"), "panacea.rho=-1", f"output_dir={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: invalid configuration: panacea.rho = -1")
    assert not any(tmp_path.iterdir())  # nothing was written


def test_saved_config_round_trips(tmp_path):
    config = load_checked(REPO / "jobs/offline_default.yaml", ["panacea.rho=0.7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_checked(tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["panacea"]["lambda"] == config.panacea.lam


def test_flat_params_cover_every_field():
    flat = RunConfig().flat()
    assert flat["panacea.rho"] == 1.0
    assert flat["panacea.lambda"] == 1e-3
    assert "data.harmful_ratio" in flat and "lora.target_modules" in flat


def test_any_global_batch_splits_over_workers_but_an_unfillable_accumulation_is_refused():
    # 10 samples on 8 workers: shares of 2, 2, 1, ... (uneven splits are weighted by tokens).
    config = load_checked(
        None, ["scaling.num_workers=8", "scaling.zero_stage=2", "optim.batch_size=10", "optim.grad_accum_steps=2"]
    )
    assert (config.optim.batch_size, config.optim.grad_accum_steps) == (10, 2)
    with pytest.raises(ConfigError, match=r"optim.grad_accum_steps = 4 cannot be filled by optim.batch_size = 3"):
        load_checked(None, ["optim.batch_size=3", "optim.grad_accum_steps=4"])
    with pytest.raises(ConfigError, match=r"align_optim.grad_accum_steps"):
        load_checked(None, ["align_optim.grad_accum_steps=0"])
