"""What the terminal shows (console.py): the platform's lines and the libraries' bars; the rest in the run's log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from panacea_platform import console


@pytest.fixture
def distributed_job(tiny_run_config, tmp_path):
    config = tiny_run_config(run_name="watch", scaling={"zero_stage": 0}, optim={"max_steps": 3})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


def test_the_mode_follows_the_flags_the_terminal_and_ray_job_submit(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with console.session(quiet=False):  # pytest's captured stderr is not a terminal
        assert not console.bars() and not console.verbose()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({}))  # a driver that `ray job submit` started
    with console.session(quiet=False, verbose=True):
        assert console.bars() and console.verbose()
        assert console.worker_env() == {console.PROGRESS_ENV: "bars", console.VERBOSE_ENV: "1"}
    with console.session(quiet=True):
        assert not console.bars()
    assert console.PROGRESS_ENV not in __import__("os").environ  # the session leaves the environment as it was


def test_workers_lines_are_split_between_terminal_and_log(tmp_path):
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    log, printed = tmp_path / "run.log", []
    tqdm_line = json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "x": 1})
    lines = [
        "[finetune] 3/3 steps in 0m02s",
        "Reporting training result 1: TrainingReport(...)",
        "/site-packages/x.py:1: FutureWarning: old",
        tqdm_line,
        "[2026-12-07 06:14:49,695 E 1 2] core_worker.cc:1: Actor with class name ...",
        "[sweep s1] trial a done",
    ]
    console._split_lines({"lines": lines, "pid": 7, "actor_name": "RayTrainWorker"}, printed.append, log)
    assert printed == [{"lines": [lines[0], tqdm_line, lines[5]], "pid": 7, "actor_name": "RayTrainWorker"}]
    header, *logged = log.read_text().splitlines()
    assert header.startswith("--- ")  # when, and which command: the log is made at its first line
    assert logged == [f"(RayTrainWorker pid=7) {line}" for line in (lines[1], lines[2], lines[4])]


def test_the_raylets_warnings_go_to_the_log_and_its_errors_still_print(tmp_path):
    log, printed = tmp_path / "run.log", []
    warning = "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4"
    error = "A worker died or was killed while executing a task by an unexpected system error."
    data = {"lines": [warning, error], "pid": "raylet", "is_err": False}
    console._split_raylet(data, False, print_to=lambda d, prefix: printed.append(d), log=log)
    assert printed == [{"lines": [error], "pid": "raylet", "is_err": False}]
    assert log.read_text().splitlines()[1:] == [f"(raylet) {warning}"]
    worker_line = {"lines": ["WARNING: a worker's own line"], "pid": 7, "is_err": False}
    console._split_raylet(worker_line, False, print_to=lambda d, prefix: printed.append(d), log=log)
    assert printed[-1] == worker_line  # workers' lines are _split_lines' business


def test_a_session_puts_rays_printers_back(ray_session, tmp_path):
    from ray._private import worker as ray_worker

    before = ray_worker.print_to_stdstream
    with console.session(quiet=True):
        console.plan_run_log(tmp_path, "printers")
        console.open_run_log(out=lambda line: None)
        console.filter_worker_lines()
        assert ray_worker.print_to_stdstream is not before
    assert ray_worker.print_to_stdstream is before


def test_a_quiet_command_hides_the_weights_loading_bar_and_puts_it_back():
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    with console.session(quiet=True), tempfile.TemporaryDirectory() as folder:
        console.plan_run_log(folder, "bars")
        console.open_run_log(out=lambda line: None)
        assert not transformers_logging.is_progress_bar_enabled()  # "Loading weights: 100%|..." is not shown
        assert not hub_utils.are_progress_bars_disabled()  # a download's bar still is
    assert transformers_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    with console.session(verbose=True):
        assert console.open_run_log("x", "y") is None and transformers_logging.is_progress_bar_enabled()


def _panacea(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it, in its own process and its own Ray (which forwards the workers' lines;
    the tests' shared Ray does not)."""
    environment = {**os.environ, "PANACEA_RAY_REGISTRY": "none", **(env or {})}
    environment.pop("PANACEA_PROGRESS", None) if env is None or "PANACEA_PROGRESS" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "panacea_platform.cli", "finetune", "-c", str(path), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )


