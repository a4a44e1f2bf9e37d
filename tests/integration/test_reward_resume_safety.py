"""Reward-training resume under ``scaling.strategy: deepspeed`` reads DeepSpeed's checkpoint
with ``torch.load(weights_only=True)``: a tampered checkpoint cannot run code."""

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from rewards.training import OptimConfig, make_optimizer
from rlhf.reward_run_config import RewardScalingConfig, RewardTrainConfig
from rlhf.train_reward import DS_TAG, deepspeed_engine
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


class _TouchOnUnpickle:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def one_rank(monkeypatch):
    """A real one-rank gloo group, torn down after the test."""
    import torch.distributed as dist

    port = free_port()
    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _engine(resume_from=None):
    torch.manual_seed(0)
    cfg = RewardTrainConfig(
        optim=OptimConfig(lr=1e-2, batch_size=2), scaling=RewardScalingConfig(strategy="deepspeed")
    )
    module = nn.Linear(4, 1)
    opt, sched = make_optimizer(cfg.optim, module.parameters(), 10)
    return deepspeed_engine(cfg, module, opt, sched, resume_from)


def _step(engine):
    loss = engine(torch.ones(2, 4)).sum()
    engine.backward(loss)
    engine.step()


def test_deepspeed_resume_restores_state_and_refuses_pickled_code(tmp_path, one_rank):
    engine, _, _ = _engine()
    _step(engine)
    folder = tmp_path / "deepspeed"
    engine.save_checkpoint(str(folder), tag=DS_TAG)
    want = [p.detach().clone() for p in engine.module.parameters()]

    resumed, _, sched = _engine(resume_from=folder)  # a genuine checkpoint loads safely
    for p, w in zip(resumed.module.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), w)
    assert resumed.global_steps == 1 and sched.last_epoch == 1

    marker = tmp_path / "MARKER"
    (states,) = (folder / DS_TAG).glob("*model_states.pt")
    doc = torch.load(states, weights_only=False)
    doc["extra"] = _TouchOnUnpickle(marker)
    torch.save(doc, states)
    with pytest.raises(pickle.UnpicklingError):
        _engine(resume_from=folder)
    assert not marker.exists(), "unpickling the checkpoint ran code"
