"""Does the world SD3 lack capacity? A transformer of a given depth and width trained from
scratch for a fixed wall-clock budget on the world's renders (shipped VAE and CLIP, the build's
recipe otherwise), then GenEval-mini (the shipped judge) on held-out easy prompts and the
one-step x0 prediction from renders noised to t (where layout and shape are decided).

Run two sizes side by side, one torch thread each, for equal compute:

    python -m bench.world_sd3_capacity --layers 4 --heads 3 --seconds 900 --out a.json &
    python -m bench.world_sd3_capacity --layers 4 --heads 6 --seconds 900 --out b.json
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import emit

TIMES = (0.2, 0.4, 0.6)


def _probe_steps(pipe, latents, captions, batch: int, seconds: float, lr: float):
    """(steps that fit in ``seconds``, seconds per step), timed on 10 steps of a copy."""
    import copy

    from rlhf.world import sd3 as W

    probe = copy.copy(pipe)
    probe.transformer = copy.deepcopy(pipe.transformer)
    t = time.perf_counter()
    n = 2 * batch  # a few captions: encoding every distinct caption would count in the probe
    W.train_transformer(probe, latents[:n], captions[:n], 10, batch, lr=lr, progress=False)
    per_step = (time.perf_counter() - t) / 10
    return max(10, int(seconds / per_step)), per_step


def _x0_scores(gen, judge, n: int) -> dict:
    """GenEval-mini of the transformer's one-step clean-latent prediction from renders of
    ``n`` held-out prompts noised to each t in TIMES (:func:`bench.world_diagnose.one_step_x0`)."""
    import numpy as np
    import torch

    from bench.world_diagnose import one_step_x0
    from rewards.world import scenes as S
    from rlhf.world import sd3 as W
    from rlhf.world.sampling import eval_specs

    specs = eval_specs(n)
    rng = np.random.default_rng(99)
    images = np.stack([S.to_uint8(S.render(S.scene_for(s, rng), rng)) for s in specs])
    z = W.encode_latents(gen.vae, images)
    res = one_step_x0(gen.pipe, judge, specs, z, torch.Generator().manual_seed(0), TIMES)
    return {t: r["geneval_mini"] for t, r in res.items()}


def run(
    layers: int,
    heads: int,
    seconds: float,
    images: int,
    prompts: int,
    lr: float,
    patch: int = 2,
    object_weight: float = 0.0,
    steps: int | None = None,
    t_mean: float = 0.0,
    text_lr: float = 0.0,
) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from rewards import world
    from rewards.world.judge import Judge
    from rlhf.world import sd3 as W
    from rlhf.world.build import Recipe
    from rlhf.world.sampling import (
        chance_specs,
        eval_specs,
        load_world_generator,
        sample_world,
    )
    from rlhf.world.stages import _sd3_data

    recipe = Recipe()
    gen = load_world_generator(world.SD3_DIR)
    enc = gen.pipe.text_encoder
    cfg = W.transformer_config(enc.config.hidden_size, enc.config.projection_dim, patch_size=patch)
    cfg.update(num_layers=layers, num_attention_heads=heads, caption_projection_dim=32 * heads)
    torch.manual_seed(0)
    gen.pipe.transformer = SD3Transformer2DModel(**cfg)
    params = sum(p.numel() for p in gen.transformer.parameters())
    t0 = time.perf_counter()
    renders, captions, cover = _sd3_data(images, 0, masks=True)
    latents = W.encode_latents(gen.vae, renders)
    weights = W.latent_weights(cover, object_weight) if object_weight else None
    data_s = time.perf_counter() - t0
    per_step = None
    if steps is None:
        steps, per_step = _probe_steps(gen.pipe, latents, captions, recipe.sd3_batch, seconds, lr)
    t0 = time.perf_counter()
    losses = W.train_transformer(
        gen.pipe,
        latents,
        captions,
        steps,
        recipe.sd3_batch,
        lr=lr,
        progress=False,
        weights=weights,
        t_mean=t_mean,
        text_lr=text_lr,
    )
    train_s = time.perf_counter() - t0
    judge = Judge.load(world.JUDGE_DIR)
    specs = eval_specs(prompts)
    samples = sample_world(None, [s.prompt() for s in specs], recipe, gen=gen)
    score = judge.score(specs, samples)
    score.pop("per_image", None)
    chance = judge.score(chance_specs(specs), samples)
    chance.pop("per_image", None)
    return {
        "layers": layers,
        "heads": heads,
        "width": 32 * heads,
        "patch": patch,
        "object_weight": object_weight,
        "t_mean": t_mean,
        "text_lr": text_lr,
        "params": params,
        "steps": steps,
        "step_s": per_step or train_s / steps,
        "train_s": train_s,
        "data_s": data_s,
        "final_loss": float(sum(losses[-200:]) / len(losses[-200:])),
        "geneval_mini": score,
        "geneval_mini_chance": chance,
        "x0_geneval_mini": _x0_scores(gen, judge, prompts),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3, help="width = 32 x heads")
    ap.add_argument("--seconds", type=float, default=900)
    ap.add_argument("--images", type=int, default=12000)
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--patch", type=int, default=2, help="the transformer's patch size")
    ap.add_argument(
        "--object-weight", type=float, default=0.0, help="loss weight on object pixels (+1)"
    )
    ap.add_argument("--steps", type=int, default=None, help="train this many steps (not --seconds)")
    ap.add_argument(
        "--t-mean", type=float, default=0.0, help="mean of the logit-normal timesteps (0: SD3's)"
    )
    ap.add_argument(
        "--text-lr", type=float, default=0.0, help="train the text encoders too, at this lr"
    )
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    r = run(
        a.layers,
        a.heads,
        a.seconds,
        a.images,
        a.prompts,
        a.lr,
        a.patch,
        a.object_weight,
        a.steps,
        a.t_mean,
        a.text_lr,
    )
    return emit(r, a.out)


if __name__ == "__main__":
    sys.exit(main())
