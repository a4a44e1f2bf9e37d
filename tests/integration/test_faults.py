"""Fault injection around the driver: SIGKILL it mid-run, corrupt its newest checkpoint, then
``rlhf finetune --resume RUN_ID`` finishes the run with every step logged once; Ctrl-C, a
resume whose checkpoints are gone, and a worker dying past the rebuild limit each end with the
run id and the resume command, never a silent retrain."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import ray
from mlflow import MlflowClient

from tests.integration.conftest import ROOT, free_port, start_mlflow_server, stop

pytestmark = pytest.mark.integration
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


# Long enough that a signal sent once step 2's checkpoint exists lands mid-run: a tiny step
# takes ~0.25 s on an idle machine (its checkpoint more), the signal follows the checkpoint
# within 50 ms, and a 4- or 5-step run could still finish first.
STEPS = 10


def _rlhf(*args, env, **kw):
    """The CLI as a terminal starts it: its own session, and SIGINT at its default (a suite
    started in the background by a non-interactive shell inherits SIGINT ignored, and then
    a Ctrl-C could never reach the CLI)."""
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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
        f"train.max_steps={STEPS}",
        "train.eval_every=100",
        "checkpoint.every=1",
        "checkpoint.keep=3",
        "mlflow.experiment=faults",
        "mlflow.register_as=null",
    ]
    proc = _rlhf(*args, env=env)
    _wait_for_checkpoint(proc, runs, 2)
    assert _named_actors()  # the coordinator and the reward server
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60  # the dead driver's actors go with it
    while _named_actors():
        assert time.time() < deadline, _named_actors()
        time.sleep(0.5)
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
    assert steps == list(range(1, STEPS + 1))  # no gap, no duplicate
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert f"{STEPS} steps (max_steps)" in out


def _named_actors() -> list[str]:
    """A run's named actors, of any job: its coordinator and reward servers (Ray's own
    cluster-wide singletons, e.g. Ray Data's ``AutoscalingCoordinator``, are not the run's)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [n for n in names if n.startswith(("coordinator-", "reward-"))]


def _wait_for_checkpoint(proc, runs, step: int, timeout_s: float = 300) -> None:
    """Return once the run's checkpoint of ``step`` has its manifest, polling every 50 ms: a
    Ctrl-C then lands within milliseconds of the checkpoint, while it is still being copied
    into place or its policy registered (the coordinator finishes recording the work done
    before it stops)."""
    deadline = time.time() + timeout_s
    while not list(runs.glob(f"*/checkpoints/step_{step:06d}/manifest.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"no checkpoint at step {step} in time"
        time.sleep(0.05)


def _finetune(runs, *overrides) -> list[str]:
    """A short run of the quickstart config on 32 px images."""
    return [
        "finetune",
        str(QUICKSTART),
        f"output_dir={runs}",
        "policy.sampler.height=32",
        "policy.sampler.width=32",
        "prompts.synthetic_eval=2",
        "scaling.num_workers=1",
        "train.eval_every=100",
        *overrides,
    ]


def test_ctrl_c_then_resume_reports_the_whole_run_and_refuses_once_checkpoints_are_gone(
    ray_local, mlflow_store, tmp_path
):
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": mlflow_store,
    }
    runs, client = tmp_path / "runs", MlflowClient()
    args = _finetune(
        runs,
        f"train.max_steps={STEPS}",
        "checkpoint.every=2",
        "mlflow.experiment=ctrl-c",
        "mlflow.register_as=ctrl-c-policy",
    )
    proc = _rlhf(*args, env=env)
    _wait_for_checkpoint(proc, runs, 2)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches the CLI process
    out, _ = proc.communicate(timeout=120)
    (run,) = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    run_id = run.info.run_id
    resume = f"MLFLOW_TRACKING_URI={shlex.quote(mlflow_store)} rlhf finetune --resume {run_id}"
    assert proc.returncode == 130, out
    assert f"interrupted: run {run_id} marked KILLED; resume with: {resume}" in out
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = _rlhf("finetune", "--resume", run_id, env=env)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out
    summary = out[out.index(f"run {run_id}: {STEPS} steps") :]
    # Before -> after from the step-0 evaluation that the interrupted process logged.
    (step0,) = [m.value for m in client.get_metric_history(run_id, "eval/reward") if m.step == 0]
    assert f"{'eval/reward':<28} {step0:8.4f} -> " in summary, summary
    assert "nan" not in summary
    # Every policy version of the run, those of the interrupted process included.
    versions = sorted(int(v.version) for v in client.search_model_versions("name='ctrl-c-policy'"))
    assert versions[:2] == [1, 2] and versions[-1] >= 3
    assert f"(versions {versions}," in summary
    (run_dir,) = runs.iterdir()
    assert f"checkpoints: {run_dir / 'checkpoints'}" in summary
    assert f"tracking: {mlflow_store}" in summary
    assert f"resume: {resume}" in summary
    # The eval-only reward is scored at evaluation, never in a training step.
    metrics = client.get_run(run_id).data.metrics
    assert "eval/reward/clip" in metrics and "train/reward/ict" in metrics
    assert not [k for k in metrics if k.startswith("train/reward/clip")]

    shutil.rmtree(run_dir / "checkpoints")
    gone = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "finetune", "--resume", run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gone.returncode == 2, gone.stdout + gone.stderr
    assert f"no checkpoint in {run_dir / 'checkpoints'}" in gone.stderr
    assert "Traceback" not in gone.stderr
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, STEPS + 1))  # nothing retrained
    assert client.get_run(run_id).info.status == "FINISHED"


