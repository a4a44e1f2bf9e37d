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


# GPU memory per instance type (GiB per GPU) of the generator types the memory model allows.
GPU_GIB = {"p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80}


def test_generator_gpus_fit_the_sd35_config_and_output_dir_is_mounted_everywhere():
    from bench.memory_model import table
    from rlhf.config import load_config
    from rlhf.run_config import RunConfig

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    gen = config["available_node_types"]["gpu_generator"]
    gpu_gib = GPU_GIB[gen["node_config"]["InstanceType"]]
    run = load_config(RunConfig, ROOT / "configs" / "sd35_large_turbo_ict_hp.yaml")
    p = run.policy
    _, rows = table(batches=(run.train.batch_size,), ks=(p.draft.k,), px=p.sampler.height)
    (row,) = [
        r
        for r in rows
        if r["text_encoders"] == p.generator.text_encoders
        and r["checkpointing"] == p.generator.gradient_checkpointing
    ]
    assert row["generator_gib"] < gpu_gib - 1, (row, gpu_gib)
    # output_dir lives on storage that every node mounts before Ray starts.
    (mount_cmd,) = [c for c in config["initialization_commands"] if "mount -t nfs4" in c]
    mount_point = mount_cmd.split()[-1]
    assert Path(run.output_dir).is_relative_to(mount_point), (run.output_dir, mount_point)
    assert any(f"mkdir -p {mount_point}" in c for c in config["initialization_commands"])
