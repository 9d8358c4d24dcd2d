"""A Ray cluster of three nodes on this machine: a head and two worker nodes, each its own
`ray start --block` process with a node-local scratch folder (PANACEA_NODE_SCRATCH, which the node's
workers inherit). The README's command, `panacea finetune` with RAY_ADDRESS, trains on 2 workers
that write the run folder into their node's scratch; every scratch folder is then removed, and the
results, the MLflow record and a reload of the released model must all still be there, because the
driver took the run from Ray Train's storage, not from a worker's disk.

Each node offers one CPU and each worker asks for one, so the two workers run on two different
nodes. Cost: three raylets and one CLI fit, about 90 s on 2 cores. The cluster is this module's own and is
stopped by killing its process groups (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every process of this cluster (nodes, driver): `ray start` turns token authentication on when it
# finds a token in ~/.ray, and a driver without it is refused; this localhost cluster needs none.
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def _ray_start(args: list[str], scratch: Path, log: Path) -> subprocess.Popen:
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CLUSTER_ENV, "PANACEA_NODE_SCRATCH": str(scratch)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", *args], env=env,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def _start_node(args: list[str], scratch: Path, log: Path, address: str, count: int, root: Path,
                attempts: int = 3) -> subprocess.Popen:
    """Starts one node and waits until the cluster has `count` live nodes. `ray start` gives a raylet
    30 s to register (a constant in Ray's node.py); on 2 loaded cores a start can miss that, so a node
    whose process exited before joining is started again."""
    for attempt in range(attempts):
        node = _ray_start(args, scratch, log)
        if _wait_for_nodes(address, count, node):
            return node
        _stop_node(node)
    logs = "\n".join(p.read_text()[-1500:] for p in root.glob("*.log"))
    raise AssertionError(f"the cluster did not reach {count} nodes in {attempts} starts:\n{logs}")


def _stop_node(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def three_nodes():
    root = Path(tempfile.mkdtemp(prefix="prc", dir="/tmp"))  # Ray's socket paths must stay short
    port = _free_port()
    from ray._private.services import get_node_ip_address

    address = f"{get_node_ip_address()}:{port}"  # where Ray binds the head (the machine's address)
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                  f"--temp-dir={root / 'ray'}"], root / "scratch" / "head", root / "head.log",
                                 address, 1, root))
        # One at a time: two raylets registering at once on 2 cores is what timed out in CI.
        for count, name in enumerate(("node1", "node2"), start=2):
            nodes.append(_start_node([f"--address={address}", "--num-cpus=1"], root / "scratch" / name,
                                     root / f"{name}.log", address, count, root))
        yield address, root
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, node: subprocess.Popen, timeout_s: float = 90) -> bool:
    """Whether the cluster reaches `count` live nodes while `node`'s `ray start` process runs."""
    script = ("import ray; ray.init(address=%r, log_to_driver=False); "
              "print(sum(1 for n in ray.nodes() if n['Alive']))" % address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.poll() is None:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                                env={**os.environ, **CLUSTER_ENV})
        last = result.stdout.strip().splitlines()[-1:]
        if last and last[0].isdigit() and int(last[0]) >= count:
            return True
        time.sleep(1)
    return False


def test_a_two_worker_finetune_survives_the_removal_of_every_node_local_folder(
    three_nodes, tiny_llama, placeholder_harmful_file, tmp_path
):
    from mlflow.tracking import MlflowClient

    from panacea_platform.models import load_for_eval
    from panacea_platform.tracking import default_tracking_uri

    address, root = three_nodes
    config = tiny_config(tiny_llama, placeholder_harmful_file, tmp_path / "driver" / "runs", "cluster-run",
                         scaling={"num_workers": 2, "zero_stage": 2, "cpus_per_worker": 1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, **CLUSTER_ENV, "RAY_ADDRESS": address}
    result = subprocess.run([sys.executable, "-m", "panacea_platform.cli", "finetune", "--config", str(job)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    scratch = root / "scratch"
    written = sorted(p.parent.parent.name for p in scratch.glob("*/runs/cluster-run/summary.json"))
    assert len(written) == 1, "rank 0 did not write its run folder into its node's scratch"
    shutil.rmtree(scratch)  # every node-local folder, as a cluster's nodes going away would take them

    run_dir = config.run_dir()
    assert (run_dir / "summary.json").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    client = MlflowClient(default_tracking_uri(config.output_dir))
    (run,) = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["num_workers"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "task_loss")) == [1, 2, 3]
    assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}
    model = load_for_eval(config.model, str(run_dir / "adapter"))
    assert model(input_ids=__import__("torch").tensor([[1, 5, 9]])).logits.shape[-1] > 0
