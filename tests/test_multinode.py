"""A Ray cluster of three nodes on this machine, as a team runs one: a head and two worker nodes, each
its own `ray start --block` process with a node-local scratch folder (PANACEA_NODE_SCRATCH, which the
node's workers inherit), every node's MLFLOW_TRACKING_URI pointing at the team's tracking server
(PostgreSQL + `mlflow server`), and one storage folder all nodes see (the shared mount's stand-in).

Against it, the cluster commands of docs/cluster.md:
- `ray job submit --working-dir .` of `panacea finetune`, with a user's DeepSpeed JSON: 2 workers on 2
  nodes; every scratch folder is removed after the run, and the run folder (its DeepSpeed config holds
  the user's option), the MLflow record (each step logged once, by rank 0), every artifact read back
  through the server alone (their bytes in the server's artifact destination) and a reload of the
  released model (downloaded through the server by run id) are all still there;
- `panacea sweep` with RAY_ADDRESS: two concurrent trials whose workers need a node each;
- `panacea finetune` with RAY_ADDRESS while one worker node is killed mid-fit: Ray Train restarts the
  workers on the nodes left, from the last checkpoint in the storage, and the run ends with the same
  weights as the submitted job's uninterrupted run of the same settings.

Each node offers one CPU and each worker asks for one, so a fit's two workers run on two different
nodes. Cost: three raylets, the servers, two fits and a two-trial sweep, about 4 minutes on 2 cores.
The cluster is this module's own and is stopped by killing its process groups (never `ray stop`,
which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port, tiny_config
from panacea_platform.team_server.mlflow_server import stop_process

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 24, 4  # long enough that a node can be killed between the first checkpoint and the end
USER_BUCKET = 100_000  # the user's DeepSpeed JSON's reduce_bucket_size, kept over the platform's own

# Every process of this cluster (nodes, drivers), as ray_cluster.yaml sets them: Ray's token
# authentication on, the token read from a file outside the repository (mode 0600, written by the
# cluster fixture: RAY_AUTH_TOKEN_PATH); the MLflow credentials come from the team_server fixture.
# The project's commands are on each node's PATH, as the cluster's set-up installs them.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
}


def _ray_start(args: list[str], scratch: Path, log: Path, tracking_uri: str) -> subprocess.Popen:
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CLUSTER_ENV, "PANACEA_NODE_SCRATCH": str(scratch), "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("RAY_ADDRESS", None)
    # Each node's dashboard agent on a port of its own: at Ray's fixed default (52365) only one of the
    # nodes, or the session's Ray, gets it, and the head's job agent is missing ("No available agent").
    args = [*args, f"--dashboard-agent-listen-port={free_port()}"]
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--block", *args],
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _start_node(args: list[str], name: str, cluster: dict, count: int, attempts: int = 3) -> subprocess.Popen:
    """Starts one node and waits until the cluster has `count` live nodes. `ray start` gives a raylet
    30 s to register (a constant in Ray's node.py); on 2 loaded cores a start can miss that, so a node
    whose process exited before joining is started again."""
    root = cluster["root"]
    for _ in range(attempts):
        node = _ray_start(args, root / "scratch" / name, root / f"{name}.log", cluster["tracking_uri"])
        if _wait_for_nodes(cluster["address"], count, node):
            return node
        stop_process(node, grace_s=3)
    logs = "\n".join(p.read_text()[-1500:] for p in root.glob("*.log"))
    raise AssertionError(f"the cluster did not reach {count} nodes in {attempts} starts:\n{logs}")


def _wait_for_nodes(address: str, count: int, node: subprocess.Popen, timeout_s: float = 90) -> bool:
    """Whether the cluster reaches `count` live nodes while `node`'s `ray start` process runs."""
    script = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.poll() is None:
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **CLUSTER_ENV},
        )
        last = result.stdout.strip().splitlines()[-1:]
        if last and last[0].isdigit() and int(last[0]) >= count:
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def cluster(team_server):
    """The three nodes; yields {address, dashboard, root, tracking_uri, storage, nodes: {name: Popen}}."""
    root = Path(tempfile.mkdtemp(prefix="prc", dir="/tmp"))  # Ray's socket paths must stay short
    port, dashboard_port = free_port(), free_port()
    from ray._private.services import get_node_ip_address

    from panacea_platform.team_server.secret_files import write_private

    CLUSTER_ENV["RAY_AUTH_TOKEN_PATH"] = str(write_private(root / "ray-auth-token", secrets.token_hex(32)))
    cluster = {
        "address": f"{get_node_ip_address()}:{port}",  # where Ray binds the head (the machine's address)
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "root": root,
        "tracking_uri": team_server[0],
        "storage": root / "shared",
        "nodes": {},
    }
    try:
        cluster["nodes"]["head"] = _start_node(
            [
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--temp-dir={root / 'ray'}",
            ],
            "head",
            cluster,
            1,
        )
        # One at a time: two raylets registering at once on 2 cores is what timed out in CI.
        for count, name in enumerate(("node1", "node2"), start=2):
            cluster["nodes"][name] = _start_node(
                [f"--address={cluster['address']}", "--num-cpus=1"], name, cluster, count
            )
        yield cluster
    finally:
        # A node that outlives SIGTERM by 3 s is killed: nothing on it is kept (the teardown took 21 s).
        for node in reversed(list(cluster["nodes"].values())):
            stop_process(node, grace_s=3)
        shutil.rmtree(root, ignore_errors=True)


