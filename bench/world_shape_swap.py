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
WORDS = ("shape", "colour")


def swap_word(spec, word: str, rng):
    """``spec`` with its first shape (``word == "shape"``) or colour replaced by another,
    drawn from ``rng``."""
    from dataclasses import replace

    from rewards.world.scenes import COLOURS, SHAPES

    field, pool = ("shapes", SHAPES) if word == "shape" else ("colours", COLOURS)
    names = getattr(spec, field)
    other = str(rng.choice([n for n in pool if n != names[0]]))
    return replace(spec, **{field: [other] + names[1:]})


def _named(spec, word: str) -> str:
    return spec.shapes[0] if word == "shape" else spec.colours[0]


def _drawn(detection, word: str) -> str | None:
    if detection is None:
        return None
    return detection.shape if word == "shape" else detection.colour


def _share(detections, answers, word: str) -> float:
    """The share of ``detections`` whose ``word`` (shape or colour) is the answer's."""
    return sum(_drawn(d, word) == a for d, a in zip(detections, answers)) / len(answers)


def _top_detections(pipe, judge, x0) -> list:
    """The judge's top detection (or None) in the decode of each latent of ``x0``."""
    from bench.world_diagnose import decode_latents

    return [d[0] if d else None for d in judge.detect(decode_latents(pipe.vae, x0))]


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
    swapped = {w: [swap_word(s, w, rng) for s in specs] for w in WORDS}
    encoded = {w: sd3._encode(pipe, [s.prompt() for s in swapped[w]], 1) for w in WORDS}
    out = {"suite": "world_shape_swap", "sd3": str(folder), "prompts": prompts}
    truth = {w: [_named(s, w) for s in specs] for w in WORDS}
    named = {w: [_named(s, w) for s in swapped[w]] for w in WORDS}
    out.update({w: {} for w in WORDS})
    g = torch.Generator().manual_seed(0)
    for t in TIMES:
        xt = (1 - t) * z + t * torch.randn(z.shape, generator=g)
        own = _top_detections(pipe, judge, xt - t * velocity(pipe, xt, t, own_e, own_p))
        for w in WORDS:
            swap = _top_detections(pipe, judge, xt - t * velocity(pipe, xt, t, *encoded[w]))
            out[w][str(t)] = {
                "own": _share(own, truth[w], w),
                "swapped_follows_render": _share(swap, truth[w], w),
                "swapped_follows_caption": _share(swap, named[w], w),
            }
    return out


def main(argv=None) -> int:
    return world_main(run, __doc__, argv, samples_help="renders of colour prompts")


if __name__ == "__main__":
    sys.exit(main())
