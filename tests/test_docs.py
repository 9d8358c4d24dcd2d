"""The documentation holds: every relative link leads to a file that exists, and every command the
README shows runs (its `--help` at least, and `config validate` of every job file)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
        REPO / "evaluation" / "README.md",
        REPO / "search_spaces" / "README.md",
        *(REPO / "platform").rglob("*.md"),
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code holds no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_that_exists(page):
    broken = [
        target
        for target in _relative_links(page)
        if target.split("#")[0] and not (page.parent / target.split("#")[0]).exists()
    ]
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[here](exists.md) [gone](missing.md#part) [web](https://example.org) `[x](in-code.md)`\n"
        "```\n[y](in-block.md)\n```\n"
    )
    (tmp_path / "exists.md").write_text("")
    links = _relative_links(page)
    assert [t for t in links if not (tmp_path / t.split("#")[0]).exists()] == ["missing.md#part"]


def _readme_subcommands() -> list[list[str]]:
    """Each `panacea SUB [SUB2]` the README names, as the argv of its --help."""
    text = (REPO / "README.md").read_text()
    found = []
    for match in re.finditer(r"panacea ((?:[a-z][a-z-]*)(?: (?:step|eval|sweep|memory|show|fields|validate))?)", text):
        argv = match.group(1).split()
        if argv not in found:
            found.append(argv)
    return found


def test_the_readme_names_the_commands_it_documents():
    names = {" ".join(argv) for argv in _readme_subcommands()}
    assert {"demo", "align", "finetune", "evaluate", "sweep", "config show", "bench step", "tracking-server"} <= names


@pytest.mark.parametrize("argv", _readme_subcommands(), ids=" ".join)
def test_every_readme_command_answers_help(argv):
    result = subprocess.run(
        [sys.executable, "-m", "panacea_platform.cli", *argv, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: " in result.stdout


def test_the_readmes_first_commands_are_what_ci_runs():
    first = (REPO / "README.md").read_text().split("```")[1]
    assert "bash scripts/setup.sh && .venv/bin/panacea demo" in first
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in first
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in (REPO / ".ci" / "run").read_text()


def test_every_job_file_passes_config_validate():
    result = subprocess.run(
        [sys.executable, "-m", "panacea_platform.cli", "config", "validate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("ok: ") == len(list((REPO / "jobs").rglob("*.yaml")))
