"""`mlflow server` as a child process: PostgreSQL as the backend store, artifacts proxied by the server
(`--serve-artifacts`) into a destination on shared storage, so every process logs over HTTP and no
artifact is written to a worker's own disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from panacea_platform.team_server.errors import TrackingServerError


def start_mlflow_server(
    backend_uri: str,
    artifacts: Path,
    port: int,
    host: str = "127.0.0.1",
    log: Path | None = None,
    timeout_s: float = 90.0,
    workers: int = 2,
    env: dict[str, str] | None = None,
    app_name: str | None = None,
) -> subprocess.Popen:
    """`mlflow server` with the backend store and proxied artifacts; returns once /health answers.

    `env` is added to this process's environment (PGPASSFILE, the auth app's settings); `app_name`
    ("basic-auth") puts MLflow's authentication in front of every request but /health.
    One worker runs in one process; several are supervised by uvicorn, which restarts one that does
    not answer its health check within seconds (on a loaded machine, while it is still importing)."""
    artifacts = Path(artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *(["--app-name", app_name] if app_name else []),
    ]
    output = open(log, "w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
    )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _kill_group(process.pid)  # what it started before it failed
            raise TrackingServerError(
                f"mlflow server exited with {process.returncode}" + (f"; its log: {log}" if log else "")
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    _kill_group(process.pid)
    process.wait()
    raise TrackingServerError(f"mlflow server did not answer at {url} within {timeout_s:g} s")


def stop_process(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a server started in a session of its own, with everything it started: SIGTERM to its
    process group, then SIGKILL to whatever of the group is left (the leader after `grace_s`, the
    rest a moment after the leader). The leader's exit is not the end: MLflow 3's job runner, its huey
    consumers and uvicorn's workers can outlive it (about 230 MB each; the ones a test run left behind
    filled this machine's memory)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        process.wait()
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 3  # the rest of the group, a moment to end on the SIGTERM
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_group(process.pid)
    process.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
