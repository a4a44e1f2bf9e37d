"""The ICT-HP training term is a sum over the *global* batch (the reference all-gathers, then
sums): 2 DDP ranks x B triplets must give the gradient of 1 rank x 2B, not half of it."""

import os

import pytest
import torch

from rewards.objective import Objective, build_model
from rewards.training import DataConfig, LabelConfig, LossConfig, make_dataset, make_train_loader
from rlhf.reward_run_config import RewardTrainConfig
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
TINY = {"backbone": "tiny"}


def _grads(rank, world, cfg, batch, out, port):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rlhf.train_reward import _ObjectiveModule

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, _, ict = build_model(cfg)
    module = _ObjectiveModule(Objective(cfg, model, ict_model=ict))
    ddp = DistributedDataParallel(module) if world > 1 else module
    loader = make_train_loader(make_dataset(cfg.data, "train"), batch, rank, world, cfg.seed)
    loader.sampler.set_epoch(0)
    ddp(next(iter(loader)))["loss"].backward()
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save(grads, out)
    dist.destroy_process_group()


def _run(cfg, total, world, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / f"g{world}.pt"
    mp.spawn(_grads, args=(world, cfg, total // world, str(out), free_port()), nprocs=world)
    return torch.load(out, weights_only=True)


def test_icthp_sum_over_the_global_batch(tmp_path):
    cfg = RewardTrainConfig(
        kind="hp",
        model={"options": {**TINY, "head": {"dropout": [0, 0, 0, 0]}}},
        ict_model={"options": TINY},
        data=DataConfig(
            synthetic_train=32, synthetic_eval=8, image_size=32, cache_dir=str(tmp_path / "d")
        ),
        labels=LabelConfig(source="rule"),
        loss=LossConfig(hp_weight=0.0, icthp_weight=1.0),
    ).validate()
    make_dataset(cfg.data, "train")  # once, before the processes start
    one, two = _run(cfg, 16, 1, tmp_path), _run(cfg, 16, 2, tmp_path)
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-7, msg=k)
