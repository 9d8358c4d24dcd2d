"""One Ray per machine: a second `panacea` command started while another runs joins that command's Ray
instead of starting a second one beside it, and the first, done sooner, keeps its Ray up until the
second has finished.

Both commands are real CLI fine-tunes on Ray Train (ZeRO-0, one worker each), in subprocesses that
use a registry file of this test's own (PANACEA_RAY_REGISTRY). Cost: about 60 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import tiny_config


def _gcs_servers() -> set[int]:
    """Pids of every Ray GCS server on this machine: one per Ray instance."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "gcs_server":
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def _command(tmp_path: Path, run_name: str, steps: int, model: Path, harmful: Path) -> list[str]:
    config = tiny_config(
        model,
        harmful,
        tmp_path / "runs",
        run_name,
        optim={"max_steps": steps, "log_every": 5},
        scaling={"num_workers": 1, "zero_stage": 0, "cpus_per_worker": 0.5},
    )
    job = tmp_path / f"{run_name}.yaml"
    job.write_text(yaml.safe_dump(config.to_dict()))
    return [sys.executable, "-m", "panacea_platform.cli", "finetune", "--config", str(job)]


def test_a_second_command_joins_the_first_ones_ray(tiny_llama, placeholder_harmful_file, tmp_path):
    registry = tmp_path / "ray-registry.json"
    env = {**os.environ, "PANACEA_RAY_REGISTRY": str(registry)}
    env.pop("RAY_ADDRESS", None)
    before = _gcs_servers()
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = subprocess.Popen(
        _command(tmp_path, "first", 3, tiny_llama, placeholder_harmful_file),
        cwd=tmp_path,
        env=env,
        stdout=first_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    second = None
    try:
        deadline = time.monotonic() + 120
        while not registry.is_file():
            assert first.poll() is None and time.monotonic() < deadline, first_log.read_text()[-3000:]
            time.sleep(0.2)
        second = subprocess.Popen(
            _command(tmp_path, "second", 60, tiny_llama, placeholder_harmful_file),
            cwd=tmp_path,
            env=env,
            stdout=second_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        instances: set[int] = set()
        while second.poll() is None and time.monotonic() < deadline + 300:
            instances |= _gcs_servers() - before
            time.sleep(0.5)
        assert second.wait(timeout=60) == 0, second_log.read_text()[-3000:]
        assert first.wait(timeout=120) == 0, first_log.read_text()[-3000:]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert len(instances) == 1, f"{len(instances)} Ray instances ran for the two commands"
    assert f"joining the Ray that another panacea command (pid {first.pid})" in second_log.read_text()
    # The first ended its fit sooner and kept its Ray up for the second.
    assert "it stops when they end" in first_log.read_text() and f"pids {second.pid}" in first_log.read_text()
    assert not registry.exists(), "the owner left its registry behind"


def test_a_cluster_of_several_machines_needs_a_tracking_server_not_a_file():
    """Judged from ray.nodes(): rank 0 may log from another machine, where this machine's SQLite file is not."""
    from panacea_platform.ray_instance import machines_problem

    three_nodes_one_machine = [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}] * 3
    second_machine = [{"Alive": True, "NodeManagerAddress": "10.0.0.2"}]
    gone = [{"Alive": False, "NodeManagerAddress": "10.0.0.2"}]
    assert machines_problem(three_nodes_one_machine, "sqlite:////runs/mlflow.db") is None
    assert machines_problem(three_nodes_one_machine + gone, "sqlite:////runs/mlflow.db") is None
    for local in ("sqlite:////runs/mlflow.db", "/runs/mlruns", "file:///runs/mlruns"):
        problem = machines_problem(three_nodes_one_machine + second_machine, local)
        assert problem is not None and "spans 2 machines" in problem and "MLFLOW_TRACKING_URI" in problem
    assert machines_problem(three_nodes_one_machine + second_machine, "http://head:5000") is None
    assert machines_problem(three_nodes_one_machine + second_machine, "postgresql://head/mlflow") is None
