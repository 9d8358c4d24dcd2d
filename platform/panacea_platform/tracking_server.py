"""A team's MLflow tracking server: PostgreSQL as the backend store, artifacts proxied by the server
(`--serve-artifacts`) into a destination on shared storage, so every process logs over HTTP and no
artifact is written to a worker's own disk.

`panacea tracking-server --data DIR` starts both on this machine and keeps them in the foreground;
SIGINT (Ctrl-C) and SIGTERM (`timeout`, systemd, a cluster's shutdown) both stop both. A PostgreSQL
lock file left by a crash is recognised and removed; the tests start the same two processes. PostgreSQL comes from the Debian
packages (`apt-get install postgresql`; scripts/setup.sh installs it when it can).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DB_NAME = "mlflow"
DB_USER = "postgres"


class TrackingServerError(RuntimeError):
    """PostgreSQL or the MLflow server could not be started; the message says what to do."""


def postgres_bin(tool: str) -> str | None:
    """The path of a PostgreSQL tool (initdb, pg_ctl...): on PATH, else Debian's versioned folder."""
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return candidates[-1] if candidates else None


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: run them as the packages' postgres user.
    if os.geteuid() == 0:
        return ["runuser", "-u", DB_USER, "--", *command]
    return command


@dataclass
class Postgres:
    data_dir: Path
    port: int

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def stop(self) -> None:
        subprocess.run(_as_postgres_user([postgres_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "stop"]),
                       capture_output=True, timeout=60)


def start_postgres(data_dir: Path, port: int) -> Postgres:
    """initdb (once) and start a PostgreSQL server on 127.0.0.1:port, with an `mlflow` database.

    Local connections are trusted: a team exposing it beyond the machine sets a password and edits
    pg_hba.conf as PostgreSQL's documentation says.
    """
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise TrackingServerError("PostgreSQL is not installed: `apt-get install -y postgresql` (Debian, as root)")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(data_dir, DB_USER, DB_USER)
        if subprocess.run(_as_postgres_user(["test", "-w", str(data_dir)]), timeout=30).returncode != 0:
            raise TrackingServerError(f"the {DB_USER} user cannot reach {data_dir}: a folder above it is private "
                                      "(mode 700); put the server's data where every folder above can be entered")
    if not (data_dir / "PG_VERSION").is_file():
        _run(_as_postgres_user([initdb, "-D", str(data_dir), "-U", DB_USER, "--auth=trust", "-E", "UTF8"]), "initdb")
    _clear_stale_lock(data_dir)
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data_dir}"
    _run(_as_postgres_user([pg_ctl, "-D", str(data_dir), "-o", options, "-l", str(data_dir / "server.log"),
                            "-w", "-t", "60", "start"]), "pg_ctl start")
    server = Postgres(data_dir, port)
    created = subprocess.run([postgres_bin("psql") or "psql", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER,
                              "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"],
                             capture_output=True, text=True, timeout=30)
    if created.stdout.strip() != "1":
        _run([postgres_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME],
             "createdb")
    return server


def _clear_stale_lock(data_dir: Path) -> None:
    """A postmaster.pid whose process is gone, or is not a PostgreSQL server (its number reused after a crash),
    is removed; one of a server that still runs on this folder is an error saying how to stop it."""
    lock = data_dir / "postmaster.pid"
    if not lock.is_file():
        return
    pid = (lock.read_text().splitlines() or [""])[0].strip()
    try:
        command = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (ValueError, OSError):
        command = ""
    if "postgres" in command and str(data_dir) in command:
        raise TrackingServerError(f"a PostgreSQL server (pid {pid}) already runs on {data_dir}: stop it "
                                  f"(`pg_ctl -D {data_dir} stop`, as the {DB_USER} user) or pass another --data")
    lock.unlink()


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise TrackingServerError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout)[-800:]}")


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, host: str = "127.0.0.1",
                        log: Path | None = None, timeout_s: float = 90.0, workers: int = 2) -> subprocess.Popen:
    """`mlflow server` with the backend store and proxied artifacts; returns once /health answers.

    One worker runs in one process; several are supervised by uvicorn, which restarts one that does
    not answer its health check within seconds (on a loaded machine, while it is still importing)."""
    artifacts = Path(artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
               "--artifacts-destination", artifacts.as_uri(), "--host", host, "--port", str(port), "--workers", str(workers)]
    output = open(log, "w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TrackingServerError(f"mlflow server exited with {process.returncode}" +
                                      (f"; its log: {log}" if log else ""))
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
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's way out: the servers are stopped in serve's finally


def serve(data: Path, port: int, db_port: int, artifacts: Path | None, host: str, out=print) -> int:
    """Start PostgreSQL and the MLflow server and keep them until SIGINT or SIGTERM (the CLI command)."""
    import signal

    data = Path(data)
    signal.signal(signal.SIGTERM, _interrupt)
    postgres, server = None, None
    try:
        postgres = start_postgres(data / "postgres", db_port)
        # A first start migrates a new database: minutes on a busy head node.
        server = start_mlflow_server(postgres.uri, artifacts or data / "artifacts", port, host,
                                     log=data / "mlflow-server.log", timeout_s=300)
        out(f"MLflow tracking server: http://{host}:{port} (PostgreSQL {postgres.uri}, artifacts in "
            f"{(artifacts or data / 'artifacts').resolve()})")
        out(f"on every node: export MLFLOW_TRACKING_URI=http://{host}:{port}   (Ctrl-C or SIGTERM stops the server)")
        while server.poll() is None:
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second signal must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if server is not None:
            stop_process(server)
        if postgres is not None:
            postgres.stop()
        out("MLflow server and PostgreSQL stopped")
