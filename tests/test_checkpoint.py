"""Checkpoints and failures of the distributed path: a worker killed mid-run is
restarted by Ray Train from the last checkpoint and the run ends where an
uninterrupted one ends.

Setting: 2 Ray Train workers under DeepSpeed ZeRO-2 (CPU, gloo), the tiny random
Llama, Panacea for 6 steps with a linear schedule after one warm-up step (so a
wrong lr after resuming would show), checkpoints every 2 steps, at most 2 kept.
Rank 1 SIGKILLs its own process after step 5 on the first attempt; Ray restarts
the worker group from the checkpoint at step 4, which also crosses both batch
streams' epoch boundaries (5 fine-tuning batches and 4 harmful batches an epoch).

The uninterrupted run keeps its checkpoints (every 2 steps, the default 2 kept) in a bucket on a local
S3-compatible server (moto, standing in for a team's bucket), the killed run in a local folder;
run again under its name, the uninterrupted run comes back from the bucket without training.

Tolerance: EXACT. fp32, the same ranks and the same reduction order: the resumed
run's per-step losses and norms, eps and final LoRA weights equal the
uninterrupted run's bit for bit (measured: maximum difference 0.0).

Cost: two Ray Train fits plus one restart of the worker group, and one more fit
that finds its run finished, about 85 s on 2 cores; the other tests need no fit.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import bucket_files, new_bucket, read_from_bucket, tiny_config
from crash_hooks import KillOnce

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

WORKERS = 2
ZERO = 2
STEPS = 6
EVERY = 2
KEEP = 2
KILL_AFTER = 5


# LoRA dropout draws from the global generator every step: a resume that did not restore the generators
# would draw other masks and end elsewhere, so the bit-identical comparisons below would fail.
DROPOUT = {"dropout": 0.1}


def _config(tiny_llama, harmful_file, output_dir, run_name, **scaling):
    return tiny_config(
        tiny_llama,
        harmful_file,
        output_dir,
        run_name,
        optim={"max_steps": STEPS, "schedule": "linear", "warmup_steps": 1},
        lora=DROPOUT,
        scaling=scaling,
    )


def _distributed_config(tiny_llama, harmful_file, output_dir, run_name, **scaling):
    """WORKERS workers under ZeRO-ZERO, a checkpoint every EVERY steps: every scaling setting in the config."""
    return _config(
        tiny_llama,
        harmful_file,
        output_dir,
        run_name,
        num_workers=WORKERS,
        zero_stage=ZERO,
        checkpoint_every=EVERY,
        **scaling,
    )


# -- no Ray needed -------------------------------------------------------------


def test_batch_stream_fast_forward_equals_skipping():
    from panacea_platform.data.collate import BatchStream

    features = [{"input_ids": list(range(1, 2 + i % 5)), "labels": list(range(1, 2 + i % 5))} for i in range(10)]
    stream = BatchStream(features, 3, seed=7, pad_token_id=0)  # 4 batches an epoch, the last one short
    reference = list(itertools.islice(iter(stream), 14))
    for start in range(12):
        for got, want in zip(itertools.islice(stream.iter_from(start), 14 - start), reference[start:]):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), start
    with pytest.raises(ValueError, match="start must be >= 0"):
        next(BatchStream(features, 3, 7, 0).iter_from(-1))


def test_train_steps_continues_after_start_step():
    from panacea_platform.algorithms.defences import Defence
    from panacea_platform.training.loop import train_steps

    class Counting(Defence):
        def step(self, weights, batch, extra):
            return {"task_loss": float(batch)}

    seen = []
    history = train_steps(None, Counting(), iter([10, 11, 12]), None, 5, lambda s, m: seen.append(s), start_step=2)
    assert seen == [3, 4, 5] and [h["task_loss"] for h in history] == [10.0, 11.0, 12.0]
    assert train_steps(None, Counting(), iter([]), None, 5, start_step=5) == []  # checkpoint at the last step
    with pytest.raises(ValueError, match="start_step = 6"):
        train_steps(None, Counting(), iter([]), None, 5, start_step=6)


def _fake_checkpoint(directory: Path, config, stage: str = "finetune", **identity) -> Path:
    from panacea_platform.training.checkpointing import CHECKPOINT_FORMAT, STATE_FILE, run_identity

    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_text(
        json.dumps(
            {
                "format": CHECKPOINT_FORMAT,
                "step": 4,
                "stage": stage,
                "has_eps": False,
                "history": [],
                "identity": {**run_identity(config, stage), **identity},
            }
        )
    )
    return directory


@pytest.mark.parametrize(
    "written_with, fragment",
    [
        ({"world_size": 4}, "world_size = 4, but this run has world_size = 2. Set scaling.num_workers"),
        ({"zero_stage": 3}, "zero_stage = 3, but this run has zero_stage = 2. Set scaling.zero_stage"),
        (
            {"precision": "bfloat16/bfloat16"},
            "precision = 'bfloat16/bfloat16', but this run has precision = "
            "'float32/float32'. Set model.dtype / model.compute_dtype",
        ),
        ({"accumulation": 2}, "accumulation = 2, but this run has accumulation = 1. Set optim.grad_accum_steps"),
    ],
)
def test_resuming_a_checkpoint_of_another_run_shape_is_refused_before_ray_starts(
    tiny_llama, placeholder_harmful_file, tmp_path, written_with, fragment
):
    from panacea_platform.training.checkpointing import CheckpointMismatchError, check_resume, read_checkpoint_state
    from panacea_platform.training.launch_ray import run_distributed

    config = tiny_config(
        tiny_llama, placeholder_harmful_file, tmp_path / "runs", "refused", scaling={"num_workers": 2, "zero_stage": 2}
    )
    source = _fake_checkpoint(tmp_path / "other", config, **written_with)
    with pytest.raises(CheckpointMismatchError, match=fragment):
        run_distributed(config, resume_from=source, track=False, storage_path=tmp_path / "ray")
    assert not (tmp_path / "runs").exists()
    same = read_checkpoint_state(_fake_checkpoint(tmp_path / "same", config))
    from panacea_platform.training.checkpointing import run_identity

    check_resume(same, run_identity(config, "finetune"), "finetune")  # the same shape: accepted
    with pytest.raises(CheckpointMismatchError, match="stage 'finetune', not 'align'"):
        check_resume(same, run_identity(config, "align"), "align")
    with pytest.raises(CheckpointMismatchError, match="not a training checkpoint"):
        read_checkpoint_state(tmp_path)


# -- Ray Train: an uninterrupted run and a run whose worker dies -----------------


@dataclass
class Runs:
    plain_config: Any
    plain: Any  # uninterrupted, its storage a bucket
    killed_config: Any
    killed: Any  # rank 1 killed once, its storage a local folder
    bucket_storage: str


@pytest.fixture(scope="module")
def runs(ray_session, s3_endpoint, tiny_llama, placeholder_harmful_file, tmp_path_factory):
    from panacea_platform.training.launch_ray import run_distributed

    root = tmp_path_factory.mktemp("checkpoint-runs")
    quiet = lambda line: None  # noqa: E731
    # A team's bucket holds the uninterrupted run's checkpoints: checkpoints change no number, so it is
    # still the reference, and the same fit shows a 2-worker run in a bucket (test below).
    storage = f"s3://{new_bucket(s3_endpoint, 'panacea-checkpoint-runs')}/team"
    plain_config = _distributed_config(tiny_llama, placeholder_harmful_file, root, "plain")
    plain = run_distributed(plain_config, "finetune", storage_path=storage, train_run_name="plain", out=quiet)
    marker = root / "killed-once"
    config = _distributed_config(tiny_llama, placeholder_harmful_file, root, "killed", keep_checkpoints=KEEP)
    killed = run_distributed(
        config,
        "finetune",
        storage_path=root / "ray-killed",
        out=quiet,
        step_hook=KillOnce(rank=1, after_step=KILL_AFTER, marker=str(marker)),
    )
    assert marker.exists(), "the worker was never killed: the test tested nothing"
    return Runs(plain_config, plain, config, killed, storage)


def _history(result):
    return [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]


def _max_difference(actual: dict, expected: dict) -> float:
    assert actual.keys() == expected.keys()
    return max(float((actual[k] - expected[k]).abs().max()) for k in expected)


def test_killed_run_resumes_and_ends_as_the_uninterrupted_run(runs):
    plain, killed = runs.plain, runs.killed
    assert plain.resumed_from_step is None
    assert killed.resumed_from_step == 4  # the restart started from the checkpoint, not from scratch

    # history.jsonl: every step once, and the same numbers as without the failure.
    history, expected = _history(killed), _history(plain)
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    assert history == expected  # exact: losses, norms, lr
    # The lr after each step follows the schedule across the restart (warm-up, then linear to 0).
    assert [row["lr"] for row in history] == pytest.approx([1e-2 * f for f in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)])

    for name in ("adapter_unperturbed", "adapter"):
        got = load_file(str(killed.run_dir / name / "adapter_model.safetensors"))
        want = load_file(str(plain.run_dir / name / "adapter_model.safetensors"))
        assert _max_difference(got, want) == 0.0, name
    assert _max_difference(load_file(str(killed.perturbation_path)), load_file(str(plain.perturbation_path))) == 0.0
    assert killed.summary == plain.summary


def test_mlflow_run_continues_after_the_restart(runs):
    from mlflow.tracking import MlflowClient

    config, killed = runs.killed_config, runs.killed
    client = MlflowClient(tracking_uri=f"sqlite:///{(Path(config.output_dir) / 'mlflow.db').resolve()}")
    run = client.get_run(killed.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == "4"
    steps = [m.step for m in client.get_metric_history(killed.mlflow_run_id, "task_loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), "a step is missing or logged twice"


def test_at_most_keep_checkpoints_are_kept_and_each_holds_every_rank(runs):
    from panacea_platform.training.checkpointing import EPS_FILE, STATE_FILE

    killed = runs.killed
    # Reported: steps 2 and 4 (first attempt), 6 (after the restart) and the final run folder.
    assert len(killed.kept_checkpoints) == KEEP and killed.kept_checkpoints[-1] == killed.checkpoint_path
    experiment = Path(killed.checkpoint_path).parent
    on_disk = sorted(p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert sorted(Path(p) for p in killed.kept_checkpoints) == on_disk, "older checkpoints were not deleted"
    last = Path(killed.kept_checkpoints[0])  # the last periodic one, beside the final run folder
    state = json.loads((last / STATE_FILE).read_text())
    assert state["step"] == STEPS and state["identity"]["world_size"] == WORKERS
    assert state["identity"]["zero_stage"] == ZERO
    assert [row["step"] for row in state["history"]] == list(range(1, STEPS + 1))
    assert (last / EPS_FILE).is_file()
    # Ray merged the ranks' folders: both ranks' optimizer shards and RNG states are there.
    names = {p.name for p in last.rglob("*") if p.is_file()}
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= names
    assert any("zero_pp_rank_0" in n for n in names) and any("zero_pp_rank_1" in n for n in names)


def test_the_uninterrupted_run_keeps_its_checkpoints_and_run_folder_in_the_bucket_and_comes_back_whole(runs):
    """Its storage is a bucket: its last periodic checkpoint and the final run folder are there. Run again under
    the same name with the local run folder gone, the fit had ended, so the finished run comes back from the
    bucket, whole, and nothing trains again. (Last of the fit's tests: it rewrites the run folder.)"""
    import shutil

    from panacea_platform.training.launch_ray import run_distributed

    config, plain, storage = runs.plain_config, runs.plain, runs.bucket_storage
    files = bucket_files(f"{storage}/plain")
    # scaling.keep_checkpoints (2): the last periodic checkpoint, beside the final run folder.
    (checkpoint,) = [p for p in files if Path(p).name == "panacea_state.json"]
    assert json.loads(read_from_bucket(storage, files[checkpoint]))["step"] == STEPS
    (final,) = {Path(p).parts[0] for p in files if Path(p).name == "summary.json"}
    assert f"{final}/adapter/adapter_model.safetensors" in files and f"{final}/perturbation.safetensors" in files
    assert plain.checkpoint_path == f"{storage.removeprefix('s3://')}/plain/{final}"
    assert json.loads(read_from_bucket(storage, files[f"{final}/summary.json"])) == plain.summary

    shutil.rmtree(config.run_dir())
    again = run_distributed(
        config, "finetune", storage_path=storage, train_run_name="plain", track=False, out=lambda line: None
    )
    assert again.summary == plain.summary and len(again.history) == STEPS
    assert (config.run_dir() / "adapter" / "adapter_model.safetensors").is_file()


# -- one process: checkpoints in the run folder, resumed by running the same config again --------


@pytest.fixture
def crashing_defence(tmp_path):
    from crash_hooks import crashing_panacea
    from panacea_platform.algorithms import DEFENCES

    marker = tmp_path / "crashed-once"
    DEFENCES.register("crashing_panacea", crashing_panacea(KILL_AFTER, marker))
    yield marker
    DEFENCES._entries.pop("crashing_panacea")


def test_a_single_process_run_resumes_from_its_checkpoint_into_the_same_mlflow_run(
    tiny_llama, placeholder_harmful_file, tmp_path, crashing_defence
):
    """Killed after step 5 (checkpoints at 2 and 4), run again: it continues from step 4 and ends exactly
    where an uninterrupted run ends, in one MLflow run that says FINISHED, with every step logged once."""
    from mlflow.tracking import MlflowClient

    from crash_hooks import InjectedCrash
    from panacea_platform.training.loop import run_stage

    quiet = lambda line: None  # noqa: E731
    plain = run_stage(_config(tiny_llama, placeholder_harmful_file, tmp_path / "plain", "run"), "finetune", out=quiet)
    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        tmp_path / "resumed",
        "run",
        defence="crashing_panacea",
        optim={"max_steps": STEPS, "schedule": "linear", "warmup_steps": 1},
        lora=DROPOUT,
        scaling={"checkpoint_every": EVERY, "keep_checkpoints": KEEP},
    )
    with pytest.raises(InjectedCrash):
        run_stage(config, "finetune", out=quiet)
    kept = sorted(p.name for p in (config.run_dir() / "checkpoints").iterdir())
    assert kept == ["step_00000002", "step_00000004"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'resumed' / 'mlflow.db'}")
    (failed,) = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert failed.info.status == "FAILED"

    lines = []
    resumed = run_stage(config, "finetune", out=lines.append)
    assert any("resumed from the checkpoint at step 4/6" in line for line in lines)
    assert resumed.mlflow_run_id == failed.info.run_id
    run = client.get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "task_loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), "a step is missing or logged twice"
    assert _history(resumed) == _history(plain)  # exact: losses, norms, lr
    for name in ("adapter_unperturbed", "adapter"):
        got = load_file(str(resumed.run_dir / name / "adapter_model.safetensors"))
        want = load_file(str(plain.run_dir / name / "adapter_model.safetensors"))
        assert _max_difference(got, want) == 0.0, name
    assert not (config.run_dir() / "checkpoints").exists(), "a finished run keeps no training checkpoints"


