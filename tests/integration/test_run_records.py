"""The run's MLflow records: step metrics gathered and sent in batches, every step exactly once."""

from __future__ import annotations

from pathlib import Path

from rlhf import tracking
from rlhf.config import load_config
from rlhf.run_config import RunConfig
from rlhf.run_records import LOG_EVERY_STEPS, RunRecords

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def _records(uri: str, tmp_path: Path) -> RunRecords:
    cfg = load_config(RunConfig, QUICKSTART, [f"output_dir={tmp_path / 'runs'}"])
    lines: list[str] = []
    return RunRecords(cfg, uri, None, lines.append)


def test_step_metrics_are_batched_then_all_logged_once_by_flush_and_end(mlflow_store, tmp_path):
    rec = _records(mlflow_store, tmp_path)
    rec.start(None)
    n = 2 * LOG_EVERY_STEPS + 5
    for step in range(1, n + 1):
        rec.log({"train/loss": 1.0 / step, "train/reward": float(step)}, step)
    assert len(rec._batch) == 2 * 5  # the last 5 steps' two metrics are still gathered
    rec.flush()
    assert tracking.logged_steps(rec.run_id, "train/loss") == list(range(1, n + 1))
    assert tracking.logged_steps(rec.run_id, "train/reward") == list(range(1, n + 1))
    # After a restart the replayed steps are not logged again; the last ones reach MLflow
    # at the run's end without a flush.
    rec.last_logged = rec.high_water
    for step in range(n - 3, n + 4):
        rec.log({"train/loss": 0.5, "train/reward": 0.0}, step)
    rec.end("FINISHED")
    assert tracking.logged_steps(rec.run_id, "train/loss") == list(range(1, n + 4))
    resumed = _records(mlflow_store, tmp_path)
    resumed.run_dir = rec.run_dir
    resumed.start(rec.run_id)
    assert resumed.last_logged == n + 3
