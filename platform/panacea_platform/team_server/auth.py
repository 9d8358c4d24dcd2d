"""MLflow's basic-auth app for the team server: every request needs a user and password; users hold READ,
EDIT or MANAGE per experiment (a user who creates an experiment manages it), and DEFAULT_PERMISSION
on the rest, so the team reads each other's runs and changes only its own.

The admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's own variable) or a file, never
from the command line; on the first start without either it is generated into DATA/admin-password,
mode 0600. Users and passwords live in PostgreSQL beside the runs (database `mlflow_auth`).
"""

from __future__ import annotations

from pathlib import Path

from panacea_platform.team_server.secret_files import secret_from, write_private_ini

ADMIN_USER = "admin"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
DEFAULT_PERMISSION = "READ"
GRANTABLE = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")  # MLflow's permissions on an experiment


def auth_server_env(data: Path, auth_database_uri: str, admin_password_file: Path | None) -> tuple[dict[str, str], str]:
    """The environment that runs `mlflow server --app-name basic-auth`, and where the admin password came from.

    Writes DATA/basic_auth.ini (mode 0600); the Flask session key that guards forms against CSRF is kept
    in DATA/flask-secret-key, so sessions outlive a restart and every worker shares it."""
    password, source = secret_from(
        ADMIN_PASSWORD_ENV, admin_password_file, data / "admin-password", "the admin password file"
    )
    secret_key, _ = secret_from(
        "MLFLOW_FLASK_SERVER_SECRET_KEY", None, data / "flask-secret-key", "the server's secret key file"
    )
    config = write_private_ini(
        data / "basic_auth.ini",
        "mlflow",
        {
            "default_permission": DEFAULT_PERMISSION,
            "database_uri": auth_database_uri,
            "admin_username": ADMIN_USER,
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        },
    )
    # MLflow reads the admin password only while its user store is empty: the first start.
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        ADMIN_PASSWORD_ENV: password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
    }
    return env, source
