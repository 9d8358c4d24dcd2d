"""The guard rails the package promises, run as a contributor's pre-commit runs them (pyproject.toml's settings):
mypy with pydantic's plugin on the package (it ships py.typed), ruff's lint and ruff's format on the whole tree.
A new type error, lint finding or unformatted file fails the suite, with the tool's own report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_the_package_type_checks_with_mypy():
    done = _run("mypy")  # files, plugin and options: [tool.mypy]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Success: no issues found" in done.stdout


def test_the_tree_passes_ruffs_lint():
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_the_tree_is_formatted_by_ruff():
    done = _run("ruff", "format", "--check", ".")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_the_pre_commit_hooks_run_the_same_checks():
    """Contributors' hooks (.pre-commit-config.yaml) run the tools the suite runs, with the pinned versions."""
    import yaml

    hooks = {
        hook["id"]: hook
        for repo in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
        for hook in repo["hooks"]
    }
    assert {hooks["ruff-format"]["entry"], hooks["ruff-lint"]["entry"], hooks["mypy"]["entry"]} == {
        "ruff format",
        "ruff check --fix",
        "mypy",
    }
    assert all(hook["language"] == "system" for hook in hooks.values())
