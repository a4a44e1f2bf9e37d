"""The paper's fine-tuning experiment in the miniature world, in one process.

:func:`finetune_world` fine-tunes the world SD3 with DRaFT-K (LoRA, a plain AdamW engine, no
Ray) against a reward, from the same base, with the same steps, prompts and seeds for every
reward, and measures on fixed held-out prompts and seeds, before and after: GenEval-mini
(mean and per category), the JPEG compression ratio, and any scoring rewards (e.g. HP and the
CLIP score). Its settings are ``configs/world.yaml`` (what ``rlhf finetune`` runs distributed)
with :data:`ONE_PROCESS` and the caller's overrides (:func:`world_config`); this is the small,
deterministic version for tables and tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlhf.config import load_config
from rlhf.run_config import RunConfig

log = logging.getLogger(__name__)
WORLD_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "world.yaml"
# configs/world.yaml as one process trains it: 60 steps of 8 prompts at lr 1e-3 (the
# settings of BENCHMARKS.md table 2), 120 held-out prompts; the caller's ``scorers`` are what
# it measures (eval_rewards would clash with a row's reward of the same name).
ONE_PROCESS = [
    "eval_rewards=[]",
    "scaling.num_workers=1",
    "train.batch_size=8",
    "train.max_steps=60",
    "policy.engine.lr=1e-3",
    "policy.generator.gradient_checkpointing=false",
    "prompts.synthetic_eval=120",
]


def world_config(*overrides: str) -> RunConfig:
    """``configs/world.yaml`` + :data:`ONE_PROCESS` + ``overrides`` (``key=value``)."""
    return load_config(RunConfig, WORLD_CONFIG, [*ONE_PROCESS, *overrides])


@torch.no_grad()
def measure(gen, specs, seeds, sampler, scorers: dict, judge) -> tuple[dict, torch.Tensor]:
    """Held-out figures of the generator ``gen`` and its images ``(B, 3, 64, 64)``."""
    from rlhf.image_stats import image_stats
    from rlhf.world.sampling import sample_chunks

    prompts = [s.prompt() for s in specs]
    images = sample_chunks(gen, prompts, seeds, sampler, chunk=16)
    geneval = judge.score(specs, images)
    geneval.pop("per_image")
    geneval.pop("n")
    out = {"geneval_mini": geneval, "jpeg_ratio": image_stats(images)["jpeg_ratio"]}
    for name, fn in scorers.items():
        out[name] = float(fn(images, prompts).mean())
    return out, images


def finetune_world(
    cfg: RunConfig, scorers: dict | None = None, judge=None, train: bool = True
) -> dict:
    """Fine-tune ``cfg.policy.generator`` with ``cfg.policy`` against ``cfg.rewards`` (their
    weighted sum) for ``cfg.train.max_steps`` steps of ``cfg.global_batch`` of
    ``cfg.prompts.synthetic_train`` world prompts; measure on ``cfg.prompts.synthetic_eval``
    held-out prompts (seeds from ``cfg.prompts.eval_seed``), judged by ``judge`` (default: the
    shipped one). ``train=False``: the base only. Returns ``{"before": figures, "after":
    figures, "images": (before, after), "train": [per-step metrics]}`` (``after`` is None
    for the base)."""
    from rewards import world
    from rewards.registry import build_reward
    from rewards.world.judge import Judge
    from rlhf.draft import draft_step
    from rlhf.engine import PlainEngine
    from rlhf.generator import load_generator
    from rlhf.prompts import read_prompts, step_batch
    from rlhf.world.sampling import eval_specs

    judge = judge or Judge.load(world.ASSETS / "judge")
    scorers = scorers or {}
    p = cfg.policy
    gen = load_generator(p.generator, p.finetune if train else None)
    specs = eval_specs(cfg.prompts.synthetic_eval)
    seeds = [cfg.prompts.eval_seed + i for i in range(len(specs))]
    before, images_before = measure(gen, specs, seeds, p.sampler, scorers, judge)
    if not train:
        return {"before": before, "after": None, "images": (images_before, None), "train": []}
    components = {}
    for spec in cfg.reward_specs():
        components[spec.key] = (spec.weight, build_reward(spec).requires_grad_(False))
    engine = PlainEngine(gen.transformer, p.engine)
    prompts = read_prompts(
        cfg.prompts.train, n_synthetic=cfg.prompts.synthetic_train, seed=cfg.seed
    )
    history = []
    gen.transformer.train()
    for step in range(1, cfg.train.max_steps + 1):
        ps, ss = step_batch(prompts, step, cfg.global_batch, cfg.seed)
        history.append(draft_step(engine, gen, components, ps, ss, p.sampler, p.draft, step))
    gen.transformer.eval()
    after, images_after = measure(gen, specs, seeds, p.sampler, scorers, judge)
    return {
        "before": before,
        "after": after,
        "images": (images_before, images_after),
        "train": history,
    }
