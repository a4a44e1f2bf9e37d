import logging
import os

import pytest
import torch

# open_clip logs a warning for every randomly initialised tiny model; keep test output readable.
logging.getLogger().setLevel(logging.ERROR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: two OpenMP threads on two shared cores stall badly under
    load, and the tiny diffusion models gain nothing from them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 40, 48, generator=g)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
