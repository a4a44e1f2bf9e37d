"""Reward training as a real 2-worker Ray Train job against real MLflow stores."""

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from rewards.objective import Objective, build_model
from rewards.registry import build_reward
from rewards.training import make_dataset
from rlhf.config import load_config
from rlhf.reward_run_config import RewardTrainConfig
from rlhf.train_reward import run_job
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
TINY = {"backbone": "tiny"}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(tmp_path, kind="ict", name=None, model=None, n_train=128, batch_size=16, **kw):
    """``configs/reward_<kind>.yaml`` at test size; ``kw``: more ``key=value`` overrides."""
    overrides = {
        "name": name or f"{kind}-test",
        "data.synthetic_train": n_train,
        "data.synthetic_eval": 32,
        "data.image_size": 32,
        "data.cache_dir": str(tmp_path / "data"),
        "optim.batch_size": batch_size,
        "optim.epochs": 1,
        "optim.warmup_steps": 0,
        "scaling.num_workers": kw.pop("num_workers", 2),
        "scaling.strategy": kw.pop("strategy", "ddp"),
        "output_dir": str(tmp_path / "runs"),
        "mlflow.experiment": "test",
        "eval_every": kw.pop("eval_every", 2),
        **kw,
    }
    if model is not None:
        overrides["model"] = json.dumps(model)
    return load_config(
        RewardTrainConfig,
        CONFIGS / f"reward_{kind}.yaml",
        [f"{k}={v}" for k, v in overrides.items()],
    )


def _images_and_prompts(cfg):
    ds = make_dataset(cfg.data, "eval")
    item = ds[0]
    return item["images"], [item["easy_prompt"]] * 3


def test_two_worker_job_registers_a_model_the_registry_loads(tmp_path, ray_local, mlflow_store):
    cfg = _cfg(tmp_path, "ict")
    summary = run_job(cfg)
    assert summary["version"] == 1 and summary["steps"] == 128 // (16 * 2)
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.params["optim.lr"] == "0.001"
    assert (
        "eval/mean" in run.data.metrics
        and "eval/I3_gt_I2" in run.data.metrics
        and "train/triplets_per_s" in run.data.metrics
    )
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "train/loss")]
    assert steps == list(range(1, 5))
    reward = build_reward({"name": "ict", "checkpoint": "models:/ict/1"})
    images, prompts = _images_and_prompts(cfg)
    scores = reward(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # MLflow's built-in "latest" resolves to the same version.
    alias = build_reward({"name": "ict", "checkpoint": "models:/ict/latest"})
    torch.testing.assert_close(alias(images, prompts), scores)


def test_resume_finishes_with_same_steps_and_no_duplicate_metrics(
    tmp_path, ray_local, mlflow_store
):
    cfg = _cfg(tmp_path, "hp", name="hp-resume", n_train=192)  # 6 steps
    with pytest.raises(Exception, match="interrupt"):
        run_job(cfg, interrupt_after=4)
    summary = run_job(cfg)
    assert summary["steps"] == 6
    steps = [m.step for m in MlflowClient().get_metric_history(summary["run_id"], "train/loss")]
    assert sorted(steps) == list(range(1, 7)), steps


def test_deepspeed_zero2_strategy_runs(tmp_path, ray_local, mlflow_store):
    cfg = _cfg(tmp_path, "hp", name="hp-ds", strategy="deepspeed", n_train=64)
    summary = run_job(cfg)
    assert summary["steps"] == 2 and summary["version"] >= 1


def test_against_a_real_mlflow_server(tmp_path, ray_local, mlflow_server):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    cfg = _cfg(tmp_path, "hp", name="hp-server", n_train=64)
    summary = run_job(cfg)
    assert MlflowClient().get_run(summary["run_id"]).info.status == "FINISHED"
    reward = build_reward({"name": "hp", "checkpoint": summary["model_uri"]})
    images, prompts = _images_and_prompts(cfg)
    assert reward(images, prompts).shape == (3,)


def _one_update(cfg, batch_size_total, world, tmp_path):
    """Plain gloo process group run of one optimizer step (see _equiv_worker)."""
    import torch.multiprocessing as mp

    out = tmp_path / f"w{world}.pt"
    mp.spawn(
        _equiv_worker,
        args=(world, cfg, batch_size_total // world, str(out), free_port()),
        nprocs=world,
    )
    return torch.load(out, weights_only=True)


def _equiv_worker(rank, world, cfg, batch, out, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from rewards.training import make_train_loader
    from rlhf.train_reward import _ObjectiveModule

    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    objective = Objective(cfg, model)
    module = _ObjectiveModule(objective)
    ddp = DistributedDataParallel(module) if world > 1 else module
    ds = make_dataset(cfg.data, "train")
    loader = make_train_loader(ds, batch, rank, world, cfg.seed)
    loader.sampler.set_epoch(0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = ddp(next(iter(loader)))["loss"]
    loss.backward()
    opt.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["ict", "hp"])
def test_one_worker_2b_equals_two_workers_b(tmp_path, kind):
    no_dropout = (
        {"options": {**TINY, "head": {"dropout": [0, 0, 0, 0]}}}
        if kind == "hp"
        else {"options": TINY}
    )
    cfg = _cfg(tmp_path, kind, model=no_dropout, n_train=64)
    make_dataset(cfg.data, "train")  # generate once, before the processes start
    one = _one_update(cfg, 16, 1, tmp_path)
    two = _one_update(cfg, 16, 2, tmp_path)
    changed = 0
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)
        changed += 1
    assert changed > 0