def _job(cluster: dict, folder: Path, run_name: str, model: Path, harmful: Path) -> tuple:
    """A 2-worker ZeRO-2 fine-tune job file with checkpoints in the cluster's shared storage, and a
    user's DeepSpeed JSON of one option of its own (USER_BUCKET)."""
    user_json = folder / "ds_zero2.json"
    user_json.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": USER_BUCKET}}))
    config = tiny_config(
        model,
        harmful,
        folder / "runs",
        run_name,
        tracking={"experiment": "cluster"},
        optim={"max_steps": STEPS, "log_every": 1},
        scaling={
            "num_workers": 2,
            "zero_stage": 2,
            "cpus_per_worker": 1,
            "deepspeed_json": str(user_json),
            "checkpoint_every": CHECKPOINT_EVERY,
            "storage": str(cluster["storage"]),
        },
    )
    path = folder / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


def _driver_env(cluster: dict) -> dict[str, str]:
    return {
        **os.environ,
        **CLUSTER_ENV,
        "RAY_ADDRESS": cluster["address"],
        "MLFLOW_TRACKING_URI": cluster["tracking_uri"],
    }


def _the_run(cluster: dict, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster["tracking_uri"])
    (run,) = client.search_runs(
        [client.get_experiment_by_name("cluster").experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
    )
    return client, run


@pytest.fixture(scope="module")
def submitted(cluster, tiny_llama, placeholder_harmful_file, tmp_path_factory):
    """docs/cluster.md's `ray job submit --working-dir .` of `panacea finetune`, run to completion."""
    folder = tmp_path_factory.mktemp("submitted")
    config, job = _job(cluster, folder, "submitted", tiny_llama, placeholder_harmful_file)
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--working-dir",
        ".",
        "--",
        "panacea",
        "finetune",
        "--config",
        str(job),
    ]
    deadline = time.monotonic() + 90
    while True:
        result = subprocess.run(
            command, cwd=REPO, env={**os.environ, **CLUSTER_ENV}, capture_output=True, text=True, timeout=600
        )
        # The head's job agent registers some seconds after the node joins; until then a submission is refused.
        if "No available agent to submit job" not in result.stderr or time.monotonic() > deadline:
            return config, result
        time.sleep(3)


