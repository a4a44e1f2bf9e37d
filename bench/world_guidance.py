"""Guidance only at high noise (a guidance interval) on the world SD3: CFG at ``scale`` for the
sampler steps whose sigma is at least ``from``, none after; GenEval-mini and its chance level
on held-out prompts (BENCHMARKS.md, section 0).

    python -m bench.world_guidance [--world DIR] [--prompts 240] [--out FILE.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import world_main

# (scale, lowest sigma guided): plain sampling, plain guidance 1.5, and guidance at high noise.
SETTINGS = ((1.0, 0.0), (1.5, 0.0), (2.0, 0.6), (3.0, 0.6), (3.0, 0.8), (5.0, 0.8), (2.0, 0.4))


def sample_guided(gen, cond, seeds: list[int], steps: int, scale: float, lowest: float):
    """Images ``(B, 3, 64, 64)``: Euler steps with CFG at ``scale`` while sigma >= ``lowest``
    and none after (``cond`` with negatives)."""
    import torch

    from rewards.world.scenes import SIZE
    from rlhf import sampler as SM

    x = SM.initial_latents(gen, SM.seeded_generators(seeds), SIZE, SIZE)
    ts, sigmas = SM.schedule(
        gen.pipe.scheduler.config, steps, x.shape[-2:], gen.transformer.config.patch_size
    )
    with torch.no_grad():
        for i in range(steps):
            g = scale if float(sigmas[i]) >= lowest else 1.0
            v = SM.velocity(gen.transformer, x, ts[i], cond, g)
            x = SM.euler_step(x, v, sigmas[i], sigmas[i + 1])
        return gen.decode(x)


def run(world: str | None, prompts: int, steps: int = 10) -> dict:
    from rewards import world as W
    from rewards.world.judge import Judge
    from rlhf.world.sampling import chance_specs, eval_specs, load_world_generator

    root = Path(world) if world else W.ASSETS
    judge = Judge.load(root / "judge")
    gen = load_world_generator(root / "sd3")
    specs = eval_specs(prompts)
    cond = gen.encode_prompts([s.prompt() for s in specs], 2.0, "", 1)  # with negatives
    out = {"suite": "world_guidance", "prompts": prompts, "steps": steps, "settings": []}
    for scale, lowest in SETTINGS:
        images = sample_guided(gen, cond, list(range(prompts)), steps, scale, lowest)
        score = judge.score(specs, images)
        score.pop("per_image")
        chance = judge.score(chance_specs(specs), images)
        out["settings"].append(
            {"scale": scale, "from_sigma": lowest, "geneval_mini": score, "chance": chance["mean"]}
        )
    return out


def main(argv=None) -> int:
    return world_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
