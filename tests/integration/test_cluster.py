"""The cluster paths: a real ``ray start --head`` on loopback with ``ray job submit`` (token
authentication on), and a 2-node cluster simulated with ``ray.cluster_utils.Cluster``."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, free_port

pytestmark = pytest.mark.integration
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BIN = Path(sys.executable).parent
TINY_RUN = [
    "policy.sampler.height=32",
    "policy.sampler.width=32",
    "prompts.synthetic_eval=2",
    "eval_rewards=[]",
    "train.max_steps=2",
    "train.eval_every=100",
    "checkpoint.every=100",
    "mlflow.experiment=cluster",
]


def test_ray_job_submit_to_a_real_head_with_token_auth(tmp_path):
    # The dashboard agent's HTTP port too: its default (52365) is taken by any other Ray on
    # the machine (a local ray.init), and then no job can be submitted ("No available agent").
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={agent}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, head.stdout.read()
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # up, and asking for the token (401)
                break
            except OSError:
                assert time.time() < deadline, "the head's dashboard did not come up"
                time.sleep(1)
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "run.yaml").write_text(QUICKSTART.read_text())
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}}
        agent_deadline = time.time() + 90  # the job agent comes up a little after the dashboard
        while True:
            submit = subprocess.run(
                [
                    str(BIN / "ray"), "job", "submit", "--address", address,
                    "--working-dir", str(job_dir), "--runtime-env-json", json.dumps(runtime_env),
                    "--", sys.executable, "-m", "rlhf.cli", "finetune", "run.yaml",
                    *TINY_RUN, "scaling.num_workers=1", f"output_dir={tmp_path}/runs",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
            )  # fmt: skip
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            assert time.time() < agent_deadline, "the head's job agent did not come up"
            time.sleep(2)
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out
        assert "succeeded" in out
        assert "2 steps (max_steps)" in out
        (run_dir,) = (tmp_path / "runs").iterdir()
        assert list(run_dir.glob("checkpoints/step_000002/manifest.json"))
        # The summary says where the run is and how to continue it.
        assert f"checkpoints: {run_dir / 'checkpoints'}" in out
        assert f"tracking: sqlite:///{tmp_path}/mlflow.db" in out
        assert f"resume: MLFLOW_TRACKING_URI=sqlite:///{tmp_path}/mlflow.db rlhf finetune" in out
        # A relative output_dir would land in the job's temporary copy of --working-dir.
        relative = subprocess.run(
            [
                str(BIN / "ray"), "job", "submit", "--address", address,
                "--working-dir", str(job_dir), "--runtime-env-json", json.dumps(runtime_env),
                "--", sys.executable, "-m", "rlhf.cli", "finetune", "run.yaml",
                *TINY_RUN, "output_dir=runs",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )  # fmt: skip
        out = relative.stdout + relative.stderr
        assert relative.returncode != 0, out
        assert "output_dir='runs' is relative, and this is Ray job raysubmit_" in out
        assert "Traceback" not in out
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_two_node_cluster_places_one_worker_per_node(tmp_path):
    script = textwrap.dedent(
        f"""
        import json
        import ray
        from ray.cluster_utils import Cluster
        from actors.finetune_run import FinetuneRun
        from rlhf.run_config import RunConfig
        from rlhf.config import load_config

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = load_config(RunConfig, {str(QUICKSTART)!r}, {TINY_RUN!r} + [
            "output_dir={tmp_path}/runs", "scaling.num_workers=2",
            "scaling.cpus_per_worker=1", "mlflow.register_as=null",
        ])
        summary = FinetuneRun(cfg, progress=False).run()
        nodes = {{w["node_id"] for w in summary["workers"]}}
        print("RESULT", json.dumps({{"steps": summary["steps"], "nodes": len(nodes),
                                     "cluster_nodes": len(ray.nodes())}}))
        ray.shutdown()
        cluster.shutdown()
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=400
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line.split(" ", 1)[1])
    assert result == {"steps": 2, "nodes": 2, "cluster_nodes": 2}
