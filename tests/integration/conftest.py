import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the integration tier (shared by every test in the session)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(
            address="local",  # never join another Ray that happens to run on this machine
            num_cpus=4,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            # Test-only rewards (tests/integration/faulty_rewards.py) import in every worker.
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real embedded MLflow store (SQLite + artifact folder) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


# Ports for servers a test starts: outside the kernel's ephemeral range (32768-60999 here),
# from which every ``bind(0)`` and outgoing connection draws, and outside Ray's worker ports
# (10002-19999). A port taken from bind(0) and released was handed to a Ray process's own
# socket before the server came to bind it (the dashboard agent: "address already in use",
# then "No available agent" for every job submission).
_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port that nothing listens on now, on any interface (see _PORTS)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` (SQLite backend, local artifacts under ``folder``) on
    loopback, in its own session; returns the process and its URI once it accepts."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination", str(folder / "server_artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    stop(proc)
    pytest.fail("mlflow server did not start")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal a process started in its own session, and its children."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real ``mlflow server`` for one test; ``MLFLOW_TRACKING_URI`` points at it."""
    proc, uri = start_mlflow_server(tmp_path)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.chdir(tmp_path)
        yield uri
    finally:
        stop(proc)
