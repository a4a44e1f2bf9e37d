"""ActorResources and ScalingConfig validation and the actor options they turn into (no Ray
needed)."""

import re

import pytest

from actors.options import actor_options
from rlhf.resources import ActorResources, ScalingConfig


def test_defaults_give_ray_options():
    assert actor_options(ActorResources()) == {
        "num_cpus": 1,
        "num_gpus": 0,
        "max_restarts": -1,
        "max_task_retries": 0,
    }


def test_full_options_with_name_and_extra_keys():
    res = ActorResources(
        num_cpus=2,
        num_gpus=0.25,
        max_restarts=3,
        max_task_retries=-1,
        max_concurrency=8,
        resources={"accelerator_type:H100": 0.01},
    )
    opts = actor_options(res, "reward-ict", get_if_exists=True, namespace="rlhf")
    assert opts == {
        "num_cpus": 2,
        "num_gpus": 0.25,
        "max_restarts": 3,
        "max_task_retries": -1,
        "max_concurrency": 8,
        "resources": {"accelerator_type:H100": 0.01},
        "name": "reward-ict",
        "get_if_exists": True,
        "namespace": "rlhf",
    }
    # A copy: changing the options does not change the config.
    opts["resources"]["x"] = 1
    assert res.resources == {"accelerator_type:H100": 0.01}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_cpus": -1}, "resources.num_cpus"),
        ({"num_cpus": "2"}, "resources.num_cpus"),
        ({"num_cpus": True}, "resources.num_cpus"),
        ({"num_gpus": 1.5}, "resources.num_gpus"),
        ({"max_restarts": -2}, "resources.max_restarts"),
        ({"max_restarts": 1.0}, "resources.max_restarts"),
        ({"max_task_retries": "3"}, "resources.max_task_retries"),
        ({"max_concurrency": 0}, "resources.max_concurrency"),
        ({"resources": ["GPU"]}, "resources.resources"),
        ({"resources": {"CPU": 1}}, "resources.resources.CPU"),
        ({"resources": {"GPU": 1}}, "resources.resources.GPU"),
        ({"resources": {"": 1}}, "resources.resources"),
        ({"resources": {"custom": -0.5}}, "resources.resources.custom"),
        ({"resources": {"custom": 2.5}}, "resources.resources.custom"),
    ],
)
def test_invalid_values_name_the_key(kwargs, key):
    pattern = "^" + re.escape(key) + r"\b"
    with pytest.raises(ValueError, match=pattern):
        ActorResources(**kwargs).validate()
    with pytest.raises(ValueError, match=pattern):
        actor_options(ActorResources(**kwargs))


def test_validation_uses_the_config_path():
    with pytest.raises(ValueError, match=r"reward_server\.resources\.num_gpus=-1"):
        ActorResources(num_gpus=-1).validate("reward_server.resources")


def test_fractional_and_whole_shares_are_accepted():
    for v in (0, 0.5, 1, 2, 4.0):
        ActorResources(num_cpus=v, num_gpus=v, resources={"r": v}).validate()


def test_extra_options_cannot_override_resources():
    with pytest.raises(ValueError, match=r"num_gpus.*ActorResources"):
        actor_options(ActorResources(), num_gpus=1)


def test_server_config_validation_names_the_key():
    from rlhf.run_config import ServerConfig

    ServerConfig().validate()
    for kwargs, key in [
        ({"max_batch_size": 0}, "reward_server.max_batch_size"),
        ({"batch_wait_ms": -1}, "reward_server.batch_wait_ms"),
        ({"timeout_s": 0}, "reward_server.timeout_s"),
        ({"forward_threads": -1}, "reward_server.forward_threads"),
        ({"resources": ActorResources(num_cpus=-1)}, "reward_server.resources.num_cpus"),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            ServerConfig(**kwargs).validate()


def test_scaling_config_becomes_a_worker_actor_and_ray_train_resources():
    cpu = ScalingConfig(num_workers=2, cpus_per_worker=2, resources_per_worker={"node:a": 0.1})
    cpu.validate()
    assert cpu.ray_resources() == {"CPU": 2, "node:a": 0.1}
    assert actor_options(cpu.actor_resources()) == {
        "num_cpus": 2,
        "num_gpus": 0,
        "max_restarts": 0,  # max_failures restarts the group, not Ray the actor
        "max_task_retries": 0,
        "resources": {"node:a": 0.1},
    }
    gpu = ScalingConfig(use_gpu=True)
    assert gpu.gpus == 1 and gpu.ray_resources() == {"CPU": 1, "GPU": 1}
    assert ScalingConfig(use_gpu=True, gpus_per_worker=0.5).actor_resources().num_gpus == 0.5


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_workers": 0}, "scaling.num_workers"),
        ({"cpus_per_worker": -1}, "scaling.cpus_per_worker"),
        ({"cpus_per_worker": 1.5}, "scaling.cpus_per_worker"),
        ({"gpus_per_worker": 1}, "scaling.gpus_per_worker"),  # without use_gpu
        ({"max_failures": -2}, "scaling.max_failures"),
        ({"resources_per_worker": {"GPU": 1}}, "scaling.resources_per_worker.GPU"),
        ({"resources_per_worker": {"x": -1}}, "scaling.resources_per_worker.x"),
    ],
)
def test_scaling_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match="^" + re.escape(key) + r"\b"):
        ScalingConfig(**kwargs).validate()
