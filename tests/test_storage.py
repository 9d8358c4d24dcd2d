"""Storage named by a URI: a sweep keeps its checkpoints, run folders and Tune's state in a bucket (an
S3-compatible server on localhost, moto, standing in for a team's bucket; pyarrow's S3 filesystem talks
to it as to AWS), and bad storage settings stop before any work with one line. A 2-worker fit's
checkpoints and run folder in a bucket are in test_checkpoint.py: its uninterrupted run keeps them there.

The sweep is of an alignment-stage defence (Vaccine), so it also shows each trial aligning with its
own values: a sweep of its own for that cost 61 s.

Cost: a 2-trial sweep, each trial two fits, run twice (about 60 s on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import bucket_files, one_line_exit_2, read_from_bucket, tiny_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def test_a_sweep_of_an_alignment_defence_keeps_its_state_in_the_bucket_aligns_each_trial_and_resumes(
    ray_session, s3_bucket, tiny_llama, placeholder_harmful_file, tmp_path
):
    """A Vaccine sweep: each trial aligns with its own vaccine.rho, then fine-tunes, every run folder and
    Tune's state in the bucket; the same command again resumes from the bucket and trains nothing."""
    from mlflow.tracking import MlflowClient

    from panacea_platform.algorithms.provenance import read_alignment_provenance
    from panacea_platform.config import save_config
    from panacea_platform.search.sweep import run_sweep

    storage = f"s3://{s3_bucket}/team"
    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        tmp_path / "runs",
        run_name="bucket-sweep",
        tracking={"experiment": "bucket-sweep"},
        scaling={"storage": storage, "zero_stage": 0, "cpus_per_worker": 0.5},
    )
    save_config(config, tmp_path / "job.yaml")
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "parameters": {"vaccine.rho": {"grid": [0.5, 2.0]}},
                "fixed": {"defence": "vaccine"},
                "evaluate": False,
                "max_concurrent_trials": 2,
            }
        )
    )
    outcome = run_sweep(space, tmp_path / "job.yaml", name="in-bucket", out=print, progress_every_s=30)
    assert outcome.status == "FINISHED"

    files = bucket_files(f"{storage}/sweeps/in-bucket")
    state = json.loads(read_from_bucket(storage, files["sweep.json"]))
    assert state["parent_run_id"] == outcome.parent_run_id
    assert any(p.startswith("tune/") for p in files), "Tune's experiment state is not in the bucket"
    trained = {Path(p).parts[1] for p in files if p.startswith("train/") and Path(p).name == "summary.json"}
    assert len(trained) == 4, f"each trial's alignment and released run folder belong in the bucket: {sorted(files)}"
    assert len({name for name in trained if name.endswith("-align")}) == 2

    # The same command again reads the sweep's state from the bucket: it resumes, and trains nothing again.
    lines: list[str] = []
    again = run_sweep(space, tmp_path / "job.yaml", name="in-bucket", out=lines.append, progress_every_s=30)
    assert again.parent_run_id == outcome.parent_run_id and again.status == "FINISHED"
    assert any("resuming" in line for line in lines)
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("bucket-sweep").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    trials = [run for run in runs if "tune_trial_id" in run.data.tags]
    assert len(trials) == 2 and all(run.info.status == "FINISHED" for run in trials)
    # Each trial fine-tuned the adapter its own alignment made, with its own value.
    for run in trials:
        adapter = run.data.params["model.adapter"]
        made = read_alignment_provenance(adapter)
        assert made == {"defence": "vaccine", "settings": {"rho": float(run.data.params["vaccine.rho"])}}, adapter


@pytest.fixture
def job(tiny_run_config, tmp_path):
    config = tiny_run_config(run_name="bad-storage")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


@pytest.mark.parametrize(
    "storage, expected",
    [
        ("xyz://bucket/prefix", "no filesystem for the scheme 'xyz'"),
        ("s3:///prefix", "no bucket named"),
    ],
)
def test_a_storage_uri_of_no_known_form_is_refused_by_the_config(storage, expected, job, capsys):
    config, path = job
    line = one_line_exit_2(["finetune", "--config", str(path), f"scaling.storage={storage}"], capsys, 10)
    assert f"scaling.storage = {storage!r}" in line and expected in line
    assert not Path(config.output_dir).exists()


def test_a_filesystem_this_machine_cannot_load_is_named(job, capsys):
    """hdfs:// needs libhdfs and a JVM, which this machine does not have."""
    config, path = job
    line = one_line_exit_2(["finetune", "--config", str(path), "scaling.storage=hdfs://namenode:8020/team"], capsys, 15)
    assert "scaling.storage = 'hdfs://namenode:8020/team'" in line
    assert "the filesystem for hdfs:// cannot be loaded on this machine" in line
    assert not Path(config.output_dir).exists(), "an MLflow store or run folder was made"


@pytest.mark.parametrize("storage", ["s3://team-bucket/runs", "gs://team-bucket/runs"])
def test_an_unreachable_bucket_stops_before_anything_starts(storage, job, monkeypatch, capsys):
    """s3: an endpoint where nothing listens. gs: no credentials and no Google metadata server here, where
    pyarrow's client keeps looking for credentials (it hung past 40 s when tried by hand)."""
    config, path = job
    # A 2 s deadline instead of the default 10: the same path, 16 s less of the suite.
    monkeypatch.setattr("panacea_platform.storage.PROBE_SECONDS", 2.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    line = one_line_exit_2(["finetune", "--config", str(path), f"scaling.storage={storage}"], capsys, 2.0 + 10)
    assert f"scaling.storage = {storage!r}" in line
    assert "no answer within 2 s" in line or "cannot write there" in line
    assert not Path(config.output_dir).exists(), "an MLflow store or run folder was made"
