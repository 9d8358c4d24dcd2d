"""The credentials a `panacea` command logs in to the team server with, read where MLflow reads them:
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, else ~/.mlflow/credentials. A credentials file
others can read is refused, as ssh refuses such a key."""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from pathlib import Path

from panacea_platform.team_server.secret_files import private_file_problem

USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
HOW = (
    f"export {USERNAME_ENV} and {PASSWORD_ENV}, or write them to ~/.mlflow/credentials (mode 0600; "
    "`panacea team add-member` writes one)"
)


def credentials_file() -> Path:
    from mlflow.utils.credentials import _get_credentials_path  # MLflow's own answer: it follows $HOME

    return Path(_get_credentials_path())


def credentials() -> tuple[str | None, str | None, str]:
    """(username, password, where they came from), as MLflow resolves them: each variable over the file."""
    from mlflow.utils.credentials import read_mlflow_creds

    found = read_mlflow_creds()
    from_env = os.environ.get(USERNAME_ENV) or os.environ.get(PASSWORD_ENV)
    return found.username, found.password, (f"${USERNAME_ENV}/${PASSWORD_ENV}" if from_env else str(credentials_file()))


def credentials_problem() -> str | None:
    """None when no credentials are set, or they are complete and private; else what to do."""
    if not (os.environ.get(USERNAME_ENV) and os.environ.get(PASSWORD_ENV)) and credentials_file().exists():
        problem = private_file_problem(credentials_file(), "the MLflow credentials file")
        if problem:
            return problem
    username, password, source = credentials()
    if bool(username) != bool(password):
        return f"{source} gives a {'user' if username else 'password'} without a {'password' if username else 'user'}"
    return None


def login_problem(uri: str, timeout_s: float) -> str | None:
    """None when the server at `uri` lets these credentials (or none, on a server without auth) list
    experiments; else one line telling wrong credentials from missing ones."""
    problem = credentials_problem()
    if problem:
        return problem
    username, password, source = credentials()
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    if username:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            return None  # authenticated; anything else is for MLflow's client to report
        if username:
            return f"the server at {uri} refused user {username!r}: wrong credentials (from {source})"
        return f"the server at {uri} asks for credentials and none are set: {HOW}"
    except OSError:
        return None  # /health answered a moment ago: a hiccup here is MLflow's client's to retry
