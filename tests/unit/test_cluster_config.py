from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "ray_cluster.yaml").read_text()
    assert text.startswith("#")
    config = prepare_config(yaml.safe_load(text))
    validate_config(config)  # raises on a schema violation
    gpu_types = [
        n for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0
    ]
    assert gpu_types, "the cluster needs GPU worker types"
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any("pip install" in c for c in config["setup_commands"])
