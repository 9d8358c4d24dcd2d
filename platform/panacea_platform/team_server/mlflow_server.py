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
            raise TrackingServerError(
                f"mlflow server exited with {process.returncode}" + (f"; its log: {log}" if log else "")
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise TrackingServerError(f"mlflow server did not answer at {url} within {timeout_s:g} s")


def stop_process(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a server started in a session of its own, with everything it started: SIGTERM to its
    process group, SIGKILL if it is not gone within `grace_s`."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
