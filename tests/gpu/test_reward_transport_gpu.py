"""Reward traffic over CUDA IPC (``reward_server.transport: cuda_ipc``) on one GPU shared by
caller and server, as the shipped GPU layout places them (reward servers on a fraction of the
generator's GPU): a plain actor and a Ray Train worker get the scores and gradients of the
same reward computed in-process, and a caller without a GPU is told why it cannot use it.

    pytest -m gpu tests/gpu/test_reward_transport_gpu.py -s
"""

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu]
SHARE = 0.25


@pytest.fixture(scope="module")
def ipc_client(ray_gpu, tmp_path_factory):
    from actors.reward_client import RewardClient
    from rewards.registry import build_reward, save_reward
    from rlhf.resources import ActorResources
    from rlhf.run_config import ServerConfig

    torch.manual_seed(11)
    model = build_reward({"name": "ict", "options": {"backbone": "tiny"}}).eval()
    folder = save_reward(model, tmp_path_factory.mktemp("rewards") / "ict")
    cfg = ServerConfig(
        resources=ActorResources(num_cpus=1, num_gpus=SHARE),
        max_batch_size=8,
        transport="cuda_ipc",
    )
    client = RewardClient({"name": "ict", "checkpoint": str(folder)}, cfg).start()
    yield client, str(folder)
    client.shutdown()


def _compare_fn():
    """The comparison, made in a function so that Ray ships it by value (workers cannot
    import this test module by name)."""

    def compare(client, folder: str) -> dict:
        """In the caller's process: the served score and gradient against the same reward
        loaded here, on this process's GPU; at two sizes, the second chunked on the server."""
        from rewards.handles import LocalReward
        from rewards.registry import RewardSpec, load_reward

        g = torch.Generator().manual_seed(0)
        local = LocalReward(RewardSpec("ict"), load_reward(folder).cuda().eval())
        out = {"score": 0.0, "score_only": 0.0, "grad": 0.0, "grad_abs": 0.0}
        for size, n in ((64, 3), (256, 9)):  # 9 > max_batch_size
            x = torch.rand(n, 3, size, size, generator=g).cuda()
            p = [f"a prompt {i}" for i in range(n)]
            s, gr = client.score_and_grad(x, p, 2.5)
            s_l, g_l = local.score_and_grad(x, p, 2.5)
            assert s.is_cuda and gr.is_cuda and gr.shape == x.shape and gr.dtype == x.dtype
            out["score"] = max(out["score"], (s - s_l).abs().max().item())
            out["grad"] = max(out["grad"], (gr - g_l).abs().max().item())
            out["grad_abs"] = max(out["grad_abs"], g_l.abs().max().item())
            s_only = (client.score(x, p) - s_l).abs().max().item()
            out["score_only"] = max(out["score_only"], s_only)
        return out

    return compare


def _check(diff: dict) -> None:
    assert diff["grad_abs"] > 0
    assert diff["score"] < 1e-4 and diff["score_only"] < 1e-4, diff
    assert diff["grad"] < 1e-4 * max(1.0, diff["grad_abs"]), diff


def test_cuda_ipc_from_an_actor_matches_in_process(ray_gpu, ipc_client):
    client, folder = ipc_client
    caller = ray_gpu.remote(num_gpus=SHARE, num_cpus=1)(_compare_fn())
    diff = ray_gpu.get(caller.remote(client, folder))
    print("actor caller:", diff)
    _check(diff)
    assert client.info()["transport"] == "cuda_ipc"


def test_cuda_ipc_from_a_ray_train_worker(ray_gpu, ipc_client, tmp_path):
    """Ray Train creates its workers without enable_tensor_transport, which the two-sided
    transports need; CUDA IPC is one-sided, so a train_func can call it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    client, folder = ipc_client
    compare = _compare_fn()
    out = tmp_path / "diff.json"

    def train_func(config):
        diff = compare(config["client"], config["folder"])
        Path(config["out"]).write_text(json.dumps(diff))

    trainer = TorchTrainer(
        train_func,
        train_loop_config={"client": client, "folder": folder, "out": str(out)},
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": SHARE}
        ),
        torch_config=TorchConfig(backend="nccl"),
        run_config=RunConfig(storage_path=str(tmp_path), name="ipc"),
    )
    trainer.fit()
    diff = json.loads(out.read_text())
    print("Ray Train caller:", diff)
    _check(diff)


def test_cuda_ipc_needs_a_caller_on_the_gpu(ipc_client):
    from actors.direct_transport import TransportUnavailable

    client, _ = ipc_client
    x = torch.rand(2, 3, 64, 64, device="cuda")
    with pytest.raises(TransportUnavailable, match="cuda_ipc.*no GPU assigned by Ray"):
        client.score_and_grad(x, ["a", "b"])  # the driver holds no Ray GPU
