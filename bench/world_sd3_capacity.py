"""Does the world SD3 lack capacity? A transformer of a given depth and width trained from
scratch for a fixed wall-clock budget on the world's renders (shipped VAE and CLIP, the build's
recipe otherwise), then GenEval-mini (the shipped judge) on held-out easy prompts and the
one-step x0 prediction from renders noised to t (where layout and shape are decided).

Run two sizes side by side, one torch thread each, for equal compute:

    python -m bench.world_sd3_capacity --layers 4 --heads 3 --seconds 900 --out a.json &
    python -m bench.world_sd3_capacity --layers 4 --heads 6 --seconds 900 --out b.json

``--vae DIR --vae-factor 2`` trains a factor-2 VAE by the build's recipe into DIR (once) and
trains the transformer on its 32x32 latents (``--patch 4`` keeps the shipped 64 tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.common import emit

TIMES = (0.2, 0.4, 0.6)


def _probe_steps(pipe, latents, captions, batch: int, seconds: float, lr: float):
    """(steps that fit in ``seconds``, seconds per step), timed on 10 steps of a copy."""
    import copy

    from rlhf.world import flow_matching as FM

    probe = copy.copy(pipe)
    probe.transformer = copy.deepcopy(pipe.transformer)
    t = time.perf_counter()
    n = 2 * batch  # a few captions: encoding every distinct caption would count in the probe
    FM.train_transformer(probe, latents[:n], captions[:n], 10, batch, lr=lr, progress=False)
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


def twin_data(n: int, seed: int, category: str | None = "colors"):
    """``2 n`` renders and captions in twins (rows 2i, 2i + 1): one scene of ``category`` and
    the same scene, drawn with the same pixel noise, with its first object's shape changed
    (and the caption with it), for ``train_transformer(pair_weight=...)``."""
    from dataclasses import replace as swap

    import numpy as np

    from bench.world_shape_swap import swap_word
    from rewards.world import scenes as S

    images = np.empty((2 * n, S.SIZE, S.SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        rng = np.random.default_rng((seed, 9, i))
        spec = S.sample_spec(rng, category)
        twin_spec = swap_word(spec, "shape", rng)
        scene = S.scene_for(spec, rng)
        objects = [swap(scene.objects[0], shape=twin_spec.shapes[0])] + scene.objects[1:]
        twin = swap(scene, objects=objects)
        for j, (sc, sp) in enumerate(((scene, spec), (twin, twin_spec))):
            images[2 * i + j] = S.to_uint8(S.render(sc, np.random.default_rng((seed, 10, i))))
            captions.append(sp.prompt())
    return images, captions


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
    vae_dir: str | None = None,
    vae_factor: int | None = None,
    batch: int | None = None,
    guidances: tuple[float, ...] = (1.0,),
    save: str | None = None,
    contrastive: float = 0.0,
    easy: float = 0.6,
    align_stage: int = 0,
    align_weight: float = 0.5,
    align_block: int = 1,
    weight_below: float = 1.0,
    category: str | None = None,
    radius: tuple[float, float] | None = None,
    init: str = "default",
    pair_weight: float = 0.0,
) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from bench.world_counts import count_objects
    from rewards import world
    from rewards.world import scenes as S
    from rewards.world.judge import Judge
    from rlhf.world import flow_matching as FM
    from rlhf.world import sd3 as W
    from rlhf.world.build import Recipe
    from rlhf.world.sampling import (
        chance_specs,
        eval_specs,
        load_world_generator,
        sample_world,
    )
    from rlhf.world.stages import _sd3_data

    if radius:  # objects of another size in every render (the shipped judge finds them)
        S.RADIUS = tuple(radius)
    recipe = Recipe()
    batch = batch or recipe.sd3_batch
    gen = load_world_generator(world.SD3_DIR)
    if vae_dir and vae_factor and not Path(vae_dir).is_dir():
        # A VAE of that factor by the build's recipe (its VAE stage), kept for the next pilot.
        from rlhf.world.stages import train_world_vae

        train_world_vae(Path(vae_dir), replace(recipe, vae_factor=vae_factor), 0, "full")
    if vae_dir:  # another VAE (e.g. factor 2: train_vae(..., factor=2)) in the shipped pipeline
        from diffusers import AutoencoderKL

        gen.pipe.vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        gen.pipe.vae_scale_factor = 2 ** (len(gen.vae.config.block_out_channels) - 1)
    enc = gen.pipe.text_encoder
    cfg = W.transformer_config(
        enc.config.hidden_size,
        enc.config.projection_dim,
        patch_size=patch,
        sample_size=S.SIZE // gen.vae_scale_factor,
    )
    cfg.update(num_layers=layers, num_attention_heads=heads, caption_projection_dim=32 * heads)
    torch.manual_seed(0)
    gen.pipe.transformer = SD3Transformer2DModel(**cfg)
    if init == "adaln-zero":
        W.adaln_zero_init(gen.pipe.transformer)
    params = sum(p.numel() for p in gen.transformer.parameters())
    t0 = time.perf_counter()
    if pair_weight > 0:  # twins that differ in one shape, no refined renders
        renders, captions = twin_data(images // 2, 0, category)
        cover = None
    else:
        renders, captions, cover = _sd3_data(images, 0, masks=True, easy=easy, category=category)
    latents = W.encode_latents(gen.vae, renders)
    factor = gen.vae_scale_factor
    weights = FM.latent_weights(cover, object_weight, factor)
    align = None
    if align_stage:
        from rewards.world.clip import load_clip

        clip_model, _ = load_clip(world.CLIP_DIR)
        grid = S.SIZE // factor // patch
        align = FM.clip_token_features(clip_model.eval(), renders, grid, align_stage)
    data_s = time.perf_counter() - t0
    per_step = None
    if steps is None:
        steps, per_step = _probe_steps(gen.pipe, latents, captions, batch, seconds, lr)
    t0 = time.perf_counter()
    losses = FM.train_transformer(
        gen.pipe,
        latents,
        captions,
        steps,
        batch,
        lr=lr,
        progress=False,
        weights=weights,
        t_mean=t_mean,
        text_lr=text_lr,
        contrastive=contrastive,
        align=align,
        align_weight=align_weight,
        align_block=align_block,
        weight_below=weight_below,
        pair_weight=pair_weight,
    )
    train_s = time.perf_counter() - t0
    if save:
        W.save_pipeline(gen.pipe, save)  # weights rounded to fp16, as a loaded world's are
    judge = Judge.load(world.JUDGE_DIR)
    specs = eval_specs(prompts)
    if category:  # trained on one category: judged on its held-out prompts only
        specs = [s for s in specs if s.category == category]
    by_guidance = {}
    for g in guidances:
        samples = sample_world(
            None, [s.prompt() for s in specs], replace(recipe, guidance=g), gen=gen
        )
        score = judge.score(specs, samples)
        score.pop("per_image", None)
        # Chance: each image against another held-out prompt (of its category, as always).
        others = specs[1:] + specs[:1] if category else chance_specs(specs)
        chance = judge.score(others, samples)
        chance.pop("per_image", None)
        by_guidance[g] = (score, chance)
    score, chance = by_guidance[guidances[0]]
    return {
        "layers": layers,
        "heads": heads,
        "width": 32 * heads,
        "patch": patch,
        "object_weight": object_weight,
        "t_mean": t_mean,
        "text_lr": text_lr,
        "contrastive": contrastive,
        "easy_share": easy,
        "weight_below": weight_below,
        "category": category,
        "radius": list(S.RADIUS),
        "init": init,
        "pair_weight": pair_weight,
        "align": {"stage": align_stage, "weight": align_weight, "block": align_block},
        "vae": vae_dir or "shipped",
        "vae_factor": factor,
        "params": params,
        "steps": steps,
        "step_s": per_step or train_s / steps,
        "train_s": train_s,
        "data_s": data_s,
        "final_loss": float(sum(losses[-200:]) / len(losses[-200:])),
        "geneval_mini": score,
        "geneval_mini_chance": chance,
        "by_guidance": {
            str(g): {"geneval_mini": s["mean"], "chance": c["mean"]}
            for g, (s, c) in by_guidance.items()
        },
        "batch": batch,
        "x0_geneval_mini": _x0_scores(gen, judge, prompts),
        "mean_objects": {
            p: count_objects(gen, judge, p, 96, recipe)["mean_objects"]
            for p in ("", "a square", "four squares")
        },
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
    ap.add_argument("--vae", default=None, help="a VAE folder to use instead of the shipped one")
    ap.add_argument(
        "--vae-factor",
        type=int,
        default=None,
        help="with --vae DIR that does not exist yet: train a VAE of this factor there first",
    )
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    ap.add_argument(
        "--guidance", type=float, nargs="+", default=[1.0], help="CFG scales to sample at"
    )
    ap.add_argument("--save", default=None, help="save the trained pipeline in this folder")
    ap.add_argument(
        "--contrastive", type=float, default=0.0, help="contrastive flow matching's lambda"
    )
    ap.add_argument(
        "--easy", type=float, default=0.6, help="share of plain easy-prompt renders in the data"
    )
    ap.add_argument(
        "--align-stage",
        type=int,
        default=0,
        help="REPA: align to the world CLIP's ResNet features after this stage (1-4; 0: off)",
    )
    ap.add_argument("--align-weight", type=float, default=0.5)
    ap.add_argument("--align-block", type=int, default=1, help="the transformer block aligned")
    ap.add_argument(
        "--weight-below",
        type=float,
        default=1.0,
        help="apply --object-weight only at timesteps below this (1: all)",
    )
    ap.add_argument(
        "--category", default=None, help="train (and judge) on this GenEval category only"
    )
    ap.add_argument(
        "--radius",
        type=float,
        nargs=2,
        default=None,
        help="objects' radius range in px (default: the world's, 6.5 9.5)",
    )
    ap.add_argument(
        "--init",
        choices=("default", "adaln-zero"),
        default="default",
        help="the transformer's initialisation: diffusers' default or DiT's adaLN-Zero",
    )
    ap.add_argument(
        "--pair-weight",
        type=float,
        default=0.0,
        help="train on twins that differ in one shape, with this weight on their difference",
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
        a.vae,
        a.vae_factor,
        a.batch,
        tuple(a.guidance),
        a.save,
        a.contrastive,
        a.easy,
        a.align_stage,
        a.align_weight,
        a.align_block,
        a.weight_below,
        a.category,
        a.radius,
        a.init,
        a.pair_weight,
    )
    return emit(r, a.out)


if __name__ == "__main__":
    sys.exit(main())
