"""Who gets into the team's tracking server (conftest's team_server: PostgreSQL with a password, MLflow's
basic-auth app): no request without credentials, none with wrong ones, a READ member reads and does no
more, and every `panacea` command tells wrong credentials from missing ones from no server, in one line,
before anything starts."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import one_line_exit_2
from panacea_platform.team_server.credentials import PASSWORD_ENV, USERNAME_ENV


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_only_the_right_password_gets_in(team_server):
    assert _status(team_server.url) == 401
    assert _status(team_server.url, "admin", "not-the-password") == 401
    assert _status(team_server.url, "nobody", team_server.admin_password) == 401
    assert _status(team_server.url, "admin", team_server.admin_password) == 200


def test_postgres_takes_no_connection_without_its_password_and_listens_on_loopback(team_server):
    from panacea_platform.team_server.postgres import postgres_bin

    postgres = team_server.postgres
    assert stat.S_IMODE(postgres.password_file.stat().st_mode) == 0o600
    query = [
        postgres_bin("psql"),
        "-h",
        "127.0.0.1",
        "-p",
        str(postgres.port),
        "-U",
        "postgres",
        "-d",
        "mlflow",
        "-tAc",
        "SHOW listen_addresses",
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    refused = subprocess.run(
        query, env={**env, "PGPASSFILE": "/nonexistent"}, capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
    allowed = subprocess.run(query, env={**env, **postgres.client_env}, capture_output=True, text=True, timeout=30)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "127.0.0.1"


def test_a_read_member_reads_but_cannot_log_or_delete_until_granted_edit(team_server, tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from panacea_platform.cli import main

    client = MlflowClient(team_server.url)  # as the admin (conftest's credentials)
    experiment = client.create_experiment("access-test")
    run_id = client.create_run(experiment).info.run_id
    credentials = tmp_path / "bob.mlflow-credentials"
    assert (
        main(
            [
                "team",
                "add-member",
                "bob",
                "--experiment",
                "access-test",
                "--permission",
                "READ",
                "--tracking-uri",
                team_server.url,
                "--credentials-out",
                str(credentials),
            ]
        )
        == 0
    )
    assert "added bob, READ on experiment 'access-test'" in capsys.readouterr().out
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600

    # Bob's machine: MLflow's credentials file in his home, no variables.
    (tmp_path / "home" / ".mlflow").mkdir(parents=True)
    credentials.rename(tmp_path / "home" / ".mlflow" / "credentials")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    assert client.get_run(run_id).info.status == "RUNNING"
    for write in (lambda: client.log_metric(run_id, "loss", 1.0), lambda: client.delete_run(run_id)):
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            write()

    monkeypatch.setenv(USERNAME_ENV, "admin")
    monkeypatch.setenv(PASSWORD_ENV, team_server.admin_password)
    assert (
        main(
            [
                "team",
                "grant",
                "bob",
                "--experiment",
                "access-test",
                "--permission",
                "EDIT",
                "--tracking-uri",
                team_server.url,
            ]
        )
        == 0
    )
    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    client.log_metric(run_id, "loss", 1.0)
    assert client.get_run(run_id).data.metrics["loss"] == 1.0


@pytest.fixture
def job(tiny_run_config, tmp_path, team_server):
    config = tiny_run_config(run_name="credentials", tracking={"tracking_uri": team_server.url})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


def test_wrong_missing_or_exposed_credentials_stop_a_command_in_one_line(
    job, team_server, tmp_path, monkeypatch, capsys
):
    config, path = job
    command = ["finetune", "--config", str(path)]
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    line = one_line_exit_2(command, capsys)
    assert "refused user 'admin': wrong credentials" in line and line.startswith("error: tracking.tracking_uri")

    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    line = one_line_exit_2(command, capsys)
    assert "asks for credentials and none are set" in line and "~/.mlflow/credentials" in line

    exposed = tmp_path / "home" / ".mlflow" / "credentials"
    exposed.parent.mkdir(parents=True)
    exposed.write_text(
        f"[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = {team_server.admin_password}\n"
    )
    exposed.chmod(0o644)
    line = one_line_exit_2(command, capsys)
    assert "can be read by others (mode 0644)" in line and f"chmod 600 {exposed}" in line
    assert not Path(config.output_dir).exists(), "a run folder or an MLflow store was made"

    exposed.chmod(0o600)  # the same file, private: the check passes
    from panacea_platform.preflight import tracking_problem

    assert tracking_problem(team_server.url) is None
