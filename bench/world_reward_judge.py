"""Do the rewards agree with the judge on the generator's own samples? (BENCHMARKS.md, table 2)

A reward can only teach DRaFT-K what it can tell apart on the images the generator draws. On
the base world SD3's samples of held-out easy prompts, for each reward: the AUC of its score
against the judge's verdict (met or not met), overall and within each category, and the
accuracy of its choice between two samples of one prompt where the judge passes exactly one
(the Pick-High-mini I1/I2 situation, on held-out prompts).

    python -m bench.world_reward_judge --rewards DIR [--prompts 240] [--out FILE.json]

``DIR`` holds the trained rewards saved by ``python -m bench.reward_accuracy --save DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import emit


def auc(scores, labels) -> float | None:
    """The probability that a random positive outscores a random negative (ties count half);
    None when either class is empty."""

    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return round(float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()), 3)


def run(rewards_dir: str, prompts: int) -> dict:
    import torch

    from bench.world_finetune import reward_specs
    from rewards import world
    from rewards.registry import build_reward
    from rewards.world.judge import Judge
    from rlhf.world.build import Recipe
    from rlhf.world.sampling import eval_specs, load_world_generator, sample_world

    torch.set_num_threads(1)
    specs = eval_specs(prompts)
    texts = [s.prompt() for s in specs]
    gen = load_world_generator(world.SD3_DIR)
    recipe = Recipe()
    # Two samples per prompt (seeds 0.. and 10000..), as Pick-High-mini draws I1 and I2.
    a = sample_world(None, texts, recipe, seed=0, gen=gen)
    b = sample_world(None, texts, recipe, seed=10000, gen=gen)
    judge = Judge.load(world.JUDGE_DIR)
    met_a = torch.tensor(judge.score(specs, a)["per_image"], dtype=torch.bool)
    met_b = torch.tensor(judge.score(specs, b)["per_image"], dtype=torch.bool)
    images = torch.cat([a, b])
    labels = torch.cat([met_a, met_b])
    one_met = met_a ^ met_b
    out = {
        "suite": "world_reward_judge",
        "prompts": prompts,
        "met_rate": round(float(labels.float().mean()), 3),
        "pairs_with_one_met": int(one_met.sum()),
        "rewards": {},
    }
    categories = [s.category for s in specs] * 2
    in_category = {c: torch.tensor([x == c for x in categories]) for c in dict.fromkeys(categories)}
    both_texts = texts * 2
    for name, spec in reward_specs(Path(rewards_dir)).items():
        model = build_reward(spec).eval()
        with torch.no_grad():
            scores = torch.cat(
                [
                    model(images[i : i + 64], both_texts[i : i + 64])
                    for i in range(0, 2 * prompts, 64)
                ]
            ).float()
        sa, sb = scores[:prompts], scores[prompts:]
        pick = torch.where(met_a, sa > sb, sb > sa)[one_met]
        per_cat = {c: auc(scores[m], labels[m]) for c, m in in_category.items()}
        out["rewards"][name] = {
            "auc": auc(scores, labels),
            "auc_by_category": per_cat,
            "picks_the_met_sample": round(float(pick.float().mean()), 3) if len(pick) else None,
        }
        print(f"{name}: AUC {out['rewards'][name]['auc']}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rewards", required=True, help="folder with pickscore/, ict/, hp/")
    p.add_argument("--prompts", type=int, default=240, help="held-out prompts (default: 240)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.rewards, a.prompts), a.out)


if __name__ == "__main__":
    sys.exit(main())
