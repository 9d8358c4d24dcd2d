"""The team's tracking server, for real: PostgreSQL (Debian's packages) as MLflow's backend store and a
`mlflow server --serve-artifacts` on localhost (conftest's team_server). A 2-worker fine-tune logs to
it over HTTP, and an empty folder then reads everything back through the server alone. A sweep of two
concurrent trials logs to it from a three-node cluster in test_multinode.py.

Where PostgreSQL cannot run (not installed, and no root to install it) these tests skip with that
reason; in CI (CI=true) they must run, and a skip there is a failure. Cost: about 12 s to start the
two servers (MLflow's migrations of a new database) and one Ray Train fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


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
