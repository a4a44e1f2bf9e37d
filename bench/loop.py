"""DRaFT-K step time through the distributed loop against a plain single-process loop.

All sides run the quickstart's tiny policy and tiny ICT + HP rewards with the same global
batch, prompts and seeds, in one run:

- ``plain``: one process, no Ray: the generator, a torch AdamW (``PlainEngine``) and the
  rewards in-process, :func:`rlhf.draft.draft_step` in a loop (what a user would write);
- ``1w_colocated``: the Coordinator with 1 generator worker (DeepSpeed ZeRO-2), rewards in it;
- ``1w_server``: 1 worker, both rewards in RewardServer actors;
- ``2w_colocated``: 2 workers (one gloo group), half the batch each.

Per-step time is the wall time between consecutive steps as the coordinator sees them (the
driver's view: the workers' compute plus every call, transfer and wait), after ``warmup``
steps; start-up is reported apart.

    python -m bench.loop [--short] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, stats

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("1w_colocated", "1w_server", "2w_colocated")


def _cfg(root: Path, side: str, steps: int, batch: int):
    from rlhf.config import load_config
    from rlhf.run_config import RunConfig

    workers = 2 if side.startswith("2w") else 1
    placement = "server" if side.endswith("server") else "colocated"
    return load_config(
        RunConfig,
        ROOT / "configs" / "quickstart.yaml",
        [
            f"output_dir={root / 'runs'}",
            "rewards=["
            f"{{name: ict, placement: {placement}, options: {{backbone: tiny}}}}, "
            f"{{name: hp, placement: {placement}, options: {{backbone: tiny}}}}]",
            "eval_rewards=[]",
            "prompts.synthetic_eval=2",
            f"scaling.num_workers={workers}",
            f"train.batch_size={batch // workers}",
            f"scaling.cpus_per_worker={2 // workers}",
            f"train.max_steps={steps}",
            "train.eval_every=100000",
            "checkpoint.every=100000",
            "mlflow.experiment=bench",
            "mlflow.register_as=null",
        ],
    )


def plain(cfg, warmup: int) -> tuple[list[float], float]:
    from rewards.registry import build_reward
    from rlhf.draft import draft_step
    from rlhf.engine import PlainEngine
    from rlhf.generator import load_generator
    from rlhf.prompts import read_prompts, step_batch

    # The worker's count (GeneratorWorker.setup): a ratio of like against like.
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    t0 = time.perf_counter()
    p = cfg.policy
    torch.manual_seed(p.generator.seed)
    gen = load_generator(p.generator, p.finetune)
    engine = PlainEngine(gen.transformer, p.engine)
    rewards = {}
    for spec in cfg.reward_specs():
        torch.manual_seed(cfg.seed)
        rewards[spec.key] = (spec.weight, build_reward(spec).eval().requires_grad_(False))
    prompts = read_prompts("synthetic", n_synthetic=cfg.prompts.synthetic_train, seed=cfg.seed)
    stamps = []
    for step in range(1, cfg.train.max_steps + 1):
        batch, seeds = step_batch(prompts, step, cfg.global_batch, cfg.seed)
        draft_step(engine, gen, rewards, batch, seeds, p.sampler, p.draft, step)
        stamps.append(time.perf_counter())
    times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return times, time.perf_counter() - t0


def loop(cfg, warmup: int) -> tuple[list[float], float]:
    from actors.finetune_run import FinetuneRun

    steps_file = Path(cfg.output_dir).resolve() / "steps.jsonl"

    def on_step(c, s, m):  # runs in the coordinator actor: the stamps go through a file
        steps_file.parent.mkdir(parents=True, exist_ok=True)
        row = [time.perf_counter(), m.get("time_s", 0.0), m.get("reward_s", 0.0)]
        with open(steps_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    t0 = time.perf_counter()
    FinetuneRun(cfg, progress=False, on_step=on_step, echo=None).run()
    rows = [json.loads(line) for line in steps_file.read_text().splitlines()]
    stamps, parts = [r[0] for r in rows], [(r[1], r[2]) for r in rows]
    times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    worker = statistics.median(p[0] for p in parts[warmup + 1 :])
    reward = statistics.median(p[1] for p in parts[warmup + 1 :])
    print(f"  worker step {worker:.3f}s, of which rewards {reward:.3f}s", flush=True)
    return times, time.perf_counter() - t0


def run(
    short: bool = False, repeats: int = 1, sides: list[str] | None = None, steps: int | None = None
) -> dict:
    import ray

    logging.getLogger().setLevel(logging.ERROR)
    n, batch, warmup = (5, 2, 1) if short else (14, 4, 3)
    steps = steps or n
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        try:
            if not sides:
                sides = ("plain", "1w_colocated") if short else ("plain", *SIDES)
            if "plain" not in sides:
                sides = ("plain", *sides)  # the baseline of every ratio
            for r in range(repeats):
                for side in sides:
                    cfg = _cfg(root / f"{side}-{r}", side, steps, batch)
                    fn = plain if side == "plain" else loop
                    times, wall = fn(cfg, warmup)
                    results.setdefault(side, {"step_s": [], "wall_s": []})
                    results[side]["step_s"] += times
                    results[side]["wall_s"].append(wall)
                    print(
                        f"{side}: median step {statistics.median(times):.3f}s, wall {wall:.1f}s",
                        flush=True,
                    )
        finally:
            ray.shutdown()
    base = statistics.median(results["plain"]["step_s"])
    out = {}
    for side, r in results.items():
        out[side] = {
            "step_s": stats(r["step_s"]),
            "wall_s": stats(r["wall_s"]),
            "ratio_vs_plain": statistics.median(r["step_s"]) / base,
        }
    return {
        "suite": "loop",
        "short": short,
        "global_batch": batch,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "results": out,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--sides", nargs="*", default=None, help=f"plain and any of {SIDES}")
    p.add_argument("--steps", type=int, default=None, help="steps per side (default: 14)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.short, a.repeats, a.sides, a.steps), a.out)


if __name__ == "__main__":
    sys.exit(main())
