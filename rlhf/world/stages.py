"""The stages of ``rlhf world build`` (:mod:`rlhf.world.build`), each writing its models into a
folder: the CLIP, the judge, the VAE, the SD3, the ICT; and the held-out report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rewards.world import clip as C
from rewards.world import scenes as S
from rewards.world.judge import Judge, train_judge
from rewards.world.judge_eval import evaluate_judge
from rlhf.world import flow_matching as FM
from rlhf.world import sd3 as W
from rlhf.world.sampling import eval_specs, sample_world

if TYPE_CHECKING:
    from rlhf.world.build import Recipe

log = logging.getLogger(__name__)


def _sd3_data(
    n: int, seed: int, masks: bool = False, easy: float = 0.6, category: str | None = None
):
    """Renders and captions for the generator: a share ``easy`` of easy prompts drawn plainly,
    the rest refined prompts drawn with their detail (five eighths) and full descriptions of
    either (three eighths); with ``masks``, also each render's object coverage
    ``(n, SIZE, SIZE)`` (:func:`rewards.world.scenes.object_mask`). ``category``: prompts of
    that GenEval category only (None: the six alike)."""
    refined = easy + (1.0 - easy) * 0.625
    images = np.empty((n, S.SIZE, S.SIZE, 3), np.uint8)
    cover = np.zeros((n, S.SIZE, S.SIZE), np.float32) if masks else None
    captions = []
    for i in range(n):
        rng = np.random.default_rng((seed, 7, i))
        spec = S.sample_spec(rng, category)
        u = rng.random()
        detail = S.sample_detail(rng) if u >= easy else None
        scene = S.scene_for(spec, rng, detail)
        images[i] = S.to_uint8(S.render(scene, rng))
        if masks:
            cover[i] = S.object_mask(scene)
        if u < easy:
            captions.append(spec.prompt())
        elif u < refined:
            captions.append(S.refine_prompt(spec.prompt(), detail))
        else:
            captions.append(S.describe(scene, rng))
    return (images, captions, cover) if masks else (images, captions)


def train_world_clip(folder: Path, recipe: Recipe, seed: int, scale: str) -> None:
    """The world CLIP, contrastive on renders, and its tokenizer into ``folder``."""
    model, tok, cfg = C.train_clip(
        recipe.clip_pairs,
        recipe.clip_steps,
        recipe.clip_batch,
        lr=2e-3,
        seed=seed,
        scale=scale,
        progress=True,
        vision=recipe.clip_vision,
        precision=recipe.precision,
    )
    C.save_clip(model, tok, cfg, folder)


def train_world_judge(folder: Path, recipe: Recipe, seed: int) -> None:
    """GenEval-mini's detector, trained on renders, into ``folder``."""
    judge = train_judge(
        n_train=recipe.judge_train,
        steps=recipe.judge_steps,
        seed=seed,
        threads=None,
        precision=recipe.precision,
    )
    judge.save(folder)


def train_world_vae(folder: Path, recipe: Recipe, seed: int, scale: str) -> None:
    """The tiny ``AutoencoderKL``, trained on the first ``vae_images`` of the generator's
    renders, into ``folder``."""
    images, _ = _sd3_data(recipe.vae_images, seed)
    vae = W.train_vae(
        images,
        recipe.vae_steps,
        recipe.vae_batch,
        seed=seed,
        scale=scale,
        progress=True,
        factor=recipe.vae_factor,
        precision=recipe.precision,
    )
    vae.save_pretrained(str(folder), safe_serialization=True)