def test_the_dashboard_takes_job_requests_only_with_the_cluster_token(cluster):
    """Ray's dashboard accepts job submissions, that is, runs code: without the token, or with a wrong one, it
    refuses; `ray job` without the token is refused by it too."""
    url = f"{cluster['dashboard']}/api/jobs/"
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
        assert refused.value.code in (401, 403), headers
    token = Path(CLUSTER_ENV["RAY_AUTH_TOKEN_PATH"]).read_text()
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}), timeout=30
    ) as answer:
        assert answer.status == 200
    without_token = {**os.environ, **CLUSTER_ENV, "RAY_AUTH_MODE": "disabled"}
    listing = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "list", "--address", cluster["dashboard"]],
        env=without_token,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode != 0, listing.stdout


def test_a_submitted_job_survives_the_removal_of_every_node_local_folder(
    cluster, submitted, team_server, tmp_path, monkeypatch
):
    from panacea_platform.evaluation.evaluate import released_model_of_run
    from panacea_platform.models import load_for_eval

    config, result = submitted
    assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    # What `ray job logs` shows: the stage's bar, drawn by the driver from rank 0's Ray tqdm, with its rate.
    assert re.search(rf"\[finetune \w+\].*{STEPS}(\.0+)?/{STEPS}(\.0+)? .*step/s", result.stdout), result.stdout[-3000:]

    scratch = cluster["root"] / "scratch"
    written = sorted(p.parent.parent.name for p in scratch.glob("*/runs/submitted/summary.json"))
    assert len(written) == 1, "rank 0 did not write its run folder into its node's scratch"
    shutil.rmtree(scratch)  # every node-local folder, as a cluster's nodes going away would take them
    scratch.mkdir()

    run_dir = config.run_dir()
    assert (run_dir / "summary.json").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["output_dir"] == config.output_dir
    recorded = json.loads((run_dir / "distributed.json").read_text())
    assert recorded["num_workers"] == 2
    assert recorded["deepspeed_config"]["zero_optimization"]["reduce_bucket_size"] == USER_BUCKET
    client, run = _the_run(cluster, "submitted")
    assert run.info.status == "FINISHED" and run.data.tags["num_workers"] == "2"
    assert run.data.tags["zero_stage"] == "2" and run.data.params["scaling.num_workers"] == "2"
    # Once per step: rank 0 alone logs.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "task_loss")) == list(range(1, STEPS + 1))
    assert run.data.params["panacea.rho"] == str(config.panacea.rho) and run.data.params["stage"] == "finetune"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["released_heldout_harmful_loss"] == pytest.approx(summary["released_heldout_harmful_loss"])

    # Read back through the team's server alone, from an empty folder: the record, every artifact, the bytes.
    monkeypatch.chdir(tmp_path)
    assert client.get_experiment_by_name("cluster").artifact_location.startswith("mlflow-artifacts:"), (
        "artifacts must go through the server"
    )
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "adapter",
        "adapter_unperturbed",
        "perturbation.safetensors",
        "history.jsonl",
        "summary.json",
        "training_curves.png",
        "config.yaml",
    } <= names
    assert (
        json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
        == summary
    )
    adapter, model = released_model_of_run(cluster["tracking_uri"], run.info.run_id, tmp_path / "download")
    assert (adapter / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    # The bytes live in the server's artifact destination, not in a folder of the run's output.
    assert list(team_server[1].rglob("adapter_model.safetensors"))
    assert not (Path(config.output_dir) / "mlartifacts").exists()
    released = load_for_eval(config.model.model_copy(update=model), str(adapter))
    assert released(input_ids=__import__("torch").tensor([[1, 5, 9]])).logits.shape[-1] > 0


def test_a_sweep_runs_two_trials_at_once_on_the_cluster(cluster, tiny_llama, placeholder_harmful_file, tmp_path):
    """Each trial's worker needs a node's whole CPU: the two trials run at once on two nodes, and both
    log every step through the server."""
    from mlflow.tracking import MlflowClient

    config = tiny_config(
        tiny_llama,
        placeholder_harmful_file,
        tmp_path / "runs",
        "cluster-sweep",
        optim={"max_steps": 4, "log_every": 1},
        tracking={"experiment": "cluster-sweep"},
        scaling={"storage": str(cluster["storage"]), "zero_stage": 0, "cpus_per_worker": 0.9},
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict()))
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "parameters": {"panacea.rho": {"grid": [0.1, 0.2]}},
                "evaluate": False,
                "max_concurrent_trials": 2,
                "eval_every": 1,
            }
        )
    )
    command = [
        sys.executable,
        "-m",
        "panacea_platform.cli",
        "sweep",
        "--space",
        str(space),
        "--config",
        str(job),
        "--name",
        "on-cluster",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=_driver_env(cluster), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (cluster["storage"] / "sweeps" / "on-cluster" / "sweep.json").is_file()
    shutil.rmtree(cluster["root"] / "scratch")  # the trials' ranks 0 wrote their run folders there
    (cluster["root"] / "scratch").mkdir()
    released = list(
        (tmp_path / "runs" / "sweeps" / "on-cluster" / "trials").glob("*/adapter/adapter_model.safetensors")
    )
    assert len(released) == 2, "each trial's run folder belongs with the sweep, not on a node"

    client = MlflowClient(cluster["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("cluster-sweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    trials = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "tune_trial_id" in r.data.tags
    ]
    assert parent.info.status == "FINISHED" and len(trials) == 2
    starts, ends = sorted(r.info.start_time for r in trials), sorted(r.info.end_time for r in trials)
    assert starts[1] < ends[0], "the two trials did not run at the same time"
    for run in trials:
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "task_loss")) == [1, 2, 3, 4]


