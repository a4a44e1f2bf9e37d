"""What the GPU tier's modules share: a local Ray with one GPU, whose workers import the
project from this checkout (and the packages carried onto the GPU machine, via PYTHONPATH)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",
        num_gpus=1,
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()
