"""`panacea tracking-server --data DIR`: PostgreSQL and `mlflow server` on this machine, in the foreground,
with MLflow's basic-auth app in front unless --no-auth is given on loopback.

SIGINT (Ctrl-C) and SIGTERM (`timeout`, systemd, a cluster's shutdown) both stop both. DIR holds the
database, the server's log, the artifacts by default, and the secrets (each mode 0600): PostgreSQL's
password (postgres.pgpass), the admin's (admin-password, unless given) and the server's session key.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from panacea_platform.team_server.auth import auth_server_env
from panacea_platform.team_server.errors import TrackingServerError
from panacea_platform.team_server.mlflow_server import start_mlflow_server, stop_process
from panacea_platform.team_server.postgres import AUTH_DB_NAME, LOOPBACK, Postgres, start_postgres


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's way out: the servers are stopped in serve's finally


def serve(
    data: Path,
    port: int,
    db_port: int,
    artifacts: Path | None,
    host: str,
    *,
    auth: bool = True,
    admin_password_file: Path | None = None,
    db_host: str = "127.0.0.1",
    out=print,
) -> int:
    """Start PostgreSQL and the MLflow server and keep them until SIGINT or SIGTERM (the CLI command)."""
    if not auth and host not in LOOPBACK:
        raise TrackingServerError(
            f"--host {host} with --no-auth would let anyone who reaches the port read, change "
            "and delete every run: leave out --no-auth (MLflow's basic-auth app is the default)"
        )
    data = Path(data).resolve()
    artifacts = Path(artifacts or data / "artifacts").resolve()
    # Secrets are read (and a readable one refused) before anything starts.
    auth_env: dict[str, str] = {}
    admin_source: str | None = None
    if auth:
        auth_env, admin_source = auth_server_env(
            data, Postgres(data / "postgres", db_port).uri(AUTH_DB_NAME), admin_password_file
        )
    signal.signal(signal.SIGTERM, _interrupt)
    postgres, server = None, None
    try:
        postgres = start_postgres(data / "postgres", db_port, db_host)
        # A first start migrates a new database: minutes on a busy head node.
        server = start_mlflow_server(
            postgres.uri(),
            artifacts,
            port,
            host,
            log=data / "mlflow-server.log",
            timeout_s=300,
            env={**postgres.client_env, **auth_env},
            app_name="basic-auth" if auth else None,
        )
        _say_where(out, host, port, postgres, artifacts, admin_source)
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


def _say_where(out, host: str, port: int, postgres: Postgres, artifacts: Path, admin_source: str | None) -> None:
    out(
        f"MLflow tracking server: http://{host}:{port} (PostgreSQL on {postgres.host}:{postgres.port}, its password "
        f"in {postgres.password_file}; artifacts in {artifacts})"
    )
    if admin_source is None:
        out("authentication: off (--no-auth, loopback only)")
    else:
        out(
            f"authentication: MLflow's basic-auth app; user 'admin', password from {admin_source} (used on the first "
            "start only). Add a member: panacea team add-member NAME --experiment EXPERIMENT --permission READ"
        )
    credentials = (
        "" if admin_source is None else ", and credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or ~/.mlflow/credentials)"
    )
    out(
        f"on every node: export MLFLOW_TRACKING_URI=http://{host}:{port}{credentials}   "
        "(Ctrl-C or SIGTERM stops the server)"
    )
