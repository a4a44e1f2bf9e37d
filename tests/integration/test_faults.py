"""Fault injection around the driver: SIGKILL it mid-run, corrupt its newest checkpoint, then
``rlhf finetune --resume RUN_ID`` finishes the run with every step logged once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from mlflow import MlflowClient

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _rlhf(*args, env, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def test_sigkill_driver_then_resume_skips_a_corrupt_checkpoint(ray_local, mlflow_store, tmp_path):
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": mlflow_store,
    }
    runs = tmp_path / "runs"
    args = [
        "finetune",
        str(QUICKSTART),
        f"output_dir={runs}",
        "policy.sampler.height=32",
        "policy.sampler.width=32",
        "prompts.synthetic_eval=2",
        "eval_rewards=[]",
        "train.max_steps=5",
        "train.eval_every=100",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=3",
        "mlflow.experiment=faults",
        "mlflow.register_as=null",
    ]
    proc = _rlhf(*args, env=env)
    deadline = time.time() + 300
    while not list(runs.glob("*/checkpoints/step_000002/manifest.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint at step 2 in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_dir,) = runs.iterdir()
    checkpoints = sorted(run_dir.glob("checkpoints/step_*/manifest.json"))
    assert len(checkpoints) >= 2
    newest = checkpoints[-1].parent
    victim = max(
        (p for p in (newest / "resume").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    with open(victim, "r+b") as f:  # a torn write
        f.truncate(victim.stat().st_size // 2)
    (run,) = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("faults").experiment_id]
    )
    run_id = run.info.run_id

    resumed = _rlhf("finetune", "--resume", run_id, env=env)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out
    assert f"skipping checkpoint: {victim}: truncated" in out
    previous = checkpoints[-2].parent.name
    assert f"restored {previous}" in out
    steps = sorted(m.step for m in MlflowClient().get_metric_history(run_id, "train/loss"))
    assert steps == [1, 2, 3, 4, 5]  # no gap, no duplicate
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert "5 steps (max_steps)" in out
