"""RewardServer on a real local Ray: same numbers as in-process, batching, chunking,
restarts that cost no call, bad input answered with an error, checkpoints that load."""

import pickle
import threading
import time

import numpy as np
import psutil
import pytest
import ray
import torch

from actors.reward_client import RewardClient
from rewards.handles import LocalReward, RewardHandle
from rewards.registry import RewardSpec, build_reward, save_reward
from rlhf.resources import ActorResources
from rlhf.run_config import ServerConfig

pytestmark = pytest.mark.integration
TINY = {"backbone": "tiny"}
# Fractions: the servers of this module fit beside other tests' actors on the shared Ray.
SMALL = ActorResources(num_cpus=0.5)


def _batch(n, seed, size=40):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size + 8, generator=g), [f"prompt {seed} {i}" for i in range(n)]


def _local(model, images, prompts, weight=1.0):
    """What a colocated reward computes (the same model in this process): scores and
    d(weight * sum(scores)) / d(images). The computation itself is checked against plain
    autograd in tests/unit/test_scoring.py."""
    return LocalReward(RewardSpec("ict"), model).score_and_grad(images, prompts, weight)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def saved_ict(tmp_path_factory):
    torch.manual_seed(11)
    model = build_reward({"name": "ict", "options": TINY}).eval()
    folder = save_reward(model, tmp_path_factory.mktemp("rewards") / "ict")
    return model, folder


@pytest.fixture(scope="module")
def server(ray_local, saved_ict):
    """One server for the module: a locally saved ICT, small batches so that chunking shows,
    a batching window wide enough for threads started together to share a forward, and two
    forward threads (batches computed side by side)."""
    _, folder = saved_ict
    cfg = ServerConfig(resources=SMALL, max_batch_size=8, batch_wait_ms=200, forward_threads=2)
    client = RewardClient({"name": "ict", "checkpoint": str(folder)}, cfg).start()
    yield client
    client.shutdown()


def test_saved_reward_loads_and_matches_in_process(server, saved_ict):
    model, folder = saved_ict
    x, p = _batch(3, 0)
    _close(server.score(x, p), _local(model, x, p)[0])
    s, g = server.score_and_grad(x, p, weight=2.5)
    s_ref, g_ref = _local(model, x, p, 2.5)
    _close(s, s_ref)
    _close(g, g_ref)
    assert g.dtype == x.dtype and g.shape == x.shape and g.abs().sum() > 0
    info = server.info()
    assert info["name"] == "ict" and info["device"] == "cpu"
    # A reward handle weighted by its spec: the same server (its name ignores the weight),
    # called without a weight, returns the spec-weighted gradient.
    spec = {"name": "ict", "checkpoint": str(folder), "weight": 2.5}
    weighted = RewardClient(spec, server.config)
    assert isinstance(weighted, RewardHandle) and not weighted.in_process
    assert (weighted.name, weighted.key, weighted.weight) == (server.name, "ict", 2.5)
    _close(weighted.score_and_grad(x, p)[1], g_ref)


def test_start_call_sends_now_and_answers_on_waiting(server, saved_ict):
    """How a generator worker calls its servers: every call sent before waiting on any (no
    helper thread), the same answers as the blocking calls, the server's errors on waiting."""
    model, folder = saved_ict
    spec = {"name": "ict", "checkpoint": str(folder), "weight": -1.5}
    client = RewardClient(spec, server.config)
    x, p = _batch(3, 21)
    before = server.info()
    with_grad = client.start_call(x, p, grad=True)
    score_only = client.start_call(x, p, grad=False)
    s, g = with_grad()
    s_only, none = score_only()
    s_ref, g_ref = _local(model, x, p, -1.5)
    _close(s, s_ref)
    _close(g, g_ref)
    _close(s_only, s_ref)
    assert none is None and g.dtype == x.dtype
    assert server.info()["requests"] - before["requests"] == 2
    bad = client.start_call(x * 3, p, grad=True)  # sent without complaint ...
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bad()  # ... the server's error when waited on


