"""Team members on the team server, through MLflow's own auth client: `panacea team add-member` creates a
user with a generated password, writes it to a credentials file for that person (mode 0600) and grants
READ, EDIT or MANAGE on an experiment; `panacea team grant` changes a grant. Run as the admin (or a
user who manages the experiment), with credentials set as for any command."""

from __future__ import annotations

from pathlib import Path

from panacea_platform.team_server.auth import GRANTABLE
from panacea_platform.team_server.credentials import PASSWORD_ENV, USERNAME_ENV
from panacea_platform.team_server.errors import TrackingServerError
from panacea_platform.team_server.secret_files import new_secret, write_private_ini


def _auth_client(tracking_uri: str):
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=tracking_uri)


def add_member(
    tracking_uri: str, username: str, credentials_out: Path, experiment: str | None = None, permission: str = "READ"
) -> Path:
    """Create `username` with a new password, grant `permission` on `experiment` if given, and write the
    member's credentials file (MLflow's format: it goes to ~/.mlflow/credentials on their machines)."""
    from mlflow.exceptions import MlflowException

    credentials_out = Path(credentials_out)
    if credentials_out.exists():
        raise TrackingServerError(
            f"--credentials-out {credentials_out} exists: choose another path (nothing was changed on the server)"
        )
    if experiment is not None:
        _experiment_id(tracking_uri, experiment)  # an unknown experiment stops before the user is created
    password = new_secret()
    try:
        _auth_client(tracking_uri).create_user(username, password)
    except MlflowException as exc:
        raise TrackingServerError(f"could not add {username!r}: {exc.message}") from None
    write_private_ini(credentials_out, "mlflow", {USERNAME_ENV.lower(): username, PASSWORD_ENV.lower(): password})
    if experiment is not None:
        grant(tracking_uri, username, experiment, permission)
    return credentials_out


def grant(tracking_uri: str, username: str, experiment: str, permission: str) -> None:
    from mlflow.exceptions import MlflowException

    if permission not in GRANTABLE:
        raise TrackingServerError(f"--permission {permission!r}: expected one of {', '.join(GRANTABLE)}")
    auth, experiment_id = _auth_client(tracking_uri), _experiment_id(tracking_uri, experiment)
    try:
        try:
            auth.grant_user_permission(username, "experiment", experiment_id, permission)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # MLflow's client has no update for a user's grant: a new grant replaces the old.
            auth.revoke_user_permission(username, "experiment", experiment_id)
            auth.grant_user_permission(username, "experiment", experiment_id, permission)
    except MlflowException as exc:
        raise TrackingServerError(
            f"could not grant {permission} on {experiment!r} to {username!r}: {exc.message}"
        ) from None


def _experiment_id(tracking_uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(name)
    if found is None:
        raise TrackingServerError(
            f"--experiment {name!r}: no such experiment on {tracking_uri} (names are case-sensitive)"
        )
    return found.experiment_id
