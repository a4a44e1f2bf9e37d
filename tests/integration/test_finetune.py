"""The distributed DRaFT-K loop on a real local Ray: the coordinator actor, generator workers as
Ray Train workers under DeepSpeed (gloo), reward servers, MLflow, checkpoints; with faults
injected (dead server, dead worker, non-finite rewards). Hooks run inside the coordinator
actor; they leave what they saw in files for the test to read."""

import math
import os
import signal

import pytest
import ray
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from actors.finetune_run import FinetuneRun
from actors.generator_worker import GeneratorWorker
from actors.reward_client import RewardClient
from rewards.handles import LocalReward
from rewards.registry import RewardSpec, build_reward
from rlhf.checkpointing import checkpoint_folders, verify_checkpoint
from rlhf.config import load_config
from rlhf.run_config import RunConfig
from rlhf.run_records import RunStopped
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SMALL = [  # the quickstart config, smaller images and fewer prompts
    "policy.sampler.height=32",
    "policy.sampler.width=32",
    "prompts.synthetic_eval=4",
    "mlflow.experiment=test",
]


def small_cfg(tmp_path, *overrides) -> RunConfig:
    return load_config(
        RunConfig, QUICKSTART, [*SMALL, f"output_dir={tmp_path / 'runs'}", *overrides]
    )


