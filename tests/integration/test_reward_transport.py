"""Reward traffic over Ray's direct tensor transport (``reward_server.transport: gloo``) on a
real local Ray: an actor caller gets the same scores and gradients as over the object store
and in-process, concurrent callers still share forwards, and callers that RDT cannot serve
are told so instead of silently using the object store."""

import threading

import pytest
import ray
import torch

from actors.direct_transport import TransportUnavailable
from actors.reward_client import RewardClient
from rewards.handles import LocalReward
from rewards.registry import RewardSpec, build_reward, save_reward
from rlhf.resources import ActorResources
from rlhf.run_config import ServerConfig

pytestmark = pytest.mark.integration
TINY = {"backbone": "tiny"}
SMALL = ActorResources(num_cpus=0.5)


def _batch(n, seed, size=40):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size + 8, generator=g), [f"prompt {seed} {i}" for i in range(n)]


def _caller_class():
    """Defined in a function so that Ray ships the class by value (workers cannot import this
    test module by name)."""

    class Caller:
        """Stands for a generator worker: an actor that calls the reward client from its own
        thread(s)."""

        def score_and_grad(self, client, x, p, w):
            return client.score_and_grad(x, p, w)

        def score(self, client, x, p):
            return client.score(x, p)

        def concurrent(self, client, jobs):
            out = [None] * len(jobs)
            barrier = threading.Barrier(len(jobs))

            def run(i):
                (x, p), w = jobs[i]
                barrier.wait()
                out[i] = client.score_and_grad(x, p, w)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            return out

        def error(self, client, x, p):
            try:
                client.score_and_grad(x, p, 1.0)
            except Exception as e:
                return type(e), str(e)
            return None

    return Caller


@pytest.fixture(scope="module")
def saved_ict(tmp_path_factory):
    torch.manual_seed(11)
    model = build_reward({"name": "ict", "options": TINY}).eval()
    return model, save_reward(model, tmp_path_factory.mktemp("rewards") / "ict")


@pytest.fixture(scope="module")
def clients(ray_local, saved_ict):
    """The same reward behind an object-store server and a Gloo server."""
    _, folder = saved_ict
    spec = {"name": "ict", "checkpoint": str(folder)}
    out = {}
    for transport in ("object_store", "gloo"):
        cfg = ServerConfig(
            resources=SMALL, max_batch_size=8, batch_wait_ms=200, transport=transport
        )
        out[transport] = RewardClient(spec, cfg).start()
    yield out
    for c in out.values():
        c.shutdown()


@pytest.fixture(scope="module")
def caller(ray_local):
    actor = (
        ray.remote(enable_tensor_transport=True)(_caller_class()).options(num_cpus=0.25).remote()
    )
    yield actor
    ray.kill(actor)


def test_gloo_matches_object_store_and_in_process(clients, caller, saved_ict):
    model, _ = saved_ict
    gloo, store = clients["gloo"], clients["object_store"]
    assert gloo.name != store.name  # one server per transport: different actor classes
    x, p = _batch(3, 0)
    s_g, g_g = ray.get(caller.score_and_grad.remote(gloo, x, p, 2.5))
    s_o, g_o = ray.get(caller.score_and_grad.remote(store, x, p, 2.5))
    s_l, g_l = LocalReward(RewardSpec("ict"), model).score_and_grad(x, p, 2.5)
    # The same primitive on the same inputs with the same thread count: bit for bit.
    assert torch.equal(s_g, s_o) and torch.equal(g_g, g_o)
    # In-process runs with this process's thread count (another reduction order).
    torch.testing.assert_close(s_g, s_l, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_g, g_l, rtol=1e-4, atol=1e-6)
    assert g_g.dtype == x.dtype and g_g.shape == x.shape and g_g.abs().sum() > 0
    # The score path (no gradient, inference mode) against the object store's.
    assert torch.equal(
        ray.get(caller.score.remote(gloo, x, p)), ray.get(caller.score.remote(store, x, p))
    )
    info = gloo.info()
    assert info["transport"] == "gloo" and info["requests"] >= 2
    # A request larger than max_batch_size is chunked as over the object store.
    x, p = _batch(19, 1)
    s_g, g_g = ray.get(caller.score_and_grad.remote(gloo, x, p, -0.5))
    s_o, g_o = ray.get(caller.score_and_grad.remote(store, x, p, -0.5))
    assert torch.equal(s_g, s_o) and torch.equal(g_g, g_o)


def test_gloo_concurrent_callers_are_batched(clients, caller, saved_ict):
    model, _ = saved_ict
    gloo = clients["gloo"]
    jobs = [(_batch(n, 10 + i), w) for i, (n, w) in enumerate([(2, 1.0), (3, -2.0), (1, 0.5)])]
    before = gloo.info()
    results = ray.get(caller.concurrent.remote(gloo, jobs))
    after = gloo.info()
    local = LocalReward(RewardSpec("ict"), model)
    for ((x, p), w), (s, g) in zip(jobs, results):
        s_ref, g_ref = local.score_and_grad(x, p, w)
        torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert after["requests"] - before["requests"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)


def test_gloo_bad_request_raises_the_servers_error(clients, caller):
    x, p = _batch(2, 3)
    kind, msg = ray.get(caller.error.remote(clients["gloo"], x * 3, p))
    assert kind is ValueError and "[0, 1]" in msg
    # The server and the group still work.
    s, _ = ray.get(caller.score_and_grad.remote(clients["gloo"], x, p, 1.0))
    assert s.shape == (2,)


def test_callers_rdt_cannot_serve_are_told(clients):
    """The driver, and an actor created without enable_tensor_transport (as Ray Train
    creates its workers), get an error naming the setting, not the object store."""
    x, p = _batch(2, 4)
    with pytest.raises(TransportUnavailable, match=r"reward_server\.transport=gloo.*driver"):
        clients["gloo"].score_and_grad(x, p)
    plain = ray.remote(_caller_class()).options(num_cpus=0.25).remote()
    try:
        kind, msg = ray.get(plain.error.remote(clients["gloo"], x, p))
        assert kind is TransportUnavailable
        assert "reward_server.transport=gloo" in msg and "enable_tensor_transport" in msg
    finally:
        ray.kill(plain)


@pytest.mark.parametrize("value", ["tcp", "GLOO", None])
def test_transport_setting_is_validated(value):
    with pytest.raises(ValueError, match=r"reward_server\.transport=.* must be one of"):
        ServerConfig(transport=value).validate()
    for ok in ("object_store", "gloo"):
        ServerConfig(transport=ok).validate()
    for gpu in ("nccl", "cuda_ipc"):
        with pytest.raises(ValueError, match=rf"transport={gpu} .*resources\.num_gpus > 0"):
            ServerConfig(transport=gpu).validate()
        ServerConfig(transport=gpu, resources=ActorResources(num_gpus=0.25)).validate()