def test_a_single_process_checkpoint_of_another_shape_or_other_settings_is_refused(
    tiny_llama, placeholder_harmful_file, tmp_path, crashing_defence
):
    from crash_hooks import InjectedCrash
    from panacea_platform.training.checkpointing import CheckpointMismatchError
    from panacea_platform.training.loop import run_stage

    def config(**optim):
        return tiny_config(
            tiny_llama,
            placeholder_harmful_file,
            tmp_path,
            "run",
            defence="crashing_panacea",
            optim={"max_steps": STEPS, **optim},
            scaling={"checkpoint_every": EVERY},
        )

    with pytest.raises(InjectedCrash):
        run_stage(config(), "finetune", out=lambda line: None, track=False)
    with pytest.raises(CheckpointMismatchError, match="accumulation = 1, but this run has accumulation = 2"):
        run_stage(config(grad_accum_steps=2), "finetune", out=lambda line: None, track=False)
    other_rho = config().model_copy(update={"panacea": config().panacea.model_copy(update={"rho": 0.25})})
    with pytest.raises(CheckpointMismatchError, match=r"other settings \(panacea.rho = 0.5 there, 0.25 here\)"):
        run_stage(other_rho, "finetune", out=lambda line: None, track=False)
    other_refresh = config().model_copy(update={"panacea": config().panacea.model_copy(update={"refresh_every": 2})})
    with pytest.raises(CheckpointMismatchError, match=r"panacea.refresh_every = 1 there, 2 here"):
        run_stage(other_refresh, "finetune", out=lambda line: None, track=False)


