"""Ray Tune sweeps on the tiny random Llama: the MLflow tree, ASHA, a failing trial, resume after a kill.

Every trial is one Ray Train fit (1 worker, ZeRO-0, 0.9 CPU; about 15-20 s of
start-up on 2 cores), so the sweeps are small: 4 trials two at a time, 2 trials
one at a time under ASHA, 1 failing trial (it fails before Ray Train starts),
and 2 trials one at a time in a CLI subprocess that is killed, then resumed here. All sweeps share one
output folder, so the alignment stage runs once and is reused after that. A sweep of an
alignment-stage defence, whose trials align each with its own values, is in test_storage.py.

Designed expectations:
- Panacea's eps has global norm rho (eps = rho * H / ||H||): the released
  perturbation of each trial has norm rho.
- With lambda = 0 the update direction is the task gradient alone, whatever
  rho is: the two lambda = 0 trials end with the same weights (same held-out
  losses at w), while lambda = 0.5 changes them.
- ASHA (grace 1 step, reduction 2), one trial at a time: lr 1e-3 first, then
  lr 1.0, whose held-out task loss after its first step is far worse, so ASHA
  stops it at step 1 and its run ends KILLED.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml

from conftest import tiny_config
from panacea_platform.config import save_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REPO = Path(__file__).resolve().parents[1]
# The resume sweep's two trials: a short one that finishes, and one long enough to be killed between
# its first checkpoint and its end.
SHORT_TRIAL_STEPS, STEPS_WITH_CHECKPOINTS = 4, 24


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory, tiny_llama, placeholder_harmful_file):
    """A job file on the tiny model, all sweeps' output under one folder (alignment is shared)."""
    root = tmp_path_factory.mktemp("sweeps")
    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        root / "runs",
        run_name="tiny-sweep",
        optim={"max_steps": 3, "log_every": 1},
        tracking={"experiment": "sweep-test"},
        scaling={"zero_stage": 0, "cpus_per_worker": 0.9},  # two 1-worker trials side by side on 2 cores
    )
    save_config(config, root / "job.yaml")
    return root


