"""The paper's fine-tuning table in the miniature world (BENCHMARKS.md, table 2).

From the shipped world SD3, with the same steps, prompts and seeds, DRaFT-K (LoRA, in one
process: :func:`rlhf.world.experiments.finetune_world` on ``configs/world.yaml``) against each
reward: none (the base), the world CLIP score, the pairwise I2>I1 baseline, ICT, HP, ICT-HP
(the trained rewards saved by ``python -m bench.reward_accuracy --save DIR``). Measured on
fixed held-out prompts and seeds: GenEval-mini (mean, per category), JPEG compression ratio,
HP score, CLIP score; the held-out samples of every row side by side in one PNG.

    python -m bench.world_finetune --rewards DIR [--steps N] [--short] [--out FILE.json]
        [--grid FILE.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import emit

WORLD = {"backbone": "world"}


def reward_specs(rewards_dir: Path) -> dict[str, dict]:
    """The table's single rewards as specs: the world CLIP score and the trained pairwise
    baseline, ICT and HP saved in ``rewards_dir`` (``bench.reward_accuracy --save``)."""
    return {
        "clip": {"name": "clip", "options": WORLD},
        **{k: {"name": k, "checkpoint": str(rewards_dir / k)} for k in ("pickscore", "ict", "hp")},
    }


def rows(rewards_dir: Path) -> dict[str, list[dict]]:
    r = reward_specs(rewards_dir)
    return {
        "base": [],
        "+CLIP score": [r["clip"]],
        "+pairwise (PickScore recipe)": [r["pickscore"]],
        "+ICT": [r["ict"]],
        "+HP": [r["hp"]],
        "+ICT-HP": [
            {
                "name": "ict_hp",
                "options": {
                    "ict": {"checkpoint": r["ict"]["checkpoint"]},
                    "hp": {"checkpoint": r["hp"]["checkpoint"]},
                },
            }
        ],
    }


def run(
    rewards_dir: str,
    steps: int,
    short: bool,
    grid_path: str | None,
    only: list[str] | None = None,
    extra: list[str] | None = None,
) -> dict:
    """Every row of :func:`rows` (``only``: those labels, with ``base`` always first) with
    ``extra`` config overrides (``key=value``) on top of the table's settings."""
    from rewards.registry import build_reward
    from rlhf.image_stats import grid, to_uint8
    from rlhf.world.experiments import finetune_world, world_config

    torch.set_num_threads(1)
    rdir = Path(rewards_dir)
    specs = reward_specs(rdir)
    scorers = {k: build_reward(specs[k]) for k in ("hp", "clip")}
    results, pictures = {}, []
    for label, rewards in rows(rdir).items():
        if short and label not in ("base", "+ICT"):
            continue
        if only and label != "base" and label not in only:
            continue
        t = time.perf_counter()
        overrides = [f"train.max_steps={steps}", f"prompts.synthetic_eval={12 if short else 120}"]
        overrides += extra or []
        if rewards:  # the base row trains nothing and keeps world.yaml's rewards unused
            overrides.append(f"rewards={json.dumps(rewards)}")
        out = finetune_world(world_config(*overrides), scorers, train=bool(rewards))
        figures = out["after"] or out["before"]
        results[label] = {**figures, "seconds": time.perf_counter() - t}
        if label == "base":
            results[label]["note"] = "no fine-tuning"
        imgs = out["images"][1] if out["images"][1] is not None else out["images"][0]
        pictures.append(grid(to_uint8(imgs[:16]), cols=8))
        print(f"{label}: GenEval-mini {figures['geneval_mini']['mean']:.3f}", flush=True)
    if grid_path and pictures:
        from PIL import Image

        gap = np.full((6, pictures[0].shape[1], 3), 255, np.uint8)
        stacked = np.concatenate([x for p in pictures for x in (p, gap)][:-1], axis=0)
        Image.fromarray(stacked).save(grid_path)
    return {
        "suite": "world_finetune",
        "short": short,
        "steps": steps,
        "overrides": extra or [],
        "rows": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rewards", required=True, help="folder with pickscore/, ict/, hp/")
    p.add_argument("--steps", type=int, default=60, help="DRaFT-K steps per row (default: 60)")
    p.add_argument("--short", action="store_true", help="two rows, 12 held-out prompts")
    p.add_argument("--grid", default=None, help="write every row's samples here (PNG)")
    p.add_argument(
        "--rows", default=None, help="comma-separated row labels (e.g. +ICT,+HP; base always)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every row (e.g. policy.draft.k=10); repeatable",
    )
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    only = a.rows.split(",") if a.rows else None
    return emit(run(a.rewards, a.steps, a.short, a.grid, only, a.set), a.out)


if __name__ == "__main__":
    sys.exit(main())
