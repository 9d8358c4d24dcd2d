"""ray_cluster.yaml is what `ray up` accepts: Ray's own defaults merged in, then Ray's own schema."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(config)  # raises on any schema violation
    gpu_types = [name for name in config["available_node_types"] if name.startswith("gpu")]
    assert gpu_types and config["head_node_type"] == "head"


def test_cluster_setup_installs_this_project_mounts_shared_storage_and_serves_mlflow():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    setup = " ".join(config["setup_commands"])
    assert "scripts/setup.sh" in setup and "." in config["file_mounts"].values()
    # Every node mounts the shared storage where the paper jobs write.
    assert "mount -t nfs4" in setup and "/mnt/shared" in setup
    paper = yaml.safe_load((REPO / "jobs" / "paper" / "llama2-7b-gsm8k.yaml").read_text())
    assert paper["output_dir"].startswith("/mnt/shared/")
    # The head serves MLflow on PostgreSQL with artifacts on the shared storage; every node logs there.
    head = " ".join(config["head_setup_commands"])
    assert "panacea tracking-server" in head and "--artifacts /mnt/shared/" in head and "--host 0.0.0.0" in head
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in head
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(config["worker_setup_commands"])


def test_the_cluster_runs_with_rays_token_and_mlflow_credentials_from_files_outside_the_repository():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    mounts = config["file_mounts"]
    assert mounts["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["/home/ubuntu/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert all(not source.startswith(".") or source == "." for source in mounts.values()), "a secret in the repo"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in command for command in starts if "ray start" in command)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "export RAY_AUTH_MODE=token" in " ".join(config["setup_commands"])
    assert "--no-auth" not in " ".join(config["head_setup_commands"])
