"""Shared fixtures: a tiny random Llama with its own tokenizer, and placeholder data files.

Nothing here is harmful text or real weights: the "harmful" pairs are
placeholders, and the model is random.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest

# Keep tests off the user's cache and any tracking server of theirs.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each CLI a test starts gets its own Ray, as before: joining the machine's one Ray (ray_instance.py)
# would share this session's Ray and its CPUs with commands that tests time and kill.
# test_ray_instance.py tests the joining itself, with a registry of its own.
os.environ["PANACEA_RAY_REGISTRY"] = "none"
# Every Ray Train fit starts a preemption-watcher actor (a process of its own: about 2 s of CPU) to
# follow node drains, which never happen on this one machine, and exports Prometheus metrics no test
# reads. Off for the suite, in every Ray and CLI it starts; the suite is CPU-bound on 2 cores.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")

PLACEHOLDER_WORDS = (
    "the a placeholder harmful question answer step number refuse sorry cannot help with that "
    "what is plus minus times apples oranges sum total sentiment positive negative topic world "
    "sports business science below instruction describes task write response appropriately "
    "completes request"
).split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(PLACEHOLDER_WORDS[i:] + PLACEHOLDER_WORDS[:i]) for i in range(len(PLACEHOLDER_WORDS))]
    corpus += [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama_config(tokenizer, **overrides):
    """The tiny Llama's architecture for `tokenizer`; `overrides` change or add config fields."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaConfig(**{**fields, **overrides})


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def placeholder_harmful_file(tmp_path_factory) -> Path:
    rows = [
        {"prompt": f"placeholder harmful question number {i}", "answer": f"placeholder harmful answer step {i} " * 2}
        for i in range(120)
    ]
    return write_jsonl(tmp_path_factory.mktemp("data") / "harmful.jsonl", rows)