def _train_workers_by_node() -> dict[int, list[int]]:
    """Ray Train worker pids by node: by the process group of their parent, the node's raylet, which is
    that of the node's `ray start` (the workers lead process groups of their own)."""
    by_node: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                by_node.setdefault(os.getpgid(parent), []).append(int(proc.name))
        except (OSError, ProcessLookupError, ValueError, IndexError):
            continue
    return by_node


def _kill_node(node: subprocess.Popen, workers: list[int]) -> None:
    """What a node's loss does to its processes: the raylet, its helpers and its workers die at once."""
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(node.pid, signal.SIGKILL)


def test_a_worker_node_killed_mid_fit_resumes_from_storage_to_the_same_weights(
    cluster, submitted, tiny_llama, placeholder_harmful_file, tmp_path
):
    from safetensors.torch import load_file

    reference, _ = submitted
    config, job = _job(cluster, tmp_path, "node-killed", tiny_llama, placeholder_harmful_file)
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "panacea_platform.cli", "finetune", "--config", str(job)],
        cwd=tmp_path,
        env=_driver_env(cluster),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        # The second checkpoint in storage: by then Ray Train has registered the first one.
        while len(list(cluster["storage"].glob("node-killed-finetune-*/checkpoint_*/panacea_state.json"))) < 2:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = _train_workers_by_node()
        victims = [name for name, node in cluster["nodes"].items() if name != "head" and node.pid in workers]
        assert victims, f"no worker node runs a Ray Train worker: {workers}"
        _kill_node(cluster["nodes"][victims[0]], workers[cluster["nodes"][victims[0]].pid])
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()

    client, run = _the_run(cluster, "node-killed")
    assert run.info.status == "FINISHED"
    resumed = int(run.data.tags["resumed_from_step"])
    assert resumed % CHECKPOINT_EVERY == 0 and 0 < resumed < STEPS
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "task_loss")}
    assert steps == set(range(1, STEPS + 1))
    for name in ("adapter/adapter_model.safetensors", "perturbation.safetensors"):
        ours, theirs = load_file(config.run_dir() / name), load_file(reference.run_dir() / name)
        for key, tensor in theirs.items():
            assert (ours[key] - tensor).abs().max().item() <= 1e-6, (name, key)
