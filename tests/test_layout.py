"""The repo's layout: platform/ is a source root, never a package shadowing the standard library."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_platform_from_repo_root_is_the_standard_library():
    code = "import platform, sysconfig; print(platform.__file__); print(platform.system())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    location, system = out.splitlines()
    assert Path(location).parent == Path(__import__("sysconfig").get_paths()["stdlib"])
    assert system  # a real platform.system(), not an attribute error


def test_platform_folder_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_top_level_layout():
    for name in (
        "platform",
        "jobs",
        "search_spaces",
        "evaluation",
        "tests",
        "pyproject.toml",
        "ray_cluster.yaml",
        "README.md",
        ".ci/run",
    ):
        assert (REPO / name).exists(), name


def test_cli_help_is_fast_and_lists_subcommands():
    # --help must not import torch, ray or transformers.
    code = (
        "import sys; from panacea_platform.cli import build_parser; build_parser().format_help();"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'peft', 'deepspeed', 'mlflow') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run(
        [sys.executable, "-m", "panacea_platform.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("align", "finetune", "demo", "config", "list", "bench"):
        assert command in help_text