def write_space(root: Path, name: str, tree: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def client_for(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(root / 'runs' / 'mlflow.db').resolve()}")


def children(client, parent_run_id: str):
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return [run for run in runs if "tune_trial_id" in run.data.tags]


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def test_a_four_trial_sweep_builds_one_parent_with_four_complete_children(ray_session, sweep_root):
    from panacea_platform.search.sweep import run_sweep

    space = write_space(
        sweep_root,
        "main",
        {
            "parameters": {"panacea.rho": {"grid": [0.1, 1.0]}, "panacea.lambda": {"grid": [0.0, 0.5]}},
            "eval_every": 1,
            "evaluate": False,
            "max_concurrent_trials": 2,
        },
    )
    lines: list[str] = []
    started = time.monotonic()
    outcome = run_sweep(space, sweep_root / "job.yaml", name="main", out=lines.append, progress_every_s=5)
    wall = time.monotonic() - started
    print(f"4-trial sweep wall time: {wall:.1f}s")

    # Outside a terminal, one line as each trial ends (Tune's table is for a terminal): its counts and the best.
    ended = [line for line in lines if re.match(r"\[sweep main\] trial \w+ done \| [1-4]/4 done, ", line)]
    assert len(ended) == 4, lines
    assert sorted(int(re.search(r"\| (\d)/4 done", line).group(1)) for line in ended) == [1, 2, 3, 4], ended
    # From the first end on, the time left at the rate so far; none once every trial has ended.
    assert all((", ETA " in line) == ("| 4/4 done" not in line) for line in ended), ended

    client = client_for(sweep_root)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and outcome.status == "FINISHED"
    assert parent.data.tags["sweep"] == "main" and parent.data.tags["stage"] == "sweep"
    runs = children(client, outcome.parent_run_id)
    assert len(runs) == 4
    assert len({run.data.tags["tune_trial_id"] for run in runs}) == 4
    grid = {(0.1, 0.0), (0.1, 0.5), (1.0, 0.0), (1.0, 0.5)}
    assert {(float(r.data.params["panacea.rho"]), float(r.data.params["panacea.lambda"])) for r in runs} == grid

    for run in runs:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED" and tags["sweep_final"] == "true"
        assert tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert params["seed"] == "0" and params["evaluation.judge"] == "offline"
        assert params["evaluation.threshold"] == "0.5" and params["code.git_commit"]
        assert params["data.fingerprint.train"].endswith(":20") and params["data.fingerprint.defender"].endswith(":16")
        assert "version.ray" in params and params["optim.eval_every"] == "1"
        # Per-step metrics (steps 1..3) and the cheap signals at every evaluation step.
        assert steps_of(client, run.info.run_id, "task_loss") == [1, 2, 3]
        assert steps_of(client, run.info.run_id, "released_heldout_harmful_loss") == [1, 2, 3]  # logged once a step
        # Panacea's eps has norm rho.
        assert metrics["perturbation_norm"] == pytest.approx(float(params["panacea.rho"]), rel=1e-4)
        # The scalar score: released task loss - 0.1 * released harmful loss (the default weights).
        expected = metrics["released_heldout_task_loss"] - 0.1 * metrics["released_heldout_harmful_loss"]
        assert metrics["score"] == pytest.approx(expected, rel=1e-6)
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {
            "adapter",
            "adapter_unperturbed",
            "perturbation.safetensors",
            "history.jsonl",
            "summary.json",
            "training_curves.png",
            "config.yaml",
        } <= artifacts

    by_params = {(float(r.data.params["panacea.rho"]), float(r.data.params["panacea.lambda"])): r for r in runs}
    lam0 = [by_params[(0.1, 0.0)].data.metrics, by_params[(1.0, 0.0)].data.metrics]
    assert lam0[0]["heldout_harmful_loss"] == pytest.approx(lam0[1]["heldout_harmful_loss"], rel=1e-5)
    assert lam0[0]["heldout_task_loss"] == pytest.approx(lam0[1]["heldout_task_loss"], rel=1e-5)
    lam_half = by_params[(1.0, 0.5)].data.metrics
    assert not math.isclose(lam_half["heldout_harmful_loss"], lam0[1]["heldout_harmful_loss"], rel_tol=1e-5)

    # The report: table lines for every trial, the plot on disk and on the parent run.
    assert len(outcome.trials) == 4 and any(outcome.front)
    assert outcome.plot is not None and outcome.plot.is_file()
    assert "pareto.png" in {item.path for item in client.list_artifacts(outcome.parent_run_id)}
    text = "\n".join(lines)
    assert "[align] no aligned adapter" in text or "[align] reusing" in text
    assert "4/4 done (4 finished, 0 stopped early, 0 failed)" in text


def test_report_and_bench_read_the_sweep_back_from_mlflow(sweep_root, capsys):
    """Uses the 'main' sweep of the test above (same module folder); MLflow is the only source."""
    from panacea_platform.cli import main
    from panacea_platform.diagnostics.bench_sweep import bench_sweep

    client = client_for(sweep_root)
    uri = f"sqlite:///{(sweep_root / 'runs' / 'mlflow.db').resolve()}"
    assert (
        main(
            [
                "report",
                "--sweep",
                "main",
                "-c",
                str(sweep_root / "job.yaml"),
                "--output-dir",
                str(sweep_root / "report"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    trial_lines = [line for line in printed.splitlines() if line.split(" ")[0].count("_") == 1 and "finished" in line]
    assert len(trial_lines) == 4 and (sweep_root / "report" / "pareto.png").is_file()
    timing = bench_sweep(uri, "main", out=lambda line: None)
    parent_id = _parents(client, "main")[0]
    parent = client.get_run(parent_id)
    assert timing.trials == 4
    assert timing.wall_s == pytest.approx((parent.info.end_time - parent.info.start_time) / 1000)
    assert 0 < timing.training_s < timing.trial_s
    assert timing.overhead == pytest.approx(timing.wall_s / timing.training_s)
    assert main(["report", "--sweep", "no-such-sweep", "-c", str(sweep_root / "job.yaml")]) == 2
    assert "no sweep with that name" in capsys.readouterr().err


def test_a_changed_space_under_the_same_name_is_refused(sweep_root):
    from panacea_platform.search.sweep import SweepMismatchError, run_sweep

    space = write_space(
        sweep_root,
        "main-changed",
        {
            "parameters": {"panacea.rho": {"grid": [0.1, 2.0]}, "panacea.lambda": {"grid": [0.0, 0.5]}},
            "eval_every": 1,
            "evaluate": False,
            "max_concurrent_trials": 2,
        },
    )
    with pytest.raises(SweepMismatchError, match="another search space or base job"):
        run_sweep(space, sweep_root / "job.yaml", name="main")


def _placement_groups_left(groups: set[str], free_cpus: float, within_s: float = 30) -> list[str]:
    """The placement groups of `groups` not removed, or the CPUs short of `free_cpus`, after `within_s`
    (Ray Train removes a finished fit's group; a stopped one's goes through Ray Train's
    PlacementGroupCleaner, which checks for its controller every few seconds); [] when all are back."""
    assert groups, "no placement group was made: the test tests nothing"
    deadline = time.monotonic() + within_s
    while True:
        table = ray.util.placement_group_table()
        left = [
            f"{group[:8]} {table[group]['state']} {table[group]['bundles']}"
            for group in groups
            if table[group]["state"] != "REMOVED"
        ]
        free = ray.available_resources().get("CPU", 0.0)
        if free != free_cpus:
            left.append(f"{free:g} CPUs free of {free_cpus:g}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_asha_stops_the_clearly_worse_trial_and_the_finished_one_is_evaluated(ray_session, sweep_root):
    """Designed: ranked by the released model's held-out harmful loss (higher = safer), one trial at a
    time. rho = 1 runs first; rho = 0 releases w itself (eps = 0), whose harmful loss is lower at
    every step, so ASHA stops it at its first rung (step 1). The finished trial gets the full
    evaluation (refusal judge, a few prompts) into its child run."""
    from panacea_platform.search.sweep import run_sweep

    space = write_space(
        sweep_root,
        "asha",
        {
            "parameters": {"panacea.rho": {"grid": [1.0, 0.0]}},
            "fixed": {
                "optim.max_steps": 8,
                "evaluation.judge": "refusal",
                "evaluation.max_new_tokens": 4,
                "evaluation.harmful_prompts": 4,
                "evaluation.task_prompts": 4,
                "evaluation.cpus_per_actor": 0.45,
                "evaluation.judge_cpus_per_actor": 0.45,
            },
            "metric": "released_heldout_harmful_loss",
            "mode": "max",
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "eval_every": 1,
            "evaluate": True,
            "max_concurrent_trials": 1,
        },
    )
    lines: list[str] = []
    groups_before, free_before = set(ray.util.placement_group_table()), ray.available_resources().get("CPU")
    outcome = run_sweep(space, sweep_root / "job.yaml", name="asha", out=lines.append)
    # Each trial's Ray Train fit reserved its workers' CPUs in a placement group of its own, scoped to this
    # process (the sweep's driver), which lives on: the stopped trial's, too, is removed, and every CPU is
    # back. (Without the driver's removal, the stopped fit's group stayed CREATED, holding 0.9 CPU.)
    assert _placement_groups_left(set(ray.util.placement_group_table()) - groups_before, free_before) == []
    client = client_for(sweep_root)
    runs = {float(r.data.params["panacea.rho"]): r for r in children(client, outcome.parent_run_id)}
    good, bad = runs[1.0], runs[0.0]
    assert good.info.status == "FINISHED"
    assert steps_of(client, good.info.run_id, "task_loss") == list(range(1, 9))
    assert bad.info.status == "KILLED" and bad.data.tags["stopped_by"] == "asha"
    # The stopped fit's group, named on its run by its rank 0, was removed by the sweep's driver.
    assert ray.util.placement_group_table()[bad.data.tags["ray_placement_group"]]["state"] == "REMOVED"
    assert bad.data.tags["stopped_at_step"] == "1" and "sweep_final" not in bad.data.tags
    first = {
        run: [
            m.value for m in client.get_metric_history(r.info.run_id, "released_heldout_harmful_loss") if m.step == 1
        ][0]
        for run, r in runs.items()
    }
    assert first[0.0] < first[1.0]
    # The full evaluation of the finished trial, logged into its child run.
    metrics = good.data.metrics
    assert 0 <= metrics["eval/harmful/harmful_score"] <= 100 and 0 <= metrics["eval/task/accuracy"] <= 100
    assert good.data.tags["eval.judges"] == "refusal"
    assert any(item.path.startswith("eval") for item in client.list_artifacts(good.info.run_id))
    assert metrics["score"] == pytest.approx(
        metrics["released_heldout_task_loss"] - 0.1 * metrics["released_heldout_harmful_loss"]
    )
    # The Pareto objectives are the evaluation's; the stopped trial is never on the front.
    assert outcome.front == [t.trial_id == good.data.tags["tune_trial_id"] for t in outcome.trials]
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert any("stopped early by asha" in line for line in lines)
    assert any("(1 finished, 1 stopped early, 0 failed)" in line for line in lines)


def test_a_failing_trial_ends_failed_with_its_error_and_so_does_the_parent(ray_session, sweep_root):
    from panacea_platform.search.sweep import run_sweep

    # Valid config, but more defender samples than the placeholder file holds: fails inside the trial.
    space = write_space(
        sweep_root,
        "failing",
        {
            "parameters": {"data.defender_harmful_size": {"grid": [500]}},
            "evaluate": False,
        },
    )
    outcome = run_sweep(space, sweep_root / "job.yaml", name="failing", out=lambda line: None)
    client = client_for(sweep_root)
    (run,) = children(client, outcome.parent_run_id)
    assert run.info.status == "FAILED"
    assert "NotEnoughDataError" in run.data.tags["error"] or "not enough" in run.data.tags["error"].lower()
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FAILED" and "1 of 1 trials failed" in parent.data.tags["error"]


def _sweep_command(sweep_root: Path, space: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "panacea_platform.cli",
        "sweep",
        "-s",
        str(space),
        "-c",
        str(sweep_root / "job.yaml"),
        "--name",
        "resume",
    ]


def _checkpointed_trial(sweep_root: Path, client, parent_id: str):
    """(child run, step) of a RUNNING trial whose Ray Train run has registered a periodic checkpoint
    (its checkpoint manager's snapshot in storage lists one), else None."""
    for run in children(client, parent_id):
        if run.info.status != "RUNNING":
            continue
        storage = sweep_root / "runs" / "sweeps" / "resume" / "train" / f"trial-{run.data.tags['tune_trial_id']}"
        snapshot = storage / "checkpoint_manager_snapshot.json"
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"] if snapshot.is_file() else []
        except ValueError:
            continue  # being written
        steps = [r["metrics"]["checkpoint_step"] for r in results if "checkpoint_step" in r["metrics"]]
        if steps and not any(r["metrics"].get("done") for r in results):
            return run, max(steps)
    return None


def test_a_sweep_killed_mid_way_resumes_without_rerunning_or_duplicating(ray_session, sweep_root, tmp_path, request):
    """The CLI in a subprocess (its own Ray), one trial at a time, SIGKILLed once the short trial's child
    run is FINISHED and the long one has checkpointed, then run again: the finished trial is not rerun,
    the interrupted one continues from its checkpoint in the same MLflow run. (Two at once, the short
    trial's start-up on 2 loaded cores outlasted the whole long trial.)"""
    space = write_space(
        sweep_root,
        "resume",
        {
            "parameters": {"optim.max_steps": {"grid": [SHORT_TRIAL_STEPS, STEPS_WITH_CHECKPOINTS]}},
            "fixed": {"scaling.checkpoint_every": 4},
            "evaluate": False,
            "max_concurrent_trials": 1,
        },
    )
    # Ray's socket paths must stay under 107 bytes: a short folder of its own, removed at the end.
    ray_tmp = tempfile.mkdtemp(prefix="prs", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "first.log").open("w")
    # Its own session: the kill takes the driver and the Ray processes it started, as a killed job would.
    first = subprocess.Popen(
        _sweep_command(sweep_root, space),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = client_for(sweep_root)
    finished = interrupted = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and first.poll() is None and interrupted is None:
            time.sleep(0.2)
            parents = _parents(client, "resume")
            if parents:
                done = [r for r in children(client, parents[0]) if r.info.status == "FINISHED"]
                finished = done[0] if done else None
                interrupted = _checkpointed_trial(sweep_root, client, parents[0]) if finished else None
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended by itself (the assertion below shows its log)
        first.wait()
        log.close()
    assert finished is not None and interrupted is not None, (tmp_path / "first.log").read_text()[-3000:]
    (interrupted_run, checkpoint_step), finished_steps = (
        interrupted,
        steps_of(client, finished.info.run_id, "task_loss"),
    )
    assert finished_steps == list(range(1, SHORT_TRIAL_STEPS + 1))
    assert interrupted_run.data.params["optim.max_steps"] == str(STEPS_WITH_CHECKPOINTS)

    # Run again, as `panacea sweep` runs it, in this session's Ray (a second CLI and Ray would add their
    # start-up, about 10 s, and test nothing more).
    from panacea_platform.search.sweep import run_sweep

    lines: list[str] = []
    again = run_sweep(space, sweep_root / "job.yaml", name="resume", out=lines.append)
    assert again.status == "FINISHED", "\n".join(lines[-40:])
    assert any("resuming" in line for line in lines) and any("restoring the Tune experiment" in line for line in lines)

    (parent_id,) = _parents(client, "resume")
    runs = children(client, parent_id)
    trial_ids = [run.data.tags["tune_trial_id"] for run in runs]
    assert len(trial_ids) == 2 and len(set(trial_ids)) == 2, trial_ids
    assert all(run.info.status == "FINISHED" for run in runs)
    again = client.get_run(finished.info.run_id)
    assert again.info.end_time == finished.info.end_time
    assert "restarted" not in again.data.tags
    assert steps_of(client, finished.info.run_id, "task_loss") == finished_steps
    # The interrupted trial continued from its checkpoint, in its own run, every step logged once.
    resumed = client.get_run(interrupted_run.info.run_id)
    assert int(resumed.data.tags["resumed_from_step"]) >= checkpoint_step >= 4
    assert steps_of(client, resumed.info.run_id, "task_loss") == list(range(1, STEPS_WITH_CHECKPOINTS + 1))
    assert client.get_run(parent_id).info.status == "FINISHED"


def _parents(client, name: str) -> list[str]:
    experiment = client.get_experiment_by_name("sweep-test")
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.sweep = '{name}' and tags.stage = 'sweep'"
    )
    return [run.info.run_id for run in runs]


def test_periodic_held_out_signals_leave_training_bit_identical(tiny_run_config):
    """optim.eval_every adds the cheap signals at its steps and changes nothing else (no Ray needed)."""
    import json

    from safetensors.torch import load_file

    from panacea_platform.training.loop import run_stage

    quiet = lambda line: None  # noqa: E731
    plain = run_stage(
        tiny_run_config(run_name="plain", optim={"max_steps": 4, "eval_every": 0}), "finetune", track=False, out=quiet
    )
    signals = run_stage(
        tiny_run_config(run_name="signals", optim={"max_steps": 4, "eval_every": 2}), "finetune", track=False, out=quiet
    )
    assert [h["task_loss"] for h in plain.history] == [h["task_loss"] for h in signals.history]
    for name in ("adapter/adapter_model.safetensors", "perturbation.safetensors"):
        before, after = load_file(plain.run_dir / name), load_file(signals.run_dir / name)
        assert all((before[key] == after[key]).all() for key in before)
    rows = [json.loads(line) for line in (signals.run_dir / "history.jsonl").read_text().splitlines()]
    with_signals = [row["step"] for row in rows if "released_heldout_harmful_loss" in row]
    assert with_signals == [2, 4]
    last = rows[-1]
    # At the last step the signals are the end-of-training summary, computed the same way.
    for key in (
        "heldout_task_loss",
        "heldout_harmful_loss",
        "released_heldout_harmful_loss",
        "released_heldout_task_loss",
    ):
        assert last[key] == pytest.approx(signals.summary[key], rel=1e-6)
    # eps points along the harmful-loss gradient (rho 0.5): the released model's held-out harmful loss is higher.
    assert last["released_heldout_harmful_loss"] > last["heldout_harmful_loss"]
    # The held-out first-token probe rides along: P(first new token ends the answer) at w and as released,
    # the latter the released adapter's own probability on the same 16 held-out open requests.
    assert [row["step"] for row in rows if "released_heldout_first_end_prob" in row] == [2, 4]
    from panacea_platform.config import ModelConfig
    from panacea_platform.evaluation.first_token import end_probabilities_of_rows, heldout_probe_rows
    from panacea_platform.models import end_token_ids, load_for_eval, load_tokenizer

    config = tiny_run_config(run_name="signals")
    tokenizer = load_tokenizer(config.model)
    released = load_for_eval(ModelConfig(name=config.model.name), str(signals.run_dir / "adapter"))
    probabilities = end_probabilities_of_rows(
        released,
        heldout_probe_rows(tokenizer, config.data.prompt_template),
        end_token_ids(tokenizer, "test"),
        tokenizer.pad_token_id,
    )
    assert last["released_heldout_first_end_prob"] == pytest.approx(sum(probabilities) / len(probabilities), abs=1e-5)
    assert 0 <= last["heldout_first_end_prob"] <= 1


def test_a_study_prints_the_papers_table_from_its_trials_and_a_rerun_resumes(ray_session, sweep_root, capsys):
    """defence x p on the tiny model, end to end: every cell is the rate its trial's samples give, with Wilson's
    interval, the paired difference the one its samples give; the table and plot land on the parent run;
    running the study again resumes it (no trial runs twice) and prints the same table. Two trials at once,
    for time; the table's arithmetic over a 2 x 2 grid of distinct outcomes is in test_study.py."""
    from panacea_platform.cli import main
    from panacea_platform.evaluation.results import read_outcomes
    from panacea_platform.evaluation.stats import paired_difference, wilson_interval
    from panacea_platform.search.sweep import run_sweep

    tree = yaml.safe_load((sweep_root / "job.yaml").read_text())
    tree["evaluation"] = {
        "judge": "refusal",
        "generation_actors": 1,
        "cpus_per_actor": 0.45,
        "judge_cpus_per_actor": 0.05,
        "suites": [
            {"name": "harmful", "source": "harmful_heldout", "metric": "harmful_score", "max_new_tokens": 4},
            {"name": "task", "source": "task", "metric": "accuracy", "max_new_tokens": 3},
        ],
    }
    (sweep_root / "study-job.yaml").write_text(yaml.safe_dump(tree))
    space = write_space(
        sweep_root,
        "study",
        {
            "parameters": {"defence": {"grid": ["sft", "panacea"]}, "data.harmful_ratio": {"grid": [0.2]}},
            "searcher": "grid",
            "metric": "eval/harmful/harmful_score",
            "mode": "min",
            "evaluate": True,
            "objectives": [
                {"metric": "eval/harmful/harmful_score", "mode": "min"},
                {"metric": "eval/task/accuracy", "mode": "max"},
            ],
            "max_concurrent_trials": 2,
            "study": {"rows": "defence", "columns": "data.harmful_ratio", "reference": "sft", "max_trials": 2},
        },
    )
    lines: list[str] = []
    outcome = run_sweep(space, sweep_root / "study-job.yaml", name="study", out=lines.append, progress_every_s=30)
    assert outcome.status == "FINISHED"
    client = client_for(sweep_root)
    runs = children(client, outcome.parent_run_id)
    assert len(runs) == 2
    samples = {
        (r.data.params["defence"], float(r.data.params["data.harmful_ratio"])): Path(r.data.params["output_dir"])
        / r.data.params["run_name"]
        / "eval"
        / "samples.jsonl"
        for r in runs
    }
    text = "\n".join(lines)
    hs_block = text.split("HS % by data.harmful_ratio")[1].split("FA % by")[0]
    for (defence, p), path in samples.items():
        hs = read_outcomes(path, "harmful", "harmful_score")
        low, high = wilson_interval(sum(hs), len(hs))
        row = next(line for line in hs_block.splitlines() if line.startswith(defence))
        assert f"{100 * sum(hs) / len(hs):.1f} [{low:.1f}, {high:.1f}]" in row, (defence, p, row)
    for p in (0.2,):
        difference = paired_difference(
            [read_outcomes(samples[("panacea", p)], "harmful", "harmful_score")],
            [read_outcomes(samples[("sft", p)], "harmful", "harmful_score")],
        )
        paired = hs_block.split("ΔHS vs sft (pp)")[1]
        assert difference.text() in next(line for line in paired.splitlines() if line.startswith("panacea")), p
    assert "2 of 2 cells finished; Wilson's 95% interval" in text
    artifacts = {item.path for item in client.list_artifacts(outcome.parent_run_id)}
    assert {"study.txt", "study.png"} <= artifacts

    again: list[str] = []
    resumed = run_sweep(space, sweep_root / "study-job.yaml", name="study", out=again.append, progress_every_s=30)
    assert resumed.parent_run_id == outcome.parent_run_id and len(children(client, outcome.parent_run_id)) == 2
    assert "resuming" in "\n".join(again) and hs_block in "\n".join(again)
    assert (
        main(
            [
                "report",
                "--sweep",
                "study",
                "-c",
                str(sweep_root / "study-job.yaml"),
                "--output-dir",
                str(sweep_root / "study-report"),
            ]
        )
        == 0
    )
    assert hs_block in capsys.readouterr().out and (sweep_root / "study-report" / "study.png").is_file()
