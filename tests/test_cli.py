"""The `panacea` command end to end on the tiny model: main job, finetune, bad input, benchmark."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from panacea_platform.cli import _demo_suffix, build_parser, main
from panacea_platform.tracking import default_tracking_uri


@pytest.fixture
def tiny_job(tiny_run_config, tmp_path):
    """The tiny configuration written as a job file, as a user would pass it."""
    config = tiny_run_config(run_name="demo")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


@pytest.mark.parametrize(
    "command", [["align"], ["finetune"], ["demo"], ["config"], ["list"], ["bench"], ["bench", "step"]]
)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    assert "usage: panacea" in capsys.readouterr().out


DEMO_SUITES = (
    "evaluation.suites=[{name: harmful, source: harmful_heldout, metric: harmful_score, max_new_tokens: 4}, "
    "{name: task, source: task, metric: accuracy, max_new_tokens: 3}, "
    "{name: helpfulness, source: helpfulness, metric: helpfulness, size: 4, max_new_tokens: 4}]"
)


def test_the_paper_comparison_demo_runs_every_defence_at_its_stage_on_the_same_prompts_with_lineage(
    tiny_job, capsys, ray_session
):
    """The paper's comparison, the largest suite, end to end (the default suite's arms are among its
    rows; a second run takes the default suite). One run, for the suite's time: every arm's training,
    evaluation and MLflow record; the table's numbers against the samples; lineage; reuse."""
    from panacea_platform.algorithms.provenance import read_alignment_provenance
    from panacea_platform.evaluation.results import read_outcomes
    from panacea_platform.evaluation.stats import paired_difference, wilson_interval
    from panacea_platform.recipes.comparison import ModelAnswers
    from panacea_platform.recipes.main_job import DEMO_SUITES as DEFENCE_SUITES

    config, path = tiny_job
    # The refusal judge keeps this test fast; the harm judges are tested in test_judges.py.
    fast_eval = ["evaluation.judge=refusal", DEMO_SUITES]
    # Antidote's authors' r256 does not fit the tiny model; its 2000 calibration samples not the tiny source.
    assert (
        main(
            [
                "demo",
                "--config",
                str(path),
                "--suite",
                "paper-comparison",
                *fast_eval,
                "lisa.align_steps=1",
                "lisa.finetune_steps=2",
                "antidote.fine_tuning.lora_rank=4",
                "antidote.calibration_samples=20",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[align] done" in out and "[finetune sft] done" in out and "[finetune panacea] done" in out
    assert "[finetune random_perturbation] done" in out
    assert "[demo] 11/11 done" in out and "~0m00s left" in out
    assert "search: none yet on this aligned model" in out  # and the command that runs one
    folder = config.run_dir().parent
    rows = json.loads((folder / "demo-paper-rows.json").read_text())
    assert [r["key"] for r in rows] == ["aligned", "sft_p0", *DEFENCE_SUITES["paper-comparison"]]
    by_key = {r["key"]: r for r in rows}
    # Alignment-stage defences fine-tuned their own aligned model; the others the shared one.
    for row in rows[1:]:
        started = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())["model"]["adapter"]
        made = read_alignment_provenance(started)
        expected = row["key"] if row["key"] in ("vaccine", "repnoise", "booster") else "sft"
        assert made is not None and made["defence"] == expected or row["key"] in ("random_perturbation", "antidote"), (
            row
        )
    answers = {r["key"]: ModelAnswers.read(r["key"], r["method"], r["seed"], r["samples"]) for r in rows}
    # Every arm, the p = 0 control included, was scored on the same prompts of every suite.
    for suite in ("harmful", "task", "helpfulness"):
        prompts = {key: [r["prompt"] for r in model.suite(suite)] for key, model in answers.items()}
        assert len({tuple(p) for p in prompts.values()}) == 1 and prompts["sft"], suite

    table = out.split("== main job")[1]
    header = next(line for line in table.splitlines() if line.startswith("method"))
    assert all(title in header for title in ("HS %", "FA %", "ΔHS pp", "ΔFA pp"))
    for method in ("Vaccine", "RepNoise", "Booster", "Lisa", "Antidote", "Panacea"):
        line = next(line for line in table.splitlines() if line.startswith(f"{method}, p=0.1"))
        assert line.count("[") >= 4, line  # HS and FA with intervals, and both paired differences
    summary = (folder / "demo-paper-summary.txt").read_text()
    # Each rate in the table is the one its samples give, with the Wilson interval of its counts.
    hs = read_outcomes(by_key["panacea"]["samples"], "harmful", "harmful_score")
    low, high = wilson_interval(sum(hs), len(hs))
    panacea_line = next(line for line in summary.splitlines() if line.startswith("Panacea, p=0.1"))
    assert f"{100 * sum(hs) / len(hs):.1f} [{low:.1f}, {high:.1f}]" in panacea_line, summary
    # The paired differences printed are the per-arm numbers' differences, with the paired interval.
    for suite, rate in (("harmful", "harmful_score"), ("task", "accuracy"), ("helpfulness", "answered_rate")):
        a = read_outcomes(by_key["panacea"]["samples"], suite, rate)
        b = read_outcomes(by_key["sft"]["samples"], suite, rate)
        expected = paired_difference([a], [b])
        assert expected.difference == pytest.approx(100 * (sum(a) - sum(b)) / len(a))
        assert (
            expected.text()
            in summary.split("paired differences against")[1].split("Panacea, p=0.1 −")[1].split("\n")[0]
        )
    plots = ("demo-paper-comparison.png", "demo-paper-hs-vs-fa.png", "demo-paper-suites.png")
    for name in plots:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(default_tracking_uri(config.output_dir))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "demo"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["stage"] + ":" + r.data.tags["defence"] for r in children) == sorted(
        [
            "align:sft",
            "align:vaccine",
            "align:repnoise",
            "align:booster",
            "finetune:sft",
            "finetune:sft",
            *(f"finetune:{name}" for name in DEFENCE_SUITES["paper-comparison"] if name != "sft"),
        ]
    )
    assert all(r.info.status == "FINISHED" for r in children)
    # Each fine-tune run carries its own evaluation: every suite's rates with their intervals, and the samples.
    for run in (r for r in children if r.data.tags["stage"] == "finetune"):
        for key in ("harmful/harmful_score", "task/accuracy", "helpfulness/answered_rate", "helpfulness/empty_rate"):
            assert {f"eval/{key}", f"eval/{key}_ci_low", f"eval/{key}_ci_high"} <= set(run.data.metrics), key
    # The first-token probe of every released model: at w_T for all, as released and per layer where eps was added.
    for run in (r for r in children if r.data.tags["stage"] == "finetune"):
        assert {"first_end/helpfulness/unperturbed", "first_end/harmful/unperturbed"} <= set(run.data.metrics)
        adds_eps = run.data.tags["defence"] in ("panacea", "panacea_end_masked", "random_perturbation", "antidote")
        assert ("first_end/helpfulness/released" in run.data.metrics) == adds_eps, run.data.tags["defence"]
        assert any(key.startswith("first_end/layer_") for key in run.data.metrics) == adds_eps
    assert "first token = end, %" in summary and by_key["panacea"]["first_token"]["by_layer"]
    # The variant is also paired against Panacea itself, on the same prompts.
    against_panacea = summary.split("paired differences against Panacea, p=0.1")[1]
    assert "Panacea end-masked, p=0.1 − Panacea: harmful HS" in against_panacea
    control = [r for r in children if r.data.params.get("data.harmful_ratio") == "0.0"]
    assert len(control) == 1 and control[0].data.tags["defence"] == "sft"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {*plots, "demo-paper-summary.txt"} <= artifacts
    finetunes = {r.data.tags["mlflow.runName"]: r for r in children if r.data.tags["stage"] == "finetune"}
    child_artifacts = {a.path for a in client.list_artifacts(finetunes["demo-paper-sft-s0"].info.run_id)}
    assert {"adapter", "training_curves.png", "config.yaml", "history.jsonl", "eval"} <= child_artifacts
    # The MLflow UI opens on the result (its browser check: test_mlflow_ui.py): model training, each run's
    # description, the headlines under one prefix, the answers as a table.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    note = parents[0].data.tags["mlflow.note.content"]
    assert "Command: `panacea demo --config" in note and "Panacea, p=0.1" in note
    panacea = finetunes["demo-paper-panacea-s0"]
    assert panacea.data.tags["mlflow.note.content"].startswith("**Fine-tuning under panacea on")
    assert "rho" in panacea.data.tags["mlflow.note.content"]
    assert panacea.data.metrics["headline.HS"] == panacea.data.metrics["eval/harmful/harmful_score"]
    assert panacea.data.metrics["headline.FA"] == panacea.data.metrics["eval/task/accuracy"]
    assert panacea.data.metrics["headline.answered"] == panacea.data.metrics["eval/helpfulness/answered_rate"]
    tables = {a.path for a in client.list_artifacts(panacea.info.run_id, "eval/eval-adapter")}
    assert "eval/eval-adapter/answers.json" in tables
    assert f"experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" in out
    # Lineage: a fine-tune started from the adapter its alignment produced, but random perturbation, which
    # changes the SFT run's w_T (0 steps: its training would be SFT's, step for step).
    params = {name: run.data.params for name, run in finetunes.items()}
    aligned = params["demo-paper-sft-s0"]["model.adapter"]
    assert "/align-" in aligned and aligned.endswith("/adapter")
    for name in ("panacea", "lisa", "antidote"):
        assert params[f"demo-paper-{name}-s0"]["model.adapter"] == aligned, name
    derived = params["demo-paper-random_perturbation-s0"]
    assert derived["model.adapter"].endswith("demo-paper-sft-s0/adapter") and derived["optim.max_steps"] == "0"
    # Each arm under its authors' convention, recorded with the run and in the report.
    for name in DEFENCE_SUITES["paper-comparison"]:
        merges = name in ("vaccine", "repnoise", "lisa", "antidote")
        assert params[f"demo-paper-{name}-s0"]["model.after_alignment"] == ("merge" if merges else "continue"), name
        tag = finetunes[f"demo-paper-{name}-s0"].data.tags["fine_tuning_convention"]
        assert tag.startswith("aligned LoRA merged" if merges else "the aligned LoRA continued"), (name, tag)
    lisa = params["demo-paper-lisa-s0"]
    assert (lisa["lora.rank"], lisa["lora.target_modules"], lisa["optim.lr"]) == ("8", '["q_proj", "v_proj"]', "1e-05")
    assert (
        "Lisa, p=0.1: aligned LoRA merged, a fresh LoRA (r8 a4 on q_proj,v_proj, dropout 0.1); lr 1e-05, batch 5"
        in summary.split("fine-tuning after alignment (model.after_alignment: authors")[1]
    )

    # A second run, of other defences, reuses the aligned adapter and its evaluation, and says so; its rows
    # and table have a name of their own, so the comparison's stay as they were.
    assert main(["demo", "--config", str(path), "--defences", "sft", "--no-control", *fast_eval]) == 0
    out = capsys.readouterr().out
    assert "reusing the aligned adapter" in out and "reusing the evaluation of" in out
    rows = json.loads((folder / f"demo{_demo_suffix(['sft'])}-rows.json").read_text())
    assert [r["key"] for r in rows] == ["aligned", "sft"] and _demo_suffix(["sft"]).startswith("-d")
    assert (folder / "demo-paper-summary.txt").read_text() == summary


def test_demo_over_seeds_reports_mean_and_spread(tiny_job, capsys):
    config, path = tiny_job
    assert (
        main(
            [
                "demo",
                "--config",
                str(path),
                "--defences",
                "sft",
                "--no-control",
                "--no-eval",
                "--seeds",
                "0,1",
                "run_name=seeds",
            ]
        )
        == 0
    )
    suffix = _demo_suffix(["sft"])  # the rows and table of this choice of defences
    table = (config.run_dir().parent / f"seeds{suffix}-summary.txt").read_text()
    assert "±" in table and "seeds 0,1 (mean ± sample std)" in table
    rows = json.loads((config.run_dir().parent / f"seeds{suffix}-rows.json").read_text())
    assert sorted((r["key"], r["seed"]) for r in rows) == [("aligned", 0), ("aligned", 1), ("sft", 0), ("sft", 1)]
    # Seeds differ, so the two SFT runs differ and the spread is not zero.
    losses = [r["summary"]["released_heldout_task_loss"] for r in rows if r["key"] == "sft"]
    assert losses[0] != losses[1]

    # --report-only rebuilds the same table from the saved rows, training nothing, in its own MLflow run.
    capsys.readouterr()
    assert main(["demo", "--config", str(path), "--defences", "sft", "--report-only", "run_name=seeds"]) == 0
    out = capsys.readouterr().out
    assert table.splitlines()[2] in out and "[finetune" not in out
    assert (config.run_dir().parent / f"seeds{suffix}-summary.txt").read_text() == table
    client = MlflowClient(default_tracking_uri(config.output_dir))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    reports = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'demo-report'")
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    assert main(["demo", "--config", str(path), "--report-only", "run_name=never-ran"]) == 2
    assert "never-ran-rows.json" in capsys.readouterr().err

    # A seed run later joins the saved seeds of the same job; another job's rows are replaced, not mixed in.
    assert (
        main(
            [
                "demo",
                "--config",
                str(path),
                "--defences",
                "sft",
                "--no-control",
                "--no-eval",
                "--seeds",
                "2",
                "run_name=seeds",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "keeping seeds 0,1 of seeds" in out and "seeds 0,1,2 (mean ± sample std)" in out
    rows = json.loads((config.run_dir().parent / f"seeds{suffix}-rows.json").read_text())
    assert [(r["key"], r["seed"]) for r in rows] == [(key, seed) for seed in (0, 1, 2) for key in ("aligned", "sft")]
    assert (
        main(
            [
                "demo",
                "--config",
                str(path),
                "--defences",
                "sft",
                "--no-control",
                "--no-eval",
                "--seeds",
                "2",
                "run_name=seeds",
                "optim.lr=0.02",
            ]
        )
        == 0
    )
    assert "holds rows of another job or choice of arms" in capsys.readouterr().out
    rows = json.loads((config.run_dir().parent / f"seeds{suffix}-rows.json").read_text())
    assert sorted({r["seed"] for r in rows}) == [2]


def test_report_only_refuses_the_flags_it_would_ignore(tiny_job, capsys):
    _, path = tiny_job
    assert main(["demo", "--config", str(path), "--report-only", "--seeds", "0,1"]) == 2
    assert "--report-only trains nothing, so --seeds changes nothing" in capsys.readouterr().err


def test_demo_rejects_bad_seeds(tiny_job, capsys):
    _, path = tiny_job
    assert main(["demo", "--config", str(path), "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_finetune_from_the_command_line_writes_eps_and_both_adapters(tiny_job, capsys):
    config, path = tiny_job
    assert main(["finetune", "--config", str(path), "run_name=cli-panacea", "optim.max_steps=2"]) == 0
    run_dir = config.run_dir().parent / "cli-panacea"
    for name in (
        "adapter/adapter_config.json",
        "adapter_unperturbed/adapter_config.json",
        "perturbation.safetensors",
        "config.yaml",
        "summary.json",
    ):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["perturbation_norm"] == pytest.approx(config.panacea.rho, rel=1e-5)


def test_malformed_data_file_exits_2_naming_file_and_line(tiny_job, tmp_path, capsys):
    _, path = tiny_job
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p1", "answer": "a1"}\n{"prompt": "p2", "answer": "a2"}\n{not json\n')
    assert main(["finetune", "--config", str(path), f"data.harmful_file={bad}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl" in errors[0] and "line 3" in errors[0]


def test_empty_data_file_exits_2(tiny_job, tmp_path, capsys):
    _, path = tiny_job
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["finetune", "--config", str(path), f"data.harmful_file={empty}"]) == 2
    assert "no records" in capsys.readouterr().err


def test_too_small_harmful_source_exits_2_naming_the_field(tiny_job, capsys):
    _, path = tiny_job
    assert main(["finetune", "--config", str(path), "data.defender_harmful_size=5000"]) == 2
    err = capsys.readouterr().err
    assert "data.defender_harmful_size" in err and "5000" in err


def test_unknown_defence_in_demo_list_exits_2(tiny_job, capsys):
    _, path = tiny_job
    assert main(["demo", "--config", str(path), "--defences", "sft,tar"]) == 2
    assert "--defences" in capsys.readouterr().err


def test_config_validate_and_show(capsys):
    assert main(["config", "validate"]) == 0
    out = capsys.readouterr().out
    # Every job file under jobs/, its sub-folders included.
    assert "ok: jobs/offline_default.yaml" in out and "ok: jobs/paper/defences/comparison.yaml" in out
    assert out.count("ok: ") == len(list(Path("jobs").rglob("*.yaml")))
    assert main(["config", "validate", "jobs/paper/defences", "jobs/offline_default.yaml"]) == 0
    out = capsys.readouterr().out
    assert "ok: jobs/paper/defences/comparison.yaml" in out and "ok: jobs/offline_default.yaml" in out
    assert "jobs/paper/llama2-7b-sst2.yaml" not in out
    assert main(["config", "validate", "jobs/nothing-here"]) == 2
    assert "config validate 'jobs/nothing-here': no such file or folder" in capsys.readouterr().err
    assert main(["config", "show", "panacea.rho=0.25"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["panacea"]["rho"] == 0.25


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "fields", "--config", "jobs/offline_default.yaml"],
        ["config", "validate", "panacea.rho=0.25", "--config", "x.yaml"],
        ["config", "fields", "panacea.rho=0.25"],
    ],
)
def test_an_argument_a_config_action_does_not_use_is_an_error_not_dropped(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_console_script_exit_code_on_bad_input():
    result = subprocess.run(
        [sys.executable, "-m", "panacea_platform.cli", "finetune", "data.harmful_ratio=2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "data.harmful_ratio = 2" in result.stderr


def test_bench_step_reports_both_steps_and_ratios(tiny_run_config):
    from panacea_platform.diagnostics.bench_step import bench_step

    lines = []
    result = bench_step(tiny_run_config(), warmup=1, repeats=2, out=lines.append, refresh_every=(2, 4))
    assert result["sft_step_s"] > 0 and result["panacea_step_s"] > 0
    assert result["time_ratio"] == pytest.approx(result["panacea_step_s"] / result["sft_step_s"])
    assert result["panacea_peak_extra_mb"] > 0 and result["trainable_mb"] > 0
    assert any("time ratio panacea/sft" in line for line in lines)
    for k in (2, 4):  # the amortised step's cost, as a ratio to SFT's
        ratio = result[f"panacea_k{k}_step_s"] / result["sft_step_s"]
        assert result[f"panacea_k{k}_time_ratio"] == pytest.approx(ratio)
        assert any(f"panacea refresh_every={k}:" in line for line in lines)


def test_bench_step_times_each_baselines_step_as_a_ratio_to_sft(tiny_run_config):
    from panacea_platform.diagnostics.bench_step import bench_step

    lines = []
    result = bench_step(tiny_run_config(), warmup=1, repeats=2, out=lines.append, baselines=True)
    for name in ("vaccine", "repnoise", "booster", "lisa", "panacea_end_masked"):
        assert result[f"{name}_time_ratio"] == pytest.approx(result[f"{name}_step_s"] / result["sft_step_s"])
        assert any(f"time ratio {name}/sft" in line for line in lines)


def test_bench_steps_are_the_registered_defences_steps(tiny_run_config, monkeypatch):
    """The benchmark asks the registry for each defence, as training does: a defence registered by a user
    is timed by name, with the streams it declares, at the stage it trains at."""
    import torch

    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.algorithms.defences import Defence
    from panacea_platform.diagnostics.bench_step import _bench_weights, registered_step

    seen = []

    class Counting(Defence):
        name = "test_counting"
        stages = ("finetune",)
        needs = {"finetune": ("harmful",)}

        def step(self, weights, batch, extra):
            seen.append((batch["input_ids"].shape[0], extra["harmful"]["input_ids"].shape[0]))
            return {"task_loss": 0.0}

    monkeypatch.setitem(DEFENCES._entries, "test_counting", Counting)  # registered for this test only
    config = tiny_run_config()
    weights, _ = _bench_weights(config, total=2)
    batch = {
        "input_ids": torch.ones(4, 8, dtype=torch.long),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
        "labels": torch.ones(4, 8, dtype=torch.long),
    }
    harmful = {k: v[:3] for k, v in batch.items()}
    registered_step(config, "test_counting", weights, batch, harmful, steps=2)()
    assert seen == [(4, 3)]
    # Lisa's step is its own (the proximal term and its state), not SFT's.
    assert {"proximal", "alignment_state"} <= set(registered_step(config, "lisa", weights, batch, harmful, 2)())


def test_a_deepspeed_json_that_contradicts_the_run_exits_2_before_any_worker(tiny_job, tmp_path, capsys):
    _, path = tiny_job
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    code = main(
        [
            "finetune",
            "--config",
            str(path),
            "scaling.num_workers=2",
            "scaling.zero_stage=2",
            f"scaling.deepspeed_json={user_json}",
        ]
    )
    assert code == 2
    assert "zero_optimization.stage 3 but scaling.zero_stage is 2" in capsys.readouterr().err


def test_list_names_suite_sources_metrics_and_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "suite metrics: harmful_score, accuracy, over_refusal, helpfulness" in out
    assert "  xstest" in out and "(hub)" in out and "  harmbench" in out
    assert "suite presets (evaluation/suites/): beavertails_test, capability, donotanswer" in out


def test_a_bad_or_unreachable_suite_stops_the_demo_before_any_training(tiny_job, capsys, monkeypatch):
    config, path = tiny_job
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub probe fails at once
    for suites, fragment in (
        ("[harmful, {preset: xstest, optional: false}]", "evaluation.suites[xstest].source = 'xstest': "),
        ("[{name: x, source: capability, metric: accuracy, size: 0}]", "evaluation.suites[x].size = 0: "),
        (
            "[{name: x, source: capability, metric: accuracy, max_new_tokens: 0}]",
            "evaluation.suites[x].max_new_tokens = 0",
        ),
        (
            "[{name: x, source: nowhere, metric: accuracy}]",
            "evaluation.suites[x].source = 'nowhere': unknown suite source",
        ),
    ):
        assert main(["demo", "--config", str(path), f"evaluation.suites={suites}"]) == 2, suites
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert not config.run_dir().parent.exists() or not list(config.run_dir().parent.glob("align-*"))


@pytest.mark.parametrize("case", ["unfillable accumulation", "deepspeed bf16", "checkpoint of another shape"])
def test_bad_training_input_stops_before_any_work_with_one_line_and_exit_2(case, tiny_job, tmp_path, capsys):
    """Each names the field to change; none trains or opens an MLflow run (the DeepSpeed one fails in the
    driver's check_distributed, before Ray)."""
    config, path = tiny_job
    overrides = {
        "unfillable accumulation": ["optim.batch_size=3", "optim.grad_accum_steps=4"],
        "deepspeed bf16": [
            "scaling.zero_stage=2",
            "scaling.num_workers=2",
            f"scaling.deepspeed_json={tmp_path / 'ds.json'}",
        ],
        "checkpoint of another shape": ["scaling.checkpoint_every=2"],
    }[case]
    (tmp_path / "ds.json").write_text(json.dumps({"bf16": {"enabled": True}}))
    if case == "checkpoint of another shape":
        from panacea_platform.training.checkpointing import CHECKPOINT_FORMAT, STATE_FILE, run_identity

        folder = config.run_dir() / "checkpoints" / "step_00000002"
        folder.mkdir(parents=True)
        identity = {**run_identity(config, "finetune"), "accumulation": 2}
        (folder / STATE_FILE).write_text(
            json.dumps(
                {"format": CHECKPOINT_FORMAT, "step": 2, "stage": "finetune", "identity": identity, "history": []}
            )
        )
    assert main(["finetune", "--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {
        "unfillable accumulation": "optim.grad_accum_steps = 4 cannot be filled by optim.batch_size = 3",
        "deepspeed bf16": "enables DeepSpeed's bf16",
        "checkpoint of another shape": "Set optim.grad_accum_steps to match it",
    }[case]
    assert len(err) == 1 and expected in err[0], err
    assert not (Path(config.output_dir) / "mlflow.db").exists()


def test_a_user_error_is_found_in_what_caused_an_error_not_in_what_was_being_handled():
    from panacea_platform.config import ConfigError
    from panacea_platform.user_errors import user_error_in

    bad_input = ConfigError("optim.lr = -1: expected > 0")
    try:
        raise RuntimeError("a worker failed") from bad_input
    except RuntimeError as wrapped:
        assert user_error_in(wrapped) is bad_input
    try:
        try:
            raise bad_input
        except ConfigError:
            raise RuntimeError("a bug while reporting it")  # noqa: B904 - the case under test
    except RuntimeError as unrelated:
        assert user_error_in(unrelated) is None  # the bug's traceback must not be hidden behind one line
        assert user_error_in(unrelated, follow_context=True) is bad_input
