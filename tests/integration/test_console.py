"""The CLI's console rules reach every Ray worker (``worker_process_setup_hook``)."""

import logging
import os

import pytest

from rlhf import console

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_workers_follow_the_cli_console_rules(verbose):
    import ray

    def _worker_console() -> dict:
        return {
            "verbose": os.environ.get(console.VERBOSE_ENV),
            "root": logging.getLogger().level,
            "deepspeed_quiet": console._ERRORS_ONLY in logging.getLogger("DeepSpeed").filters,
            "cuda_quiet": console._ERRORS_ONLY
            in logging.getLogger("torch.utils.cpp_extension").filters,
        }

    if ray.is_initialized():
        pytest.skip("needs its own Ray (the runtime env is per job)")
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env=console.ray_runtime_env(verbose),
    )
    try:
        got = ray.get(ray.remote(_worker_console).remote())
    finally:
        ray.shutdown()
    assert got["verbose"] == ("1" if verbose else "0")
    assert got["root"] == (logging.INFO if verbose else logging.ERROR)
    assert got["deepspeed_quiet"] is (not verbose) and got["cuda_quiet"] is (not verbose)
