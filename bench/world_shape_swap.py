"""Does the world SD3 use the shape word when it denoises? Renders of single-object colour
prompts ("a red square") are noised to t and denoised in one step (``x_t - t v``), once under
their own caption and once under the same caption with another shape ("a red circle"); the
judge's top detection in each decoded prediction is compared with the render's shape and the
caption's. The same with another colour ("a blue square") shows what a word the SD3 does
read looks like (BENCHMARKS.md section 0).

    python -m bench.world_shape_swap [--world DIR] [--prompts 240] [--out FILE.json]

``--world`` is a built world or an SD3 diffusers folder (a pilot's ``--save``). Per word
(``shape``, ``colour``) and t: ``own``: the top detection's shape (colour) is the render's
under the render's own caption; ``swapped_follows_render`` and ``swapped_follows_caption``:
under the swapped caption, the share drawn as the render's and as the caption's. A generator
that reads the word moves toward the caption where the noise still hides the answer (high t);
one that ignores it keeps the render's, or neither.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import world_main

TIMES = (0.3, 0.5, 0.7, 0.9)


def _swap(spec, word: str, rng):
    """``spec`` with another shape (``word == "shape"``) or colour, drawn from ``rng``."""
    from dataclasses import replace

    from rewards.world.scenes import COLOURS, SHAPES

    if word == "shape":
        return replace(spec, shapes=[str(rng.choice([s for s in SHAPES if s != spec.shapes[0]]))])
    others = [c for c in COLOURS if c != spec.colours[0]]
    return replace(spec, colours=[str(rng.choice(others))])


def _value(spec, word: str) -> str:
    return spec.shapes[0] if word == "shape" else spec.colours[0]


def _top(pipe, judge, x0, word: str) -> list[str | None]:
    """The judge's top detection's shape (or colour) in the decode of each latent of ``x0``."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        x = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample
    dets = judge.detect(((x + 1) / 2).clamp(0, 1))
    return [(d[0].shape if word == "shape" else d[0].colour) if d else None for d in dets]


def run(world: str | None, prompts: int) -> dict:
    import numpy as np
    import torch

    from bench.world_diagnose import velocity
    from rewards import world as W
    from rewards.world import scenes as S
    from rewards.world.judge import Judge
    from rlhf.world import sd3
    from rlhf.world.sampling import load_world_generator

    torch.set_num_threads(1)
    root = Path(world) if world else W.ASSETS
    folder = root / "sd3" if (root / "sd3").is_dir() else root
    pipe = load_world_generator(folder).pipe
    judge = Judge.load(W.JUDGE_DIR)
    rng = np.random.default_rng(7)
    specs = [S.sample_spec(rng, "colors") for _ in range(prompts)]
    images = np.stack([S.to_uint8(S.render(S.scene_for(s, rng), rng)) for s in specs])
    z = sd3.encode_latents(pipe.vae, images)
    own_e, own_p = sd3._encode(pipe, [s.prompt() for s in specs], 1)
    out = {"suite": "world_shape_swap", "sd3": str(folder), "prompts": prompts}
    for word in ("shape", "colour"):
        swapped = [_swap(s, word, rng) for s in specs]
        swap_e, swap_p = sd3._encode(pipe, [s.prompt() for s in swapped], 1)
        truth = [_value(s, word) for s in specs]
        named = [_value(s, word) for s in swapped]
        g = torch.Generator().manual_seed(0)
        out[word] = {}
        for t in TIMES:
            xt = (1 - t) * z + t * torch.randn(z.shape, generator=g)
            own = _top(pipe, judge, xt - t * velocity(pipe, xt, t, own_e, own_p), word)
            swap = _top(pipe, judge, xt - t * velocity(pipe, xt, t, swap_e, swap_p), word)
            out[word][str(t)] = {
                "own": float(np.mean([a == b for a, b in zip(own, truth)])),
                "swapped_follows_render": float(np.mean([a == b for a, b in zip(swap, truth)])),
                "swapped_follows_caption": float(np.mean([a == b for a, b in zip(swap, named)])),
            }
    return out


def main(argv=None) -> int:
    return world_main(run, __doc__, argv, samples_help="renders of colour prompts")


if __name__ == "__main__":
    sys.exit(main())