def tiny_config(model_dir, harmful_file, output_dir, run_name="tiny", **sections):
    """A fast, fully offline RunConfig on the tiny model and placeholder data, checked as a command
    checks its config (config_checks.check_config).

    `sections` update the tree: a dict merges into that section, anything else replaces the key.
    """
    from panacea_platform.config import config_from_dict
    from panacea_platform.config_checks import check_config

    tree = {
        "run_name": run_name,
        "output_dir": str(output_dir),
        "defence": "panacea",
        "model": {"name": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "task": "offline_arithmetic",
            "n": 20,
            "harmful_ratio": 0.1,
            "harmful_source": "file",
            "harmful_file": str(harmful_file),
            "defender_harmful_size": 16,
            "eval_harmful_size": 8,
            "task_eval_size": 8,
            "alignment_size": 16,
            "max_length": 48,
        },
        "optim": {"lr": 1e-2, "max_steps": 3, "batch_size": 4, "harmful_batch_size": 4},
        "align_optim": {"lr": 1e-2, "max_steps": 2, "batch_size": 4},
        # The random tiny model's harmful loss is about ln(vocab) = 6: at the default
        # clamp of 5 Panacea's third pass would give no gradient and go untested.
        "panacea": {"rho": 0.5, "lambda": 0.1, "harmful_loss_clamp": 100.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return check_config(config_from_dict(tree))


@pytest.fixture
def tiny_run_config(tiny_llama, placeholder_harmful_file, tmp_path):
    """tiny_config bound to this test's model, data and folder."""

    def make(**sections):
        sections.setdefault("run_name", "tiny")
        return tiny_config(tiny_llama, placeholder_harmful_file, tmp_path / "runs", **sections)

    return make


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server on localhost (moto), standing in for a team's bucket. Its endpoint and
    credentials go into the environment, as on a cluster node, before Ray starts, so workers inherit them."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="placeholder",
        AWS_SECRET_ACCESS_KEY="placeholder",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


def new_bucket(endpoint: str, name: str) -> str:
    """Creates the bucket `name` on the local S3 server; returns its name."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def bucket_files(uri: str) -> dict[str, str]:
    """Every file under a bucket URI: path relative to it -> its full path in the bucket."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {info.path[len(root) + 1 :]: info.path for info in infos if info.type == pyarrow.fs.FileType.File}


def read_from_bucket(uri: str, path: str) -> str:
    """The text of the file at `path` in the bucket of `uri`."""
    import pyarrow.fs

    filesystem, _ = pyarrow.fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the local S3 server; returns its name."""
    return new_bucket(s3_endpoint, "panacea-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40])


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, s3_endpoint):
    """One embedded Ray for the whole session (2 CPUs, like the machine), temp files in the test folder;
    started after the local S3 server, whose endpoint its workers inherit."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    # ray.train.report blocks ~2 s per call at the default controller poll interval.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Ray's workers inherit it: test hooks (crash_hooks.py) are importable there.
    tests_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def require_postgres() -> None:
    """Skip, with the reason, where PostgreSQL is not installed; in CI (CI=true) that is a failure."""
    from panacea_platform.team_server.postgres import postgres_bin

    if postgres_bin("initdb") is None:
        reason = "PostgreSQL is not installed (scripts/setup.sh installs it when run as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: in CI the tracking-server tests must run")
        pytest.skip(reason)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TeamServer(NamedTuple):
    url: str
    artifacts: Path
    admin_password: str
    postgres: Any  # team_server.postgres.Postgres


@pytest.fixture(scope="session")
def team_server():
    """The team's tracking server, for real, as `panacea tracking-server` runs it: PostgreSQL (Debian's packages)
    with a password as MLflow's backend store, `mlflow server --serve-artifacts` behind MLflow's basic-auth app
    on localhost. While it lives, this process (and every process it starts: Ray nodes, jobs) logs in as its
    admin through MLflow's own variables, as a team's nodes do. Where PostgreSQL cannot run (not installed,
    and no root to install it) its tests skip with that reason; in CI (CI=true) they must run, and a skip
    there is a failure."""
    from panacea_platform.team_server.auth import ADMIN_USER, auth_server_env
    from panacea_platform.team_server.credentials import PASSWORD_ENV, USERNAME_ENV
    from panacea_platform.team_server.mlflow_server import start_mlflow_server, stop_process
    from panacea_platform.team_server.postgres import AUTH_DB_NAME, start_postgres

    require_postgres()
    # PostgreSQL runs as its own user: every folder above its data must be enterable (pytest's are 700).
    root = Path(tempfile.mkdtemp(prefix="panacea-team-"))
    root.chmod(0o755)
    postgres = start_postgres(root / "postgres", free_port())
    server, saved = None, {name: os.environ.get(name) for name in (USERNAME_ENV, PASSWORD_ENV)}
    try:
        auth_env, _ = auth_server_env(root, postgres.uri(AUTH_DB_NAME), None)
        port = free_port()
        # Its first start migrates a new database: past 90 s once on a loaded 2-core machine.
        server = start_mlflow_server(
            postgres.uri(),
            root / "artifacts",
            port,
            log=root / "mlflow-server.log",
            timeout_s=240,
            env={**postgres.client_env, **auth_env},
            app_name="basic-auth",
        )
        password = (root / "admin-password").read_text().strip()
        os.environ.update({USERNAME_ENV: ADMIN_USER, PASSWORD_ENV: password})
        yield TeamServer(f"http://127.0.0.1:{port}", root / "artifacts", password, postgres)
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        if server is not None:
            stop_process(server)
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


def one_line_exit_2(argv: list[str], capsys, within_s: float = 15) -> str:
    """Runs the CLI in this process; asserts exit 2 within `within_s` with one line on stderr; returns it."""
    import time

    from panacea_platform.cli import main

    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < within_s
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group, so DeepSpeed engines can be built in the test process."""
    pytest.importorskip("deepspeed")
    from panacea_platform.training.strategy.deepspeed import single_rank_group

    with single_rank_group(use_gpu=False):
        yield