def test_a_quiet_fit_prints_its_lines_and_logs_rays(distributed_job):
    config, path = distributed_job
    done = _panacea(path, "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr
    log = Path(config.output_dir) / "logs" / "watch.log"
    # One line for the stage, its "done" line, with how long it took.
    assert re.search(
        r"\[finetune panacea\] done \(3 steps in 0m\d\ds \(\d+\.\d\d steps/s\)\): final_task_loss=", printed
    )
    assert printed.count("[finetune panacea]") == 1
    assert f"[log] library warnings and Ray's own lines: {log}" in printed
    for noise in (
        "Reporting training result",
        "FutureWarning",
        "Setting up process group",
        "core_worker.cc",
        "Started a local Ray instance",
    ):
        assert noise not in printed, noise
    logged = log.read_text()
    assert "Reporting training result 3" in logged and "Started a local Ray instance" in logged


def test_bars_come_from_rays_tqdm_and_verbose_shows_rays_lines(distributed_job):
    config, path = distributed_job
    done = _panacea(path, "--verbose", "run_name=bars", env={"PANACEA_PROGRESS": "bars"})
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr
    # Ray's tqdm, drawn by the driver from the rank 0 worker's state: the count, a rate and the time left.
    assert "[finetune panacea] task_loss=" in printed and "3.00/3.00" in printed and "step/s" in printed
    assert "[finetune panacea] 20 training samples, 3 steps" in printed  # the line above the bar
    assert "Reporting training result 3" in printed  # --verbose
    assert not (Path(config.output_dir) / "logs" / "bars.log").exists()


def test_a_sweeps_table_is_tunes_with_the_searched_values_the_metric_and_the_time_left():
    from types import SimpleNamespace

    from panacea_platform.search.callbacks import TrialTable
    from panacea_platform.search.space import load_space

    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "offline_default.yaml")
    table = TrialTable(space, 15)
    assert dict(table._parameter_columns) == {f"params/{path}": path for path in space.parameters}
    assert list(table._metric_columns) == [space.metric]
    total = table.expected
    assert total == 6  # the 3 x 2 grid

    def trials(*statuses: str) -> list:
        return [SimpleNamespace(status=status) for status in statuses]

    # A resumed sweep: 2 trials had ended before this process started; they set no rate.
    assert table.ended_line(trials("TERMINATED", "ERROR", "RUNNING"), 5.0) == f"2/{total} trials ended"
    # 2 more ended in 600 s: 300 s a trial, 2 left -> 600 s, as tqdm estimates from the rate so far.
    line = table.ended_line(trials("TERMINATED", "ERROR", "TERMINATED", "TERMINATED", "RUNNING"), 600.0)
    assert line == f"4/{total} trials ended, ETA {console.clock(600.0)}"
    assert table.ended_line(trials(*["TERMINATED"] * total), 900.0) == f"{total}/{total} trials ended"


def test_the_sweeps_lines_say_the_time_left():
    from panacea_platform.search.plan import time_left

    assert time_left(0, 4, 100.0) == ""  # no trial ended yet: no rate
    assert time_left(2, 0, 100.0) == ""  # nothing left
    assert time_left(2, 4, 100.0) == f"ETA {console.clock(200.0)}"


def test_native_log_lines_on_stderr_go_to_the_run_log(tmp_path, capfd):
    """Ray's C++ core worker writes to descriptor 2 itself; its lines go to the log, the rest still shows."""
    with console.session(quiet=True):
        console.plan_run_log(tmp_path, "native")
        log = console.open_run_log(out=lambda line: None)
        os.write(2, b"[2026-12-07 07:59:24,110 E 19708 19708] core_worker.cc:2465: Actor with class name ...\n")
        os.write(2, b"an error the user must see\n")
        os.write(2, b"\r[finetune] 50%|#####     | 3/6")  # a bar's update, no newline
    assert log is not None and "core_worker.cc:2465" in log.read_text()
    shown = capfd.readouterr().err
    assert "an error the user must see" in shown and "[finetune] 50%" in shown and "core_worker" not in shown
