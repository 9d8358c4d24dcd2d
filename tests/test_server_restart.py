"""A team server is restarted for upgrades: a fit that logs to it while MLflow and PostgreSQL are both
stopped and started again loses nothing. Its own server (a real PostgreSQL and `mlflow server`), a
1-worker Ray Train fit slowed to last through the outage; MLflow's client retries each request
(MLFLOW_HTTP_REQUEST_MAX_RETRIES, exponential back-off), which covers a restart within a minute."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port, require_postgres
from crash_hooks import SlowSteps

STEPS = 20
OUTAGE_S = 20


@pytest.fixture
def restartable_server():
    """(url, stop, start): a server whose MLflow and PostgreSQL a test stops and starts on the same ports."""
    from panacea_platform.team_server.mlflow_server import start_mlflow_server, stop_process
    from panacea_platform.team_server.postgres import start_postgres

    require_postgres()
    root = Path(tempfile.mkdtemp(prefix="panacea-restart-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user: it must enter every folder above its data
    db_port, port = free_port(), free_port()
    live: dict = {}

    def start(timeout_s: float = 240) -> None:
        live["postgres"] = start_postgres(root / "postgres", db_port)
        live["mlflow"] = start_mlflow_server(
            live["postgres"].uri(),
            root / "artifacts",
            port,
            timeout_s=timeout_s,
            log=root / "mlflow-server.log",
            env=live["postgres"].client_env,
        )

    def stop() -> None:
        if "mlflow" in live:
            stop_process(live.pop("mlflow"))
        if "postgres" in live:
            live.pop("postgres").stop()

    try:
        start()  # inside: a server that does not start must not leave its PostgreSQL running
        yield f"http://127.0.0.1:{port}", stop, start
    finally:
        stop()
        shutil.rmtree(root, ignore_errors=True)


def _logged_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "task_loss"))


@pytest.mark.slow
def test_a_server_restarted_mid_fit_loses_no_metric_and_no_artifact(ray_session, restartable_server, tiny_run_config):
    from mlflow.tracking import MlflowClient

    from panacea_platform.training.launch_ray import run_distributed

    url, stop, start = restartable_server
    config = tiny_run_config(
        run_name="restart",
        tracking={"tracking_uri": url, "experiment": "restart"},
        optim={"max_steps": STEPS, "log_every": 1},
        scaling={"num_workers": 1, "zero_stage": 0},
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = run_distributed(
                config,
                "finetune",
                storage_path=Path(config.output_dir) / "ray",
                step_hook=SlowSteps(0.5),
                out=lambda line: None,
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    client = MlflowClient(url)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and thread.is_alive():
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], filter_string="attributes.run_name = 'restart'"
        )
        if runs and len(_logged_steps(client, runs[0].info.run_id)) >= 3:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the fit never logged 3 steps: {outcome}")
    run_id = runs[0].info.run_id
    stop()
    time.sleep(OUTAGE_S)
    assert thread.is_alive(), f"the fit ended while the server was down: {outcome}"
    start()
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _logged_steps(client, run_id) == list(range(1, STEPS + 1)), "a step's metrics were lost in the outage"
    names = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"adapter", "perturbation.safetensors", "history.jsonl", "summary.json", "config.yaml"} <= names


def test_a_server_gone_past_mlflows_retries_is_one_clear_line(restartable_server, monkeypatch):
    from ray.train.v2.api.exceptions import WorkerGroupError

    from panacea_platform.tracking import Tracker, TrackingUnreachableError
    from panacea_platform.user_errors import user_error_in

    url, stop, _ = restartable_server
    tracker = Tracker(url, "gone", "gone")
    tracker.log_metrics({"task_loss": 1.0}, 1)
    stop()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError) as gone:
        tracker.log_metrics({"task_loss": 0.5}, 2)
    assert time.monotonic() - started < 30
    message = str(gone.value)
    assert "\n" not in message and f"the tracking server at {url} did not answer" in message
    assert "while logging step 2's metrics: start the server again" in message
    # From a Ray Train worker it reaches the driver inside Ray's error; the CLI prints it as that one line.
    assert user_error_in(WorkerGroupError("training failed", {0: gone.value})) is gone.value
