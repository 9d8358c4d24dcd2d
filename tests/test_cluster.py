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


def test_cluster_setup_installs_this_project_and_passes_the_tracking_uri():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    setup = " ".join(config["setup_commands"])
    assert "scripts/setup.sh" in setup
    assert "MLFLOW_TRACKING_URI" in setup
    assert "." in config["file_mounts"].values()
