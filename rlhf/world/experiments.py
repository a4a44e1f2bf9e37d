"""The paper's fine-tuning experiment in the miniature world, in one process.

:func:`finetune_world` fine-tunes the shipped world SD3 with DRaFT-K (LoRA, a plain AdamW
engine, no Ray) against a reward, from the same base, with the same steps, prompts and seeds
for every reward, and measures on fixed held-out prompts and seeds, before and after:
GenEval-mini (mean and per category), the JPEG compression ratio, and any scoring rewards
(e.g. HP and the CLIP score). The distributed loop (``rlhf finetune configs/world.yaml``) runs
the same DRaFT-K step; this is the small, deterministic version for tables and tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class WorldFinetune:
    """One fine-tuning run: ``rewards`` (reward specs, optimised as a weighted sum; empty:
    the base, no training), and the DRaFT-K settings."""

    rewards: list[dict] = field(default_factory=list)
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 8
    k: int = 2
    sample_steps: int = 10
    guidance: float = 1.0
    eval_prompts: int = 120
    seed: int = 0
    world_dir: str | None = None  # a built world (default: the shipped one)


@torch.no_grad()
def measure(gen, specs, seeds, sampler, scorers: dict, judge) -> tuple[dict, torch.Tensor]:
    """Held-out figures of the generator ``gen`` and its images ``(B, 3, 64, 64)``."""
    from rlhf.image_stats import image_stats
    from rlhf.world.build import sample_chunks

    prompts = [s.prompt() for s in specs]
    images = sample_chunks(gen, prompts, seeds, sampler, chunk=16)
    geneval = judge.score(specs, images)
    geneval.pop("per_image")
    geneval.pop("n")
    out = {"geneval_mini": geneval, "jpeg_ratio": image_stats(images)["jpeg_ratio"]}
    for name, fn in scorers.items():
        out[name] = float(fn(images, prompts).mean())
    return out, images


def finetune_world(cfg: WorldFinetune, scorers: dict | None = None, judge=None) -> dict:
    """Run ``cfg``; returns ``{"before": figures, "after": figures, "images": (before,
    after), "train": [per-step metrics]}`` (``after`` is None for the base)."""
    from rewards import world
    from rewards.registry import RewardSpec, build_reward
    from rewards.world.judge import Judge
    from rewards.world.scenes import world_prompts
    from rlhf.draft import DraftConfig, draft_step
    from rlhf.engine import EngineConfig, PlainEngine
    from rlhf.generator import FinetuneConfig
    from rlhf.prompts import step_batch
    from rlhf.world.build import eval_specs, load_world_generator, world_sampler

    root = Path(cfg.world_dir) if cfg.world_dir else world.ASSETS
    judge = judge or Judge.load(root / "judge")
    scorers = scorers or {}
    sampler = world_sampler(cfg.sample_steps, cfg.guidance)
    gen = load_world_generator(
        root / "sd3",
        FinetuneConfig(rank=cfg.rank, alpha=float(cfg.rank)) if cfg.rewards else None,
        seed=cfg.seed,
    )
    specs = eval_specs(cfg.eval_prompts)
    seeds = [10_000 + i for i in range(len(specs))]
    before, images_before = measure(gen, specs, seeds, sampler, scorers, judge)
    if not cfg.rewards:
        return {"before": before, "after": None, "images": (images_before, None), "train": []}
    components = {}
    for i, d in enumerate(cfg.rewards):
        spec = RewardSpec.from_dict(d, f"rewards[{i}]")
        model = build_reward(spec).requires_grad_(False)
        components[spec.key] = (spec.weight, model)
    engine = PlainEngine(gen.transformer, EngineConfig(lr=cfg.lr))
    draft = DraftConfig(k=cfg.k)
    prompts = world_prompts(600, seed=cfg.seed)
    history = []
    gen.transformer.train()
    for step in range(1, cfg.steps + 1):
        ps, ss = step_batch(prompts, step, cfg.batch_size, cfg.seed)
        history.append(draft_step(engine, gen, components, ps, ss, sampler, draft, step))
    gen.transformer.eval()
    after, images_after = measure(gen, specs, seeds, sampler, scorers, judge)
    return {
        "before": before,
        "after": after,
        "images": (images_before, images_after),
        "train": history,
    }
