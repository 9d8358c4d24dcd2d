"""PostgreSQL as the tracking server's database, from Debian's packages (`apt-get install postgresql`;
scripts/setup.sh installs it when it can).

Over TCP every connection needs the superuser's password (scram-sha-256, PostgreSQL's own default for
TCP). The password lives in a libpq password file beside the data folder, mode 0600, which clients
find through PGPASSFILE: it never appears in a command line or a URI. The server listens on loopback
unless asked otherwise. The Unix socket, which the platform uses to administer the database, is in
the data folder itself (mode 0700), where only the database's own user and root can reach it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from panacea_platform.team_server.errors import TrackingServerError
from panacea_platform.team_server.secret_files import new_secret, read_private, write_private

DB_NAME = "mlflow"
AUTH_DB_NAME = "mlflow_auth"  # the basic-auth app's users and permissions
DB_USER = "postgres"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


def _give_to_postgres_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, DB_USER, DB_USER)


@dataclass
class Postgres:
    data_dir: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def password_file(self) -> Path:
        """libpq's password file (PGPASSFILE format), beside the data folder."""
        return self.data_dir.parent / f"{self.data_dir.name}.pgpass"

    @property
    def client_env(self) -> dict[str, str]:
        """What a client process (the MLflow server) needs in its environment to log in."""
        return {"PGPASSFILE": str(self.password_file)}

    def uri(self, database: str = DB_NAME) -> str:
        # No password here: libpq reads it from PGPASSFILE.
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run(
            _as_postgres_user([postgres_bin("pg_ctl") or "pg_ctl", "-D", str(self.data_dir), "-m", "fast", "stop"]),
            capture_output=True,
            timeout=60,
        )


def start_postgres(data_dir: Path, port: int, host: str = "127.0.0.1") -> Postgres:
    """initdb (once) and start a PostgreSQL server on host:port with the `mlflow` and `mlflow_auth` databases;
    the superuser's password is generated on the first start and kept in `Postgres.password_file`."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise TrackingServerError("PostgreSQL is not installed: `apt-get install -y postgresql` (Debian, as root)")
    server = Postgres(Path(data_dir).resolve(), port, host)
    _prepare_data_dir(server.data_dir)
    if not (server.data_dir / "PG_VERSION").is_file():
        _run(_as_postgres_user([initdb, "-D", str(server.data_dir), "-U", DB_USER, "-E", "UTF8"]), "initdb")
    _write_access_rules(server)
    _clear_stale_lock(server.data_dir)
    options = f"-p {port} -c listen_addresses={host} -k {server.data_dir} -c password_encryption=scram-sha-256"
    _run(
        _as_postgres_user(
            [
                pg_ctl,
                "-D",
                str(server.data_dir),
                "-o",
                options,
                "-l",
                str(server.data_dir / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        "pg_ctl start",
    )
    _set_password(server)
    for database in (DB_NAME, AUTH_DB_NAME):
        _create_database(server, database)
    return server


def _prepare_data_dir(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    _give_to_postgres_user(data_dir)
    if os.geteuid() == 0 and subprocess.run(_as_postgres_user(["test", "-w", str(data_dir)]), timeout=30).returncode:
        raise TrackingServerError(
            f"the {DB_USER} user cannot reach {data_dir}: a folder above it is private "
            "(mode 700); put the server's data where every folder above can be entered"
        )


def _write_access_rules(server: Postgres) -> None:
    """pg_hba.conf, rewritten at every start so a database made before passwords were kept is brought in line."""
    rules = [
        "# Written by `panacea tracking-server` at every start; edits here are lost.",
        "# The socket lives in the data folder (mode 0700): only its owner and root can reach it.",
        f"local all {DB_USER} trust",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host all all ::1/128 scram-sha-256",
    ]
    if server.host not in LOOPBACK:  # asked for by --db-host: other machines, with the password
        rules += ["host all all 0.0.0.0/0 scram-sha-256", "host all all ::/0 scram-sha-256"]
    hba = write_private(server.data_dir / "pg_hba.conf", "\n".join(rules) + "\n")
    _give_to_postgres_user(hba)


def _set_password(server: Postgres) -> None:
    """Generate the password the first time; set it on the server at every start (it is the file that counts)."""
    if not server.password_file.exists():
        write_private(server.password_file, f"*:*:*:{DB_USER}:{new_secret()}\n")
    password = read_private(server.password_file, "PostgreSQL's password file").rsplit(":", 1)[-1]
    # Over stdin, so the password is in no process's command line.
    _run(
        _psql(server, "-v", "ON_ERROR_STOP=1", "-f", "-"),
        "setting PostgreSQL's password",
        stdin=f"ALTER USER {DB_USER} PASSWORD '{password}';\n",
    )


def _psql(server: Postgres, *args: str, tool: str = "psql") -> list[str]:
    return [postgres_bin(tool) or tool, "-h", str(server.data_dir), "-p", str(server.port), "-U", DB_USER, *args]


def _create_database(server: Postgres, name: str) -> None:
    found = subprocess.run(
        _psql(server, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if found.stdout.strip() != "1":
        _run(_psql(server, name, tool="createdb"), f"createdb {name}")


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
        raise TrackingServerError(
            f"a PostgreSQL server (pid {pid}) already runs on {data_dir}: stop it "
            f"(`pg_ctl -D {data_dir} stop`, as the {DB_USER} user) or pass another --data"
        )
    lock.unlink()


def _run(command: list[str], what: str, stdin: str | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, input=stdin)
    if result.returncode != 0:
        raise TrackingServerError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout)[-800:]}")