def test_start_call_to_a_server_gone_for_good_creates_it_again(ray_local, saved_ict):
    model, folder = saved_ict
    client = RewardClient({"name": "ict", "checkpoint": str(folder)}, ServerConfig(resources=SMALL))
    client.start()
    try:
        old = client.handle
        x, p = _batch(2, 22)
        ray.kill(old, no_restart=True)
        wait = client.start_call(x, p)  # sent to the dead server's handle
        s, g = wait()
        s_ref, g_ref = _local(model, x, p)
        _close(s, s_ref)
        _close(g, g_ref)
        assert client.handle._actor_id != old._actor_id
        _close(client.start_call(x, p)()[0], s_ref)  # and to its successor
    finally:
        client.shutdown()


def test_request_larger_than_max_batch_is_chunked(server, saved_ict):
    model, _ = saved_ict
    x, p = _batch(19, 1)  # 8 + 8 + 3
    before = server.info()
    s, g = server.score_and_grad(x, p, weight=-0.5)
    after = server.info()
    s_ref, g_ref = _local(model, x, p, -0.5)
    _close(s, s_ref)
    _close(g, g_ref)
    assert after["batches"] - before["batches"] == 3
    assert after["requests"] - before["requests"] == 1
    assert after["images"] - before["images"] == 19


def test_concurrent_callers_are_batched_and_get_their_own_answers(server, saved_ict):
    model, _ = saved_ict
    # Different sizes, prompts and weights; 2 + 3 + 1 + 2 = 8 fits one forward.
    jobs = [
        (_batch(n, 10 + i), w) for i, (n, w) in enumerate([(2, 1.0), (3, -2.0), (1, 0.5), (2, 3.0)])
    ]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def call(i):
        (x, p), w = jobs[i]
        barrier.wait()
        results[i] = server.score_and_grad(x, p, w)

    before = server.info()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = server.info()
    for ((x, p), w), res in zip(jobs, results):
        assert res is not None
        s_ref, g_ref = _local(model, x, p, w)
        _close(res[0], s_ref)
        _close(res[1], g_ref)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(jobs)
    assert batches < requests, (batches, requests)


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (np.random.rand(2, 4, 16, 16).astype(np.float32), ["a", "b"], r"shape \(B, 3, H, W\)"),
        (np.random.rand(3, 16, 16).astype(np.float32), ["a", "b", "c"], r"shape \(B, 3, H, W\)"),
        ((np.random.rand(2, 3, 16, 16) * 255).astype(np.uint8), ["a", "b"], "float"),
        (torch.randint(0, 255, (2, 3, 16, 16)), ["a", "b"], "float"),
        (np.full((2, 3, 16, 16), 2.0, np.float32), ["a", "b"], r"values in \[0, 1\]"),
        (np.full((2, 3, 16, 16), np.nan, np.float32), ["a", "b"], "NaN"),
        (np.random.rand(2, 3, 16, 16).astype(np.float32), ["a", "b", "c"], "2 images but 3"),
        (np.random.rand(2, 3, 16, 16).astype(np.float32), "ab", "not a single string"),
        (np.random.rand(2, 3, 16, 16).astype(np.float32), None, "needs prompts"),
        (np.array([["x"]], dtype=object), ["a"], "dtype object"),
    ],
    ids=[
        "4-channels",
        "3-dims",
        "uint8",
        "int-tensor",
        "range",
        "nan",
        "prompt-count",
        "prompt-str",
        "no-prompts",
        "object-array",
    ],
)
def test_bad_request_gets_a_clear_error_and_server_keeps_serving(server, images, prompts, match):
    before = server.info()
    # Straight to the actor (no client-side conversion): the server itself refuses it.
    with pytest.raises(ValueError, match=match):
        ray.get(server.handle.score_and_grad.remote(images, prompts, 1.0))
    # Through the client: the server's ValueError, not a wrapped Ray error.
    with pytest.raises(ValueError, match=match):
        server.score(images, prompts)
    x, p = _batch(2, 3)
    assert server.score_and_grad(x, p)[0].shape == (2,)
    after = server.info()
    assert after["errors"] - before["errors"] == 2
    assert after["pid"] == before["pid"]


def test_client_is_picklable_and_works_inside_a_ray_task(server, saved_ict):
    model, _ = saved_ict
    x, p = _batch(2, 4)

    @ray.remote(num_cpus=0.5)
    def remote_call(client, x, p):
        return client.score_and_grad(x, p, 2.0)

    clone = pickle.loads(pickle.dumps(server))
    assert clone._handle is None and clone.name == server.name
    s, g = ray.get(remote_call.remote(clone, x, p))
    s_ref, g_ref = _local(model, x, p, 2.0)
    _close(s, s_ref)
    _close(g, g_ref)


