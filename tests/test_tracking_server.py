"""The team's tracking server, for real: PostgreSQL (Debian's packages) as MLflow's backend store and a
`mlflow server --serve-artifacts` on localhost. A 2-worker fine-tune logs to it over HTTP, and an
empty folder then reads everything back through the server alone.

Where PostgreSQL cannot run (not installed, and no root to install it) these tests skip with that
reason; in CI (CI=true) they must run, and a skip there is a failure. Cost: about 12 s to start the
two servers (MLflow's migrations of a new database) and one Ray Train fit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def team_server():
    from panacea_platform.tracking_server import postgres_bin, start_mlflow_server, start_postgres, stop_process

    if postgres_bin("initdb") is None:
        reason = "PostgreSQL is not installed (scripts/setup.sh installs it when run as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: in CI the tracking-server tests must run")
        pytest.skip(reason)
    # PostgreSQL runs as its own user: every folder above its data must be enterable (pytest's are 700).
    root = Path(tempfile.mkdtemp(prefix="panacea-team-"))
    root.chmod(0o755)
    postgres = start_postgres(root / "postgres", _free_port())
    server = None
    try:
        port = _free_port()
        server = start_mlflow_server(postgres.uri, root / "artifacts", port, log=root / "mlflow-server.log")
        yield f"http://127.0.0.1:{port}", root / "artifacts"
    finally:
        if server is not None:
            stop_process(server)
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def finetune_on_the_server(team_server, ray_session, tiny_llama, placeholder_harmful_file, tmp_path_factory):
    from panacea_platform.training.launch_ray import run_distributed

    url, _ = team_server
    output = tmp_path_factory.mktemp("team-runs")
    config = tiny_config(tiny_llama, placeholder_harmful_file, output, "team-finetune",
                         tracking={"tracking_uri": url, "experiment": "team"})
    # Half a CPU a worker: the session's Ray has 2, and an earlier test's stopped trial may still hold 0.9.
    result = run_distributed(config, "finetune", num_workers=2, zero_stage=2, storage_path=output / "ray",
                             cpus_per_worker=0.5, out=lambda line: None)
    return config, result


def test_a_two_worker_finetune_is_read_back_through_the_server_alone(finetune_on_the_server, team_server,
                                                                    tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    config, result = finetune_on_the_server
    url, artifacts = team_server
    monkeypatch.chdir(tmp_path)  # an empty folder: nothing below comes from the run's own disk
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("team")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts must go through the server"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.params["panacea.rho"] == str(config.panacea.rho) and run.data.params["stage"] == "finetune"
    assert run.data.tags["num_workers"] == "2" and run.data.tags["zero_stage"] == "2"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "task_loss"))
    assert steps == [1, 2, 3], "a step is missing or logged twice"
    assert run.data.metrics["released_heldout_harmful_loss"] == pytest.approx(
        result.summary["released_heldout_harmful_loss"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "adapter_unperturbed", "perturbation.safetensors", "history.jsonl", "summary.json",
            "training_curves.png", "config.yaml"} <= names
    downloaded = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
    want = (result.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert (downloaded / "adapter_model.safetensors").read_bytes() == want
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text()) \
        == result.summary
    # The bytes live in the server's artifact destination, not in a folder of the run's output.
    assert list(artifacts.rglob("adapter_model.safetensors"))
    assert not (Path(config.output_dir) / "mlartifacts").exists()


def test_the_cli_serves_the_same_pair(tmp_path):
    from panacea_platform.cli import build_parser

    args = build_parser().parse_args(["tracking-server", "--data", str(tmp_path), "--port", "5123"])
    assert args.func.__name__ == "cmd_tracking_server" and args.port == 5123 and args.db_port == 5432


def test_a_sweep_of_two_concurrent_trials_on_the_server_loses_nothing(team_server, ray_session, tiny_llama,
                                                                      placeholder_harmful_file, tmp_path):
    """Two trials log at the same time through the server: the parent/child tree, true statuses, and
    every step of every trial's metrics, read back through the server."""
    import yaml
    from mlflow.tracking import MlflowClient

    from panacea_platform.config import save_config
    from panacea_platform.search.sweep import run_sweep

    url, _ = team_server
    config = tiny_config(tiny_llama, placeholder_harmful_file, tmp_path / "runs", "team-sweep",
                         optim={"max_steps": 4, "log_every": 1}, tracking={"tracking_uri": url, "experiment": "team-sweep"})
    save_config(config, tmp_path / "job.yaml")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"parameters": {"panacea.rho": {"grid": [0.1, 0.2]}}, "evaluate": False,
                                     "max_concurrent_trials": 2, "eval_every": 1,
                                     # small enough that both run at once in the session's 2 CPUs
                                     "resources": {"cpus_per_worker": 0.4}}))
    outcome = run_sweep(space, tmp_path / "job.yaml", name="team", out=lambda line: None)
    assert outcome.status == "FINISHED"
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("team-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_id == outcome.parent_run_id]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id and
              "tune_trial_id" in r.data.tags]
    assert parent and parent[0].info.status == "FINISHED" and len(trials) == 2
    starts, ends = sorted(r.info.start_time for r in trials), sorted(r.info.end_time for r in trials)
    assert starts[1] < ends[0], "the two trials did not run at the same time"
    for run in trials:
        assert run.info.status == "FINISHED"
        for key in ("task_loss", "released_heldout_harmful_loss"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == [1, 2, 3, 4], (key, steps)
        assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}
