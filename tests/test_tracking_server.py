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
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import free_port, require_postgres

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


def _serve_until(data: Path, stop: int) -> tuple[int, str]:
    """Run `panacea tracking-server` until it says it serves, send it `stop`, return (exit code, output)."""
    port, db_port = free_port(), free_port()
    command = [sys.executable, "-m", "panacea_platform.cli", "tracking-server", "--data", str(data),
               "--port", str(port), "--db-port", str(db_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 360
    for line in process.stdout:
        lines.append(line)
        if line.startswith("on every node:") or time.monotonic() > deadline:
            break
    assert any(line.startswith("MLflow tracking server:") for line in lines), "".join(lines)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
        assert answer.status == 200
    process.send_signal(stop)
    output, _ = process.communicate(timeout=90)
    return process.returncode, "".join(lines) + output


def test_the_command_stops_both_servers_on_sigterm_and_sigint_and_recovers_a_stale_lock():
    """`panacea tracking-server` itself, stopped as a service manager stops it (SIGTERM) and as a person does
    (Ctrl-C): both servers gone, no process left; a lock file left by a crash does not stop the next start."""
    import signal

    require_postgres()
    data = Path(tempfile.mkdtemp(prefix="panacea-serve-"))
    data.chmod(0o755)  # PostgreSQL runs as its own user: it must enter every folder above its data
    try:
        code, output = _serve_until(data, signal.SIGTERM)
        assert code == 0 and "MLflow server and PostgreSQL stopped" in output, output
        assert _postgres_gone(data / "postgres") and not _processes_using(data)
        # A crash leaves PostgreSQL's lock behind, naming a process that is not PostgreSQL (here: this test).
        (data / "postgres" / "postmaster.pid").write_text(f"{os.getpid()}\n{data / 'postgres'}\n")
        code, output = _serve_until(data, signal.SIGINT)
        assert code == 0 and "MLflow server and PostgreSQL stopped" in output, output
        assert _postgres_gone(data / "postgres") and not _processes_using(data)
    finally:
        if _processes_using(data):  # never leave a server behind a failed assertion
            subprocess.run(["pkill", "-f", str(data)], check=False)
        shutil.rmtree(data, ignore_errors=True)