def _wait_queued(handle, n=1, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ray.get(handle.info.remote())["queued"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the request never reached the server")


def test_mlflow_reward_server_restarts_after_kill_and_calls_in_flight_succeed(
    ray_local, mlflow_store, saved_ict
):
    """A server loading ``models:/name/version`` from the caller's MLflow store; killed with a
    request queued inside it (a long batching window keeps it there) and another sent while it
    restarts: Ray restarts it (reloading from MLflow) and resends both calls, which return the
    right answer."""
    import mlflow

    from rlhf import tracking

    model, folder = saved_ict
    tracking.setup(mlflow_store, experiment="reward-server")
    with mlflow.start_run() as run:
        version = tracking.register_folder(folder, "ict-server-test", run.info.run_id)
    spec = {"name": "ict", "checkpoint": f"models:/ict-server-test/{version}"}
    cfg = ServerConfig(resources=SMALL, max_batch_size=8, batch_wait_ms=1500)
    client = RewardClient(spec, cfg).start()
    try:
        x, p = _batch(3, 6)
        s_ref, g_ref = _local(model, x, p, 2.0)
        first = client.info()
        out = {}
        t = threading.Thread(target=lambda: out.update(r=client.score_and_grad(x, p, 2.0)))
        t.start()
        handle = client.handle
        _wait_queued(handle)
        ray.kill(handle, no_restart=False)
        # A call sent while the server is down or restarting.
        late = threading.Thread(target=lambda: out.update(late=client.score(x, p)))
        late.start()
        t.join(120)
        late.join(120)
        assert "r" in out, "the call in flight did not come back"
        assert "late" in out, "the call sent after the kill did not come back"
        _close(out["r"][0], s_ref)
        _close(out["r"][1], g_ref)
        _close(out["late"], s_ref)
        info = client.info()
        # The same actor (id) in a new process (pid): restarted by Ray, not a new one that
        # took over the name.
        assert info["pid"] != first["pid"]
        assert client.handle._actor_id == handle._actor_id
        # After the restart: a fresh client finds the same server by name.
        again = RewardClient(spec, cfg)
        assert again.name == client.name
        _close(again.score(x, p), s_ref)
        assert again.info()["pid"] == info["pid"]
    finally:
        client.shutdown()


def test_server_gone_for_good_is_created_again(ray_local, saved_ict):
    model, folder = saved_ict
    cfg = ServerConfig(resources=SMALL)
    client = RewardClient({"name": "ict", "checkpoint": str(folder)}, cfg).start()
    try:
        old = client.handle
        first = client.info()
        ray.kill(old, no_restart=True)
        x, p = _batch(2, 7)
        _close(client.score(x, p), _local(model, x, p)[0])
        assert client.handle._actor_id != old._actor_id
        assert client.info()["pid"] != first["pid"]
    finally:
        client.shutdown()


@pytest.mark.parametrize(
    "num_cpus, forward_threads, torch_threads", [(0, 0, 1), (2, 1, 2), (2, 2, 1)]
)
def test_server_threads_follow_its_cpus_and_idle_costs_no_cpu(
    ray_local, num_cpus, forward_threads, torch_threads
):
    """The server's torch threads come from its Ray CPUs split between its forwards, never
    from an OMP_NUM_THREADS inherited from the driver; once it has answered, an idle server
    uses no CPU (no spinning threads or polling loop taking cores from a generator)."""
    cfg = ServerConfig(resources=ActorResources(num_cpus=num_cpus), forward_threads=forward_threads)
    name = f"reward-threads-{num_cpus}-{forward_threads}"
    client = RewardClient({"name": "ict", "options": TINY}, cfg, name=name).start()
    try:
        x, p = _batch(4, 8)
        for _ in range(3):
            client.score_and_grad(x, p)
        info = client.info()
        assert (info["forward_threads"], info["torch_threads"]) == (
            forward_threads or max(1, num_cpus),
            torch_threads,
        )
        proc = psutil.Process(info["pid"])
        time.sleep(0.2)  # the reply is on its way out
        t0, cpu0 = time.monotonic(), sum(proc.cpu_times()[:2])
        time.sleep(2.5)
        share = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        assert share < 0.02, f"idle server used {share:.1%} of a core"
    finally:
        client.shutdown()
