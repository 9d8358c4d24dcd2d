"""Secrets on disk: each in a file only its owner can read (mode 0600), as ssh and libpq keep theirs.
A file others can read is refused, not used: whoever could read it could act as the team's admin."""

from __future__ import annotations

import configparser
import io
import os
import secrets
import stat
from pathlib import Path

from panacea_platform.team_server.errors import SecretFileError


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path`, created with mode 0600 (never briefly readable by others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(0o600)  # an existing file keeps its mode through os.open
    return path


def write_private_ini(path: Path, section: str, values: dict[str, str]) -> Path:
    """An ini file of one section (MLflow's credentials and auth-config format), mode 0600."""
    ini = configparser.ConfigParser()
    ini[section] = values
    text = io.StringIO()
    ini.write(text)
    return write_private(path, text.getvalue())


def others_can_read(path: Path) -> bool:
    return bool(Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def private_file_problem(path: Path, what: str) -> str | None:
    """None when `path` is a file only its owner can read; else the one line that says what to do."""
    path = Path(path).expanduser()
    if not path.is_file():
        return f"{what} {path} does not exist"
    if others_can_read(path):
        mode = stat.S_IMODE(path.stat().st_mode)
        return f"{what} {path} can be read by others (mode {mode:04o}): `chmod 600 {path}`, then start again"
    return None


def read_private(path: Path, what: str) -> str:
    problem = private_file_problem(path, what)
    if problem:
        raise SecretFileError(problem)
    text = Path(path).expanduser().read_text().strip()
    if not text:
        raise SecretFileError(f"{what} {path} is empty: write the secret into it, or delete it to have one generated")
    return text


def secret_from(env_var: str, file: Path | None, default_file: Path, what: str) -> tuple[str, str]:
    """The secret and where it came from: the environment variable, else the file given, else `default_file`,
    which is written with a new secret the first time."""
    if os.environ.get(env_var):
        return os.environ[env_var], f"${env_var}"
    if file is not None:
        return read_private(file, what), str(file)
    if not Path(default_file).exists():
        write_private(default_file, new_secret() + "\n")
    return read_private(default_file, what), str(default_file)
