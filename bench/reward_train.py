"""Reward-training step time: a Ray Train job against a plain single-process loop.

Both sides train the same tiny HP/ICT model on the same synthetic triplets with the same
global batch, in one run:

- ``plain``: one process, batch 2B, :func:`rewards.training.run_training` directly;
- ``ray_1w``: a Ray Train job, 1 worker x batch 2B (the pure framework overhead);
- ``ray_2w``: a Ray Train job, 2 workers x batch B over gloo/DDP (what the quickstart runs).

Per-step times exclude start-up (first ``warmup`` steps dropped); the Ray jobs' per-step
times come from the ``train/triplets_per_s`` metric rank 0 logs to MLflow. Start-up (Ray,
workers, process group) is reported separately as wall time.

    python -m bench.reward_train [--short] [--kind hp] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, stats

ROOT = Path(__file__).resolve().parents[1]


def _cfg(kind: str, root: Path, steps: int, batch: int, workers: int, name: str):
    """``configs/reward_<kind>.yaml`` sized for ``steps`` one-epoch steps of ``batch`` per
    worker, no evaluation, no warm-up."""
    from rlhf.config import load_config
    from rlhf.reward_run_config import RewardTrainConfig

    return load_config(
        RewardTrainConfig,
        ROOT / "configs" / f"reward_{kind}.yaml",
        [
            f"name={name}",
            f"data.synthetic_train={steps * batch * workers}",
            "data.synthetic_eval=32",
            f"data.cache_dir={root / 'data'}",
            f"optim.batch_size={batch}",
            "optim.epochs=1",
            "optim.warmup_steps=0",
            f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={2 // workers}",
            f"output_dir={root / 'runs'}",
            "mlflow.experiment=bench",
            f"eval_every={10**6}",
        ],
    )


def plain_step_times(cfg, warmup: int) -> tuple[list[float], float]:
    from rewards.objective import Objective, build_model
    from rewards.training import make_dataset, run_training

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, teacher, ict = build_model(cfg)
    ds = make_dataset(cfg.data, "train")
    stamps = []
    run_training(
        cfg,
        model,
        Objective(cfg, model, teacher, ict),
        ds,
        None,
        on_step=lambda r, _: stamps.append(time.perf_counter()),
    )
    wall = time.perf_counter() - t0
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])], wall


def ray_step_times(cfg, warmup: int) -> tuple[list[float], float]:
    from mlflow import MlflowClient

    from rlhf.train_reward import run_job

    t0 = time.perf_counter()
    summary = run_job(cfg)
    wall = time.perf_counter() - t0
    hist = MlflowClient().get_metric_history(summary["run_id"], "train/triplets_per_s")
    per_step = cfg.optim.batch_size * cfg.scaling.num_workers
    times = [per_step / m.value for m in sorted(hist, key=lambda m: m.step)]
    return times[warmup + 1 :], wall


def run(short: bool = False, kind: str = "hp") -> dict:
    import ray

    from rlhf import tracking

    logging.getLogger().setLevel(logging.ERROR)
    steps, batch, warmup = (12, 16, 2) if short else (40, 32, 3)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        import os

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        tracking.setup(None, "bench")
        # One global batch 2B on every side: 2 workers x B, or 1 x 2B.
        base = _cfg(kind, root, steps, batch, 2, "bench-ray-2w")
        plain_cfg = _cfg(kind, root, steps, 2 * batch, 1, "bench-plain")
        ray1_cfg = _cfg(kind, root, steps, 2 * batch, 1, "bench-ray-1w")
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        try:
            results = {}
            for label, fn, cfg in (
                ("plain", plain_step_times, plain_cfg),
                ("ray_1w", ray_step_times, ray1_cfg),
                ("ray_2w", ray_step_times, base),
            ):
                times, wall = fn(cfg, warmup)
                results[label] = {"step_s": stats(times), "wall_s": wall}
        finally:
            ray.shutdown()
    plain = results["plain"]["step_s"]["median"]
    for label in ("ray_1w", "ray_2w"):
        results[label]["ratio_vs_plain"] = results[label]["step_s"]["median"] / plain
    return {
        "suite": "reward_train",
        "kind": kind,
        "global_batch": 2 * batch,
        "steps": steps,
        "short": short,
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true")
    p.add_argument("--kind", default="hp", choices=["hp", "ict"])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.short, a.kind), a.out)


if __name__ == "__main__":
    sys.exit(main())