def steps_of(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def test_quickstart_config_end_to_end_with_a_dead_server_and_a_dead_worker(
    ray_local, mlflow_store, tmp_path
):
    cfg = small_cfg(
        tmp_path,
        "train.max_steps=5",
        "train.eval_every=2",
        "checkpoint.every=2",
        "mlflow.register_as=test-policy",
    )
    marks = tmp_path / "killed"
    marks.mkdir()

    def inject(co, step, m):  # in the coordinator actor
        if step == 1 and not (marks / "server").exists():  # Ray restarts it; callers resend
            (marks / "server").write_text(str(co.clients["ict"].info()["pid"]))
            ray.kill(co.clients["ict"].handle, no_restart=False)
        if step == 3 and not (marks / "worker").exists():  # Ray Train restarts the group
            (marks / "worker").write_text(str(co.workers[1]["pid"]))
            os.kill(co.workers[1]["pid"], signal.SIGKILL)

    s = FinetuneRun(cfg, progress=False, on_step=inject).run()
    assert s["steps"] == 5 and s["rebuilds"] == 1 and s["skipped_steps"] == 0
    run = s["run_id"]
    # Every step logged exactly once despite the rebuild (steps 3 was computed twice).
    assert steps_of(run, "train/loss") == [1, 2, 3, 4, 5]
    # Every configured reward is evaluated, the optimised ones and the eval-only one.
    for key in ("eval/reward", "eval/reward/ict", "eval/reward/hp", "eval/reward/clip"):
        assert steps_of(run, key) == [0, 2, 4, 5], key
    for key in ("eval/brightness", "eval/saturation", "eval/edge_density", "eval/jpeg_ratio"):
        assert steps_of(run, key) == [0, 2, 4, 5], key
    for key in ("train/reward/ict", "train/reward/hp", "train/grad_norm", "train/images_per_s"):
        assert steps_of(run, key) == [1, 2, 3, 4, 5], key
    assert s["reward_before"].keys() == s["reward_after"].keys()
    # Policy versions: steps 2, 4, 5 (the rebuilt step 4 is new, so registered once).
    client = MlflowClient()
    versions = client.search_model_versions("name='test-policy'")
    assert sorted(int(v.version) for v in versions) == s["versions"] == [1, 2, 3]
    assert int(client.get_model_version_by_alias("test-policy", "last").version) == 3
    best = client.get_model_version_by_alias("test-policy", "best")
    assert int(best.tags["step"]) == s["best_step"]
    arts = {a.path for a in client.list_artifacts(run, "eval")}
    assert any(p.endswith("samples_step_000000.png") for p in arts)
    # The last checkpoint verifies and holds the diffusers-format LoRA.
    newest = checkpoint_folders(tmp_path / "runs" / s["run_dir"].split("/")[-1])[0]
    assert verify_checkpoint(newest) == 5
    assert (newest / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((tmp_path / "runs").glob("*/samples/*.png"))) == 4
    assert {p.name for p in marks.iterdir()} == {"server", "worker"}
    assert {w["rank"] for w in s["workers"]} == {0, 1}
    assert int((marks / "worker").read_text()) not in {w["pid"] for w in s["workers"]}


def test_server_and_colocated_rewards_give_the_same_gradient(ray_local, tmp_path):
    cfg = small_cfg(tmp_path)
    worker = GeneratorWorker(cfg.to_dict(), 0, 1)  # its scoring path, without a generator
    spec = RewardSpec.from_dict({"name": "ict", "weight": 0.7, "options": {"backbone": "tiny"}})
    torch.manual_seed(cfg.seed)
    local = build_reward(spec).eval().requires_grad_(False)
    server = RewardClient(spec, cfg.reward_server, seed=cfg.seed).start()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    try:
        worker.rewards = [LocalReward(spec, local)]
        a = worker._score(images, prompts)
        worker.rewards = [server]
        b = worker._score(images, prompts)
    finally:
        server.shutdown()
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert a.grad.abs().sum() > 0
    # Swapping the reward swaps what is optimised: another gradient, other components.
    torch.manual_seed(cfg.seed)
    hp = build_reward({"name": "hp", "options": {"backbone": "tiny"}}).eval()
    worker.rewards = [LocalReward(RewardSpec("hp", weight=0.7), hp.requires_grad_(False))]
    c = worker._score(images, prompts)
    assert set(c.components) == {"hp"}
    assert not torch.allclose(c.grad, a.grad)


def test_non_finite_rewards_are_skipped_then_stop_the_run(ray_local, mlflow_store, tmp_path):
    # A swapped-in reward by import path (only it is optimised and logged) that returns NaN on
    # its 2nd and 3rd training calls, then from the 5th on: steps 2-3 are skipped and the run
    # goes on; steps 5, 6, 7 make three in a row and stop it, with a checkpoint.
    reward = (
        "rewards=[{name: 'tests.integration.faulty_rewards:brightness', "
        "options: {nan_calls: [2, 3], nan_after: 4}}]"
    )
    cfg = small_cfg(
        tmp_path,
        reward,
        "eval_rewards=[]",
        "scaling.num_workers=1",
        "train.max_steps=20",
        "train.eval_every=100",
        "checkpoint.every=100",
        "train.max_bad_steps=3",
        "mlflow.register_as=null",
    )
    co = FinetuneRun(cfg, progress=False)
    with pytest.raises(RunStopped, match=r"step 7: 3 steps in a row .*max_bad_steps=3"):
        co.run()
    run = co.run_id
    hist = MlflowClient().get_metric_history(run, "train/skipped")
    assert {m.step: m.value for m in hist} == {1: 0, 2: 1, 3: 1, 4: 0, 5: 1, 6: 1, 7: 1}
    assert MlflowClient().get_run(run).info.status == "FAILED"
    assert steps_of(run, "train/reward/brightness") == [1, 4]  # skipped steps log no reward
    keys = MlflowClient().get_run(run).data.metrics.keys()
    assert not any(
        k.startswith("train/reward/ict") or k.startswith("train/reward/hp") for k in keys
    )
    assert verify_checkpoint(checkpoint_folders(co.run_dir)[0]) == 7


def test_refl_mode_end_to_end(ray_local, mlflow_store, tmp_path):
    # ReFL through the same coordinator, workers (DeepSpeed ZeRO-2), reward server and MLflow.
    from rlhf.draft import draw_refl_step

    cfg = small_cfg(
        tmp_path,
        "policy.draft.mode=refl",
        "policy.draft.refl_steps=[1, 3]",
        "eval_rewards=[]",
        "train.max_steps=3",
        "train.eval_every=3",
        "checkpoint.every=3",
        "mlflow.register_as=null",
    )
    s = FinetuneRun(cfg, progress=False).run()
    assert s["steps"] == 3 and s["skipped_steps"] == 0
    client = MlflowClient()
    hist = {k: client.get_metric_history(s["run_id"], f"train/{k}") for k in ("refl_step", "loss")}
    # Every rank drew the same step (their mean is a whole draw), the one the config seeds.
    d = cfg.policy.draft
    assert {m.step: m.value for m in hist["refl_step"]} == {
        step: draw_refl_step(d, 4, step) for step in (1, 2, 3)
    }
    assert not client.get_metric_history(s["run_id"], "train/k")
    # The tiny rewards stay below refl_target: the loss is refl_scale * (target - reward).
    reward = {m.step: m.value for m in client.get_metric_history(s["run_id"], "train/reward")}
    assert all(r < d.refl_target for r in reward.values())
    for m in hist["loss"]:
        assert m.value == pytest.approx(d.refl_scale * (d.refl_target - reward[m.step]), rel=1e-5)
    assert s["reward_after"] != s["reward_before"]  # the policy moved


def test_refl_against_imagereward_from_a_server_colocated_and_in_eval(
    ray_local, mlflow_store, tmp_path
):
    # The paper's row "ReFL against ImageReward" on the tiny BLIP: one ImageReward (seeded
    # alike, so the same weights) optimised from a reward server and colocated in the workers
    # under two labels, half the weight each, and scored once more as an eval-only reward.
    ir = "name: imagereward, options: {size: tiny}"
    cfg = small_cfg(
        tmp_path,
        "policy.draft.mode=refl",
        "policy.draft.refl_steps=[1, 3]",
        f"rewards=[{{{ir}, label: ir_server, placement: server, weight: 0.5}},"
        f" {{{ir}, label: ir_local, placement: colocated, weight: 0.5}}]",
        f"eval_rewards=[{{{ir}}}]",
        "train.max_steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        "mlflow.register_as=null",
    )
    cfg.check_inputs()  # as `rlhf finetune` does
    assert [s.key for s in cfg.reward_specs()] == ["ir_server", "ir_local"]
    # While the run's server is up: its scores and weighted image gradient are the colocated
    # model's (64 px images: the 32 px BLIP's resize is in the graph).
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "two blue squares"]
    answer = tmp_path / "served.safetensors"

    def ask_server(co, step, m):  # in the coordinator actor
        if step == 1:
            scores, grad = co.clients["ir_server"].score_and_grad(images, prompts, 0.5)
            save_file({"scores": scores, "grad": grad}, str(answer))

    s = FinetuneRun(cfg, progress=False, on_step=ask_server).run()
    served = load_file(str(answer))
    assert s["steps"] == 2 and s["skipped_steps"] == 0
    run, client = s["run_id"], MlflowClient()

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run, key)}

    train = {k: history(f"train/reward/{k}") for k in ("ir_server", "ir_local")}
    for k, h in train.items():
        assert sorted(h) == [1, 2] and all(map(math.isfinite, h.values())), (k, h)
        assert len(set(h.values())) == 2, (k, h)  # not a constant: the images changed
    for step, v in train["ir_server"].items():  # the same images through both placements
        assert v == pytest.approx(train["ir_local"][step], rel=1e-5, abs=1e-6)
    # ReFL descended on the weighted sum: refl_scale * relu(refl_target - reward).
    d, loss = cfg.policy.draft, history("train/loss")
    for step, r in history("train/reward").items():
        assert r == pytest.approx(0.5 * train["ir_server"][step] + 0.5 * train["ir_local"][step])
        assert loss[step] == pytest.approx(d.refl_scale * max(0.0, d.refl_target - r), rel=1e-5)
    # Every placement is evaluated, the eval-only entry under its short name.
    for key in ("eval/reward/ir_server", "eval/reward/ir_local", "eval/reward/imagereward"):
        h = history(key)
        assert sorted(h) == [0, 2] and all(map(math.isfinite, h.values())), (key, h)
    torch.testing.assert_close(
        history("eval/reward/imagereward"), history("eval/reward/ir_local"), rtol=1e-5, atol=1e-6
    )
    assert s["reward_after"] != s["reward_before"]  # the policy moved
    # The server's answer at step 1 against the colocated build (seed, then build, as a worker).
    torch.manual_seed(cfg.seed)
    local = build_reward(cfg.reward_specs()[1]).eval().requires_grad_(False)
    x = images.clone().requires_grad_(True)
    scores = local.score(x, prompts)
    (0.5 * scores.sum()).backward()
    torch.testing.assert_close(served["scores"], scores.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served["grad"], x.grad, rtol=1e-4, atol=1e-7)
    assert x.grad.abs().sum() > 0