@pytest.mark.parametrize(
    "defence, stage, settings",
    [
        ("lisa", "finetune", {"lisa": {"align_steps": 1, "finetune_steps": 2, "warmup_ratio": 0.2}}),
        ("repnoise", "align", {"repnoise": {"alpha": 0.1, "beta": 0.5}}),
        # Refreshes at steps 1 and 4: resumed at step 4, its step 5 reuses the kept H, eps and h(w).
        (
            "panacea",
            "finetune",
            {"panacea": {"rho": 0.5, "lambda": 0.1, "harmful_loss_clamp": 100.0, "refresh_every": 3}},
        ),
    ],
)
def test_a_baseline_resumed_from_its_checkpoint_ends_where_an_uninterrupted_run_ends(
    tiny_llama, placeholder_harmful_file, tmp_path, defence, stage, settings
):
    """Lisa's anchors, RepNoise's per-step noise and an amortised Panacea's kept H and eps are part of the state
    a checkpoint keeps: killed after step 5 and run again from step 4, each ends bit for bit where an
    uninterrupted run ends."""
    from crash_hooks import InjectedCrash, crashing
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.training.loop import run_stage

    quiet = lambda line: None  # noqa: E731
    steps = {"max_steps": STEPS, "schedule": "linear", "warmup_steps": 1}
    sections = {"optim" if stage == "finetune" else "align_optim": steps, **settings}
    plain = run_stage(
        tiny_config(tiny_llama, placeholder_harmful_file, tmp_path / "plain", "run", defence=defence, **sections),
        stage,
        out=quiet,
        track=False,
    )
    DEFENCES.register(f"crashing_{defence}", crashing(DEFENCES.get(defence), KILL_AFTER, tmp_path / "crashed"))
    try:
        config = tiny_config(
            tiny_llama,
            placeholder_harmful_file,
            tmp_path / "resumed",
            "run",
            defence=f"crashing_{defence}",
            scaling={"checkpoint_every": EVERY},
            **sections,
        )
        with pytest.raises(InjectedCrash):
            run_stage(config, stage, out=quiet, track=False)
        lines = []
        resumed = run_stage(config, stage, out=lines.append, track=False)
    finally:
        DEFENCES._entries.pop(f"crashing_{defence}")
    assert any("resumed from the checkpoint at step 4/6" in line for line in lines)
    assert _history(resumed) == _history(plain)
    got = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert _max_difference(got, load_file(str(plain.adapter_dir / "adapter_model.safetensors"))) == 0.0
