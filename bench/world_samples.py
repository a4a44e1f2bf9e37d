"""Samples of the world SD3 on held-out easy prompts, as a grid a person can look at, with the
judge's verdict per image (BENCHMARKS.md, section 0).

    python -m bench.world_samples [--world DIR] [--n 24] [--prompts 240] [--steps 10]
        [--guidance 1.0] [--grid FILE.png] [--out FILE.json]

Writes the first ``--n`` samples as a grid (``--grid``) and a text file beside it with the
prompts in grid order and the judge's verdict; reports GenEval-mini on ``--prompts`` held-out
prompts (``rlhf.world.sampling.eval_specs``, the six categories in turn, seeds 0, 1, ...),
and its chance level: the same images judged against another prompt of their category (the
prompt list rolled by one round of categories), how often an image meets a prompt it was not
drawn for.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import emit
from rlhf.world.build import Recipe


def run(world: str | None, n: int, prompts: int, steps: int, guidance: float, grid_path):
    import torch

    from rewards import world as W
    from rewards.world.judge import Judge
    from rlhf.image_stats import grid, to_uint8
    from rlhf.world.build import Recipe
    from rlhf.world.sampling import chance_specs, eval_specs, sample_world

    torch.set_num_threads(1)
    root = Path(world) if world else W.ASSETS
    judge = Judge.load(root / "judge")
    specs = eval_specs(prompts)
    recipe = Recipe(sample_steps=steps, guidance=guidance)
    t = time.perf_counter()
    images = sample_world(root / "sd3", [s.prompt() for s in specs], recipe)
    seconds = time.perf_counter() - t
    score = judge.score(specs, images)
    verdicts = score.pop("per_image")
    chance = judge.score(chance_specs(specs), images)
    chance.pop("per_image")
    if grid_path:
        from PIL import Image

        Image.fromarray(grid(to_uint8(images[:n]), cols=6)).save(grid_path)
        lines = [
            f"{i}: {s.prompt()}  [{'met' if ok else 'not met'}]"
            for i, (s, ok) in enumerate(zip(specs[:n], verdicts[:n]))
        ]
        Path(grid_path).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return {
        "suite": "world_samples",
        "sample_steps": steps,
        "guidance": guidance,
        "geneval_mini": score,
        "geneval_mini_chance": chance,
        "sampling_seconds": round(seconds, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default=None, help="a built world (default: the shipped one)")
    p.add_argument("--n", type=int, default=24, help="samples in the grid (default: 24)")
    p.add_argument("--prompts", type=int, default=240, help="held-out prompts (default: 240)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps (default: 10)")
    p.add_argument(
        "--guidance",
        type=float,
        default=Recipe().guidance,
        help=f"CFG scale (default: the build recipe's, {Recipe().guidance})",
    )
    p.add_argument("--grid", default=None, help="write the grid here (PNG; prompts in .txt)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.world, a.n, a.prompts, a.steps, a.guidance, a.grid), a.out)


if __name__ == "__main__":
    sys.exit(main())