def train_world_sd3(folder: Path, out: Path, recipe: Recipe, seed: int, scale: str) -> None:
    """The SD3 transformer, flow matching on the latents (of ``out/vae``) of renders, with the
    CLIP of ``out/clip`` in both text-encoder slots: a diffusers folder in ``folder``."""
    from diffusers import AutoencoderKL

    model, tok = C.load_clip(out / "clip")
    text_encoder = C.hf_text_encoder(model, tok)
    images, captions, cover = _sd3_data(recipe.sd3_images, seed, masks=True)
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval().requires_grad_(False)
    vae.register_to_config(_name_or_path="vae")  # not the build's scratch path, into the config
    latents = W.encode_latents(vae, images)
    transformer = W.new_transformer(
        text_encoder, scale, seed, recipe.sd3_patch, S.SIZE // recipe.vae_factor
    )
    pipe = W.build_pipeline(vae, transformer, text_encoder, tok)
    align = None
    if recipe.sd3_align_stage:
        grid = S.SIZE // recipe.vae_factor // recipe.sd3_patch
        align = FM.clip_token_features(model.eval(), images, grid, recipe.sd3_align_stage)
    FM.train_transformer(
        pipe,
        latents,
        captions,
        recipe.sd3_steps,
        recipe.sd3_batch,
        seed=seed,
        progress=True,
        weights=FM.latent_weights(cover, recipe.sd3_object_weight, recipe.vae_factor),
        text_lr=recipe.sd3_text_lr,
        align=align,
        align_weight=recipe.sd3_align_weight,
        weight_below=recipe.sd3_weight_below,
        precision=recipe.precision,
    )
    W.save_pipeline(pipe, folder)


def train_world_ict(out: Path, folder: Path, recipe: Recipe, seed: int) -> dict:
    """ICT from the world CLIP on Pick-High-mini (in this process), saved in fp16."""
    import tempfile

    from rewards.objective import Objective, build_model
    from rewards.registry import save_reward
    from rewards.training import DataConfig, LabelConfig, OptimConfig, make_dataset, run_training
    from rlhf.reward_run_config import RewardScalingConfig, RewardTrainConfig
    from rlhf.world.triplets import build_triplets, world_backbone

    with tempfile.TemporaryDirectory() as d:
        stats = build_triplets(out, d, recipe.ict_prompts, 0, seed=seed, recipe=recipe)
        backbone = world_backbone(out)
        n = stats["train"]["triplets"]
        cfg = RewardTrainConfig(
            name="world-ict",
            kind="ict",
            model={"options": {"backbone": backbone}},
            data=DataConfig(train=f"{d}/train.parquet", eval=f"{d}/train.parquet", image_size=64),
            labels=LabelConfig(source="data"),
            optim=OptimConfig(
                lr=2e-4, batch_size=min(32, max(1, n)), epochs=recipe.ict_epochs, warmup_steps=4
            ),
            scaling=RewardScalingConfig(num_workers=1),
            seed=seed,
        ).validate()
        torch.manual_seed(seed)
        model, teacher, ict = build_model(cfg)
        if n:
            train = make_dataset(cfg.data, "train")
            run_training(cfg, model, Objective(cfg, model, teacher, ict), train, None)
        else:  # a toy world's judge may see no winner at all: ship the CLIP itself
            log.warning("world ict: no triplets with a winner; the ICT is the untrained CLIP")
    model.eval().half()
    # The ICT names the shipped CLIP (``backbone: world``), not this build's paths: a world is
    # built to be shipped in rewards/world/assets (a build elsewhere uses its own CLIP only).
    model.reward_options = {"backbone": "world"}
    save_reward(model, folder)
    return stats["train"]


def world_report(out: Path, recipe: Recipe) -> dict:
    model, tok = C.load_clip(out / "clip")
    judge = Judge.load(out / "judge")
    n = max(50, recipe.eval_prompts * 2)
    report = {
        "clip_caption_choice": C.caption_choice_accuracy(model, tok, n=n),
        "judge": evaluate_judge(judge, n=n),
    }
    specs = eval_specs(recipe.eval_prompts)
    images = sample_world(out / "sd3", [s.prompt() for s in specs], recipe)
    report["generator_geneval_mini"] = judge.score(specs, images)
    report["generator_geneval_mini"].pop("per_image", None)
    return report