def test_worker_dying_past_the_rebuild_limit_ends_in_one_line_with_the_resume_command(
    ray_local, mlflow_store, tmp_path
):
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": mlflow_store,
    }
    dying = (  # the worker process exits in its first training step
        "rewards=[{name: 'tests.integration.faulty_rewards:brightness', "
        "options: {exit_calls: [1]}}]"
    )
    args = _finetune(
        tmp_path / "runs",
        dying,
        "eval_rewards=[]",
        "scaling.max_failures=0",
        "train.max_steps=3",
        "mlflow.experiment=dying",
        "mlflow.register_as=null",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "-v", *args],
        cwd=ROOT,  # the workers import the test reward from here
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("dying").experiment_id])
    run_id = run.info.run_id
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: run {run_id} failed after step 0: RuntimeError: generator group failed 1 "
        "times (scaling.max_failures=0): generator worker failed:"
    ), last
    assert last.endswith(
        f"; resume with: MLFLOW_TRACKING_URI={shlex.quote(mlflow_store)} "
        f"rlhf finetune --resume {run_id}"
    ), last
    assert "Traceback" in proc.stderr  # -v shows it
    assert client.get_run(run_id).info.status == "FAILED"


def test_mlflow_going_away_mid_run_ends_in_one_line_with_the_resume_command(ray_local, tmp_path):
    server, uri = start_mlflow_server(tmp_path)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # fail in seconds, not after minutes of retries
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    }
    runs = tmp_path / "runs"
    args = _finetune(
        runs,
        "eval_rewards=[]",
        "train.max_steps=50",
        "checkpoint.every=2",
        "mlflow.experiment=gone",
        "mlflow.register_as=null",
    )
    proc = _rlhf(*args, env=env)
    try:
        deadline = time.time() + 300
        while not list(runs.glob("*/checkpoints/step_000002/manifest.json")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint at step 2 in time"
            time.sleep(0.5)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("gone").experiment_id])
        run_id = run.info.run_id
        stop(server, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        stop(server)
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)
    assert proc.returncode == 1, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    failed = re.match(rf"error: run {run_id} failed after step (\d+): MlflowException: ", line)
    assert failed, out
    # Stopped at the next checkpoint (not after 50 unlogged steps), and wrote none that
    # claims steps MLflow does not have.
    step = int(failed[1])
    assert step < 50 and not list(runs.glob(f"*/checkpoints/step_{step:06d}"))
    assert line.endswith(
        f"; resume with: MLFLOW_TRACKING_URI={uri} rlhf finetune --resume {run_id}"
    )
    assert "Traceback" not in out


def test_resume_with_mlflow_unreachable_is_one_line(tmp_path):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # nothing listens
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "finetune", "--resume", "0" * 32],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not "no such run" (exit 2)
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: --resume {'0' * 32}: API request to "), proc.stderr
    assert "Connection refused" in line and "Traceback" not in proc.stderr
