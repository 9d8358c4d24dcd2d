"""The team's tracking server: PostgreSQL (Debian's packages) as MLflow's backend store and a
`mlflow server --serve-artifacts` on localhost (conftest's team_server), and the command that serves
the pair.

The server is tested for real in test_multinode.py, where every node logs to it: the submitted
2-worker fine-tune is read back through the server alone from an empty folder (record, artifacts,
bytes in the server's artifact destination, the released model by run id), and a sweep of two
concurrent trials logs every step through it. (A fit of its own here repeated that one, 23 s.)
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, one_line_exit_2, require_postgres


def test_the_cli_serves_the_same_pair(tmp_path):
    from panacea_platform.cli import build_parser

    args = build_parser().parse_args(["tracking-server", "--data", str(tmp_path), "--port", "5123"])
    assert args.func.__name__ == "cmd_tracking_server" and args.port == 5123 and args.db_port == 5432


def _postgres_gone(data_dir: Path) -> bool:
    return not (data_dir / "postmaster.pid").exists()


def _processes_using(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (PostgreSQL's and the MLflow server's do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in command:
                found.append(command)
    return found


def _live_processes_marked(mark: str) -> list[str]:
    """Command lines of live (not zombie) processes whose environment holds `mark`: what a process
    started with it started in turn, MLflow's job runner and huey consumers included, which name no folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environment = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            if mark.encode() in environment and state != "Z":
                found.append(command)
    return found


def test_stopping_a_server_ends_what_it_started_even_what_ignores_sigterm(tmp_path):
    """MLflow 3's server leaves a job runner and huey consumers (about 230 MB each) that outlive its own
    exit; stop_process must end the whole group. Here a real leader starts a child that ignores SIGTERM."""
    import uuid

    from panacea_platform.team_server.mlflow_server import stop_process

    mark, ready = f"PANACEA_TEST_MARK={uuid.uuid4().hex}", tmp_path / "child-ignores-sigterm"
    child = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(600)"
    )
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(600)"
    name, value = mark.split("=", 1)
    process = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True, env={**os.environ, name: value})
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists() and len(_live_processes_marked(mark)) == 2, "the leader did not start its child"
    stop_process(process, grace_s=5)
    time.sleep(0.5)
    assert not _live_processes_marked(mark)


def _serve_until(data: Path, stop: int, mark: str) -> tuple[int, str]:
    """Run `panacea tracking-server` until it says it serves, send it `stop`, return (exit code, output).
    Every process it starts carries `mark` (NAME=VALUE) in its environment."""
    port, db_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "panacea_platform.cli",
        "tracking-server",
        "--data",
        str(data),
        "--port",
        str(port),
        "--db-port",
        str(db_port),
    ]
    name, value = mark.split("=", 1)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, name: value}
    )
    lines = []
    deadline = time.monotonic() + 360
    for line in process.stdout:
        lines.append(line)
        if line.startswith("on every node:") or time.monotonic() > deadline:
            break
    assert any(line.startswith("MLflow tracking server:") for line in lines), "".join(lines)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:  # authentication is on by default
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    process.send_signal(stop)
    output, _ = process.communicate(timeout=90)
    return process.returncode, "".join(lines) + output


def test_the_command_stops_both_servers_on_sigterm_and_sigint_and_recovers_a_stale_lock():
    """`panacea tracking-server` itself, stopped as a service manager stops it (SIGTERM) and as a person does
    (Ctrl-C): both servers gone, no process left; a lock file left by a crash does not stop the next start."""
    import signal
    import uuid

    require_postgres()
    data = Path(tempfile.mkdtemp(prefix="panacea-serve-"))
    data.chmod(0o755)  # PostgreSQL runs as its own user: it must enter every folder above its data
    mark = f"PANACEA_TEST_MARK={uuid.uuid4().hex}"
    try:
        code, output = _serve_until(data, signal.SIGTERM, mark)
        assert code == 0 and "MLflow server and PostgreSQL stopped" in output, output
        assert f"password from {data / 'admin-password'}" in output
        for secret in ("admin-password", "postgres.pgpass", "flask-secret-key", "basic_auth.ini"):
            assert stat.S_IMODE((data / secret).stat().st_mode) == 0o600, secret
        assert _postgres_gone(data / "postgres") and not _processes_using(data)
        assert not _live_processes_marked(mark)
        # A crash leaves PostgreSQL's lock behind, naming a process that is not PostgreSQL (here: this test).
        (data / "postgres" / "postmaster.pid").write_text(f"{os.getpid()}\n{data / 'postgres'}\n")
        code, output = _serve_until(data, signal.SIGINT, mark)
        assert code == 0 and "MLflow server and PostgreSQL stopped" in output, output
        assert _postgres_gone(data / "postgres") and not _processes_using(data)
        assert not _live_processes_marked(mark)
    finally:
        if _processes_using(data):  # never leave a server behind a failed assertion
            subprocess.run(["pkill", "-f", str(data)], check=False)
        shutil.rmtree(data, ignore_errors=True)


def test_an_open_server_beyond_loopback_and_an_exposed_password_file_are_refused_before_anything_starts(
    tmp_path, capsys
):
    line = one_line_exit_2(["tracking-server", "--data", str(tmp_path / "a"), "--host", "0.0.0.0", "--no-auth"], capsys)
    assert "--host 0.0.0.0 with --no-auth would let anyone" in line and "leave out --no-auth" in line
    exposed = tmp_path / "admin.txt"
    exposed.write_text("a-password\n")
    exposed.chmod(0o640)
    line = one_line_exit_2(
        ["tracking-server", "--data", str(tmp_path / "b"), "--admin-password-file", str(exposed)], capsys
    )
    assert f"{exposed} can be read by others (mode 0640): `chmod 600 {exposed}`" in line
    line = one_line_exit_2(
        ["tracking-server", "--data", str(tmp_path / "c"), "--admin-password-file", str(tmp_path / "missing.txt")],
        capsys,
    )
    assert "missing.txt does not exist" in line
    assert not any((tmp_path / name).exists() for name in ("a", "b/postgres", "c/postgres")), "something was started"
