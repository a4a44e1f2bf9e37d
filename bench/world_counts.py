"""What the world SD3 draws for a fixed prompt: the number of objects and the shapes the judge
detects in samples (seeds 0, 1, ...) of the empty prompt and of eight prompts (BENCHMARKS.md,
section 0). A generator that reads number words draws one object for "a square" and four for
"four squares"; one that reads shape words draws mostly squares for either. Unprompted, it
should draw as many objects as its training renders hold (1.75 on average).

    python -m bench.world_counts [--world DIR] [--prompts 240] [--guidance 1.0] [--out FILE.json]

``--world`` is a built world or an SD3 diffusers folder (a pilot's ``--save``); ``--prompts``
is the number of samples per prompt. ``colour_prompts`` in the result: on the 160 held-out
single-object colour prompts ("a red square"), how often the judge's top detection has the
named colour, the named shape (chance 0.25), both, and how often one object is drawn.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import world_main

PROMPTS = (
    "a square",
    "two squares",
    "three squares",
    "four squares",
    "a circle",
    "a triangle",
    "a diamond",
    "a red circle and a blue square",
)


def count_objects(gen, judge, prompt: str, samples: int, recipe) -> dict:
    """The judge's detections in ``samples`` samples (seeds 0, 1, ...) of ``prompt``: how many
    images hold each number of objects, the mean number, and the shapes."""
    from collections import Counter

    from rlhf.world.sampling import sample_world

    dets = judge.detect(sample_world(None, [prompt] * samples, recipe, gen=gen))
    counts = Counter(len(d) for d in dets)
    return {
        "objects": {str(k): counts[k] for k in sorted(counts)},
        "mean_objects": sum(len(d) for d in dets) / samples,
        "shapes": dict(Counter(o.shape for d in dets for o in d).most_common()),
    }


def colour_prompts(gen, judge, recipe, n: int = 960) -> dict:
    """The top detection against the ``colors`` prompts among ``eval_specs(n)``."""
    from rlhf.world.sampling import eval_specs, sample_world

    specs = [s for s in eval_specs(n) if s.category == "colors"]
    dets = judge.detect(sample_world(None, [s.prompt() for s in specs], recipe, gen=gen))
    top = [(d[0] if d else None, s) for d, s in zip(dets, specs)]

    def share(ok) -> float:
        return sum(1 for t, s in top if t is not None and ok(t, s)) / len(specs)

    return {
        "prompts": len(specs),
        "colour": share(lambda t, s: t.colour == s.colours[0]),
        "shape": share(lambda t, s: t.shape == s.shapes[0]),
        "both": share(lambda t, s: (t.colour, t.shape) == (s.colours[0], s.shapes[0])),
        "one_object": sum(len(d) == 1 for d in dets) / len(specs),
    }


def run(world: str | None, samples: int, guidance: float = 1.0) -> dict:
    from dataclasses import replace

    import torch

    from rewards import world as W
    from rewards.world.judge import Judge
    from rlhf.world.build import Recipe
    from rlhf.world.sampling import load_world_generator

    torch.set_num_threads(1)
    root = Path(world) if world else W.ASSETS
    sd3 = root / "sd3" if (root / "sd3").is_dir() else root
    gen = load_world_generator(sd3)
    judge = Judge.load(W.JUDGE_DIR)
    recipe = replace(Recipe(), guidance=guidance)
    out = {"suite": "world_counts", "sd3": str(sd3), "samples": samples, "guidance": guidance}
    for prompt in ("",) + PROMPTS:
        out[prompt] = count_objects(gen, judge, prompt, samples, recipe)
    out["colour_prompts"] = colour_prompts(gen, judge, recipe)
    return out


def main(argv=None) -> int:
    return world_main(
        run,
        __doc__,
        argv,
        samples_help="samples per prompt",
        guidance=(float, 1.0, "CFG scale (default: 1.0)"),
    )


if __name__ == "__main__":
    sys.exit(main())
