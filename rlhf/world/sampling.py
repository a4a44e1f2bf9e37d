"""Sampling the world generator the way every world experiment does: 64 px, no T5 tokens, the
project's own sampler; and the held-out easy prompts the experiments evaluate on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rewards.world import scenes as S

if TYPE_CHECKING:
    from rlhf.world.build import Recipe


def eval_specs(n: int, seed: int = 4242) -> list[S.Spec]:
    """Held-out easy prompts, the six categories in turn (GenEval's balance)."""
    rng = np.random.default_rng(seed)
    return [S.sample_spec(rng, S.CATEGORIES[i % len(S.CATEGORIES)]) for i in range(n)]


def chance_specs(specs: list[S.Spec]) -> list[S.Spec]:
    """GenEval-mini's chance level: :func:`eval_specs` rolled by one round of categories, so
    each image is judged against another prompt of its own category, one it was not drawn for."""
    k = len(S.CATEGORIES)
    rolled = specs[k:] + specs[:k]
    if any(a.category != b.category for a, b in zip(specs, rolled)):
        raise ValueError("specs must cycle through the categories in turn (eval_specs)")
    return rolled


def world_sampler(steps: int, guidance: float):
    """The sampler settings every world experiment uses: 64 px, no T5 tokens."""
    from rlhf.sampler import SamplerConfig

    return SamplerConfig(
        steps=steps, guidance_scale=guidance, height=S.SIZE, width=S.SIZE, max_sequence_length=1
    )


def load_world_generator(sd3_dir: Path, finetune=None, seed: int = 0):
    from rlhf.generator import GeneratorConfig, load_generator

    cfg = GeneratorConfig(
        model=str(sd3_dir), load_t5=False, gradient_checkpointing=False, seed=seed
    )
    return load_generator(cfg, finetune)


@torch.no_grad()
def sample_chunks(gen, prompts: list[str], seeds: list[int], sampler, chunk: int = 32):
    """``(B, 3, 64, 64)`` in [0, 1]: ``gen``'s samples of ``prompts`` (one seed each), ``chunk``
    at a time."""
    from rlhf.sampler import sample

    return torch.cat(
        [
            sample(gen.transformer, gen, prompts[i : i + chunk], seeds[i : i + chunk], sampler)
            for i in range(0, len(prompts), chunk)
        ]
    )


def sample_world(
    sd3_dir: Path, prompts: list[str], recipe: Recipe, seed: int = 0, gen=None
) -> torch.Tensor:
    """``(B, 3, 64, 64)`` in [0, 1]: the project's own sampler on the world generator (seeds
    ``seed``, ``seed + 1``, ...); ``gen`` reuses an already loaded one."""
    gen = gen or load_world_generator(sd3_dir)
    seeds = list(range(seed, seed + len(prompts)))
    return sample_chunks(gen, prompts, seeds, world_sampler(recipe.sample_steps, recipe.guidance))
