"""A command that trains checks its model and its tracking store first: one line naming the setting,
exit 2, within seconds, before Ray, MLflow or any training starts (as a new user meets it)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import yaml

from conftest import one_line_exit_2
from panacea_platform.preflight import model_problem, tracking_problem

# Nothing listens on the discard port: a connection there is refused at once, as an unreachable hub's is.
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture
def job(tiny_run_config, tmp_path):
    config = tiny_run_config(run_name="preflight")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


@pytest.mark.parametrize("command", [["finetune"], ["align"], ["demo", "--no-eval"]])
def test_an_unknown_model_with_the_hub_away_stops_before_anything_starts(command, job, monkeypatch, capsys):
    config, path = job
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    line = one_line_exit_2([*command, "--config", str(path), "model.name=not/a-model"], capsys)
    assert "model.name = 'not/a-model'" in line and "hub is unreachable" in line
    assert not Path(config.output_dir).exists(), "a run folder or an MLflow store was made"


def test_with_hf_hub_offline_the_cache_is_what_counts(job, monkeypatch, capsys):
    _, path = job
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_exit_2(["finetune", "--config", str(path), "model.name=not/a-model"], capsys)
    assert "not in the local Hugging Face cache (HF_HUB_OFFLINE is set)" in line


def test_an_unreachable_tracking_server_stops_before_anything_starts(job, monkeypatch, capsys):
    config, path = job
    line = one_line_exit_2(["finetune", "--config", str(path), f"tracking.tracking_uri={NOWHERE}"], capsys)
    assert line.startswith(f"error: tracking.tracking_uri = '{NOWHERE}'") and "no MLflow server answered" in line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", NOWHERE)  # as a cluster passes it
    line = one_line_exit_2(["finetune", "--config", str(path)], capsys)
    assert f"MLFLOW_TRACKING_URI = '{NOWHERE}'" in line
    assert not Path(config.output_dir).exists()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the handler's API
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_what_can_be_reached_passes(tiny_llama):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert tracking_problem(f"http://127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()
    assert tracking_problem("sqlite:////tmp/x.db") is None
    assert model_problem(str(tiny_llama)) is None and model_problem("smollm2-135m-instruct") is None
