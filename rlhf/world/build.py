"""``rlhf world build``: the miniature world from scratch, seeded, stage by stage.

Stages (each writes a folder under ``out`` and is skipped when that folder is complete):

1. ``clip``   the tiny open_clip CLIP, contrastive on renders (+ its tokenizer);
2. ``judge``  GenEval-mini, a detector trained on renders (evaluation only);
3. ``vae``    a tiny ``AutoencoderKL`` (factor 4, 4 latent channels) trained on renders;
4. ``sd3``    an SD3 transformer, flow matching on the VAE's latents of renders, the CLIP's
              text tower in both text-encoder slots: a diffusers folder;
5. ``ict``    an ICT reward trained from the CLIP on Pick-High-mini triplets of the base SD3
              (``rlhf.world.triplets``), stored in fp16: what the fine-tuning test optimises;
6. ``report`` held-out figures: CLIP caption choice, judge accuracy, the base generator's
              GenEval-mini, into ``report.json``; and ``manifest.json``: size and sha256 of
              every file, the command and the seconds each stage took.

``--scale toy`` builds the same recipe at toy size (the CI test); ``full`` is what ships in
``rewards/world/assets`` (CLIP, judge) and ``rlhf/world/assets/sd3``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rewards.checkpoints import file_sha256
from rewards.world import scenes as S

log = logging.getLogger(__name__)

STAGES = ("clip", "judge", "vae", "sd3", "ict", "report")


@dataclass
class Recipe:
    """Sizes and steps of every stage; ``full`` fits ≤ 30 min on 2 idle cores."""

    clip_pairs: int = 20000
    clip_steps: int = 2400
    clip_batch: int = 64
    # The shipped world was built with "vit"; "resnet" reaches far higher caption choice at
    # the same steps (BENCHMARKS.md section 0) and becomes the default with the next rebuild.
    clip_vision: str = "vit"
    judge_train: int = 8000
    judge_steps: int = 900
    sd3_images: int = 12000
    vae_steps: int = 2500
    vae_batch: int = 16
    sd3_steps: int = 8000
    sd3_batch: int = 32
    ict_prompts: int = 600
    ict_epochs: int = 3
    eval_prompts: int = 120
    sample_steps: int = 10
    guidance: float = 1.0  # no CFG: GenEval-mini 0.20 at 1.0 against 0.125 at 3.0 and 0.14 at 6.0

    @classmethod
    def for_scale(cls, scale: str) -> Recipe:
        if scale == "full":
            return cls()
        if scale == "toy":
            return cls(
                clip_pairs=256,
                clip_steps=8,
                clip_batch=16,
                judge_train=256,
                judge_steps=8,
                sd3_images=128,
                vae_steps=4,
                vae_batch=8,
                sd3_steps=6,
                sd3_batch=8,
                ict_prompts=24,
                ict_epochs=1,
                eval_prompts=12,
                sample_steps=2,
            )
        raise ValueError(f"scale={scale!r} must be 'full' or 'toy'")


def file_table(root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
    }


def verify_manifest(root: str | Path) -> list[str]:
    """Files under ``root`` whose size or hash differs from ``manifest.json`` (or are missing)."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    bad = []
    for name, want in manifest["files"].items():
        p = root / name
        if not p.is_file() or p.stat().st_size != want["bytes"] or file_sha256(p) != want["sha256"]:
            bad.append(name)
    return bad


def _done(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _finish(tmp: Path, folder: Path, seconds: float) -> None:
    """Move a finished stage into place; ``.seconds/<stage>`` records the seconds it took."""
    (tmp / ".complete").write_text("")
    (folder.parent / ".seconds").mkdir(exist_ok=True)
    (folder.parent / ".seconds" / folder.name).write_text(f"{seconds:.1f}\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _sd3_data(n: int, seed: int):
    """Renders and captions for the generator: easy prompts drawn plainly (most), refined
    prompts drawn with their detail, and full descriptions of either."""
    images = np.empty((n, S.SIZE, S.SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        rng = np.random.default_rng((seed, 7, i))
        spec = S.sample_spec(rng)
        u = rng.random()
        detail = S.sample_detail(rng) if u >= 0.6 else None
        scene = S.scene_for(spec, rng, detail)
        images[i] = S.to_uint8(S.render(scene, rng))
        if u < 0.6:
            captions.append(spec.prompt())
        elif u < 0.85:
            captions.append(S.refine_prompt(spec.prompt(), detail))
        else:
            captions.append(S.describe(scene, rng))
    return images, captions


def eval_specs(n: int, seed: int = 4242) -> list[S.Spec]:
    """Held-out easy prompts, the six categories in turn (GenEval's balance)."""
    rng = np.random.default_rng(seed)
    return [S.sample_spec(rng, S.CATEGORIES[i % len(S.CATEGORIES)]) for i in range(n)]


def build_world(
    out: str | Path,
    scale: str = "full",
    seed: int = 0,
    stages=STAGES,
    threads: int | None = 1,
    jobs: int = 1,
    clip_vision: str | None = None,
) -> dict:
    """Build the ``stages`` into ``out`` (see the module docstring); returns the report and
    the manifest. ``threads``: torch threads per process (one by default: two OpenMP threads
    on two cores stall badly whenever anything else runs there; None leaves torch's setting).
    ``jobs=2`` trains the CLIP in a second process while this one trains the judge and VAE
    (they do not depend on it); the SD3 waits for both. ``clip_vision``: the CLIP's image
    tower, ``vit`` or ``resnet`` (None: the recipe's)."""
    from rewards.world import clip as C
    from rewards.world import judge as J
    from rlhf.world import sd3 as W

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe.for_scale(scale)
    if clip_vision is not None:
        if clip_vision not in C.VISION_TOWERS:
            raise ValueError(
                f"clip_vision={clip_vision!r} must be one of {', '.join(C.VISION_TOWERS)}"
            )
        recipe = replace(recipe, clip_vision=clip_vision)
    progress = True
    timings: dict[str, float] = {}
    clip_dir, judge_dir, sd3_dir = out / "clip", out / "judge", out / "sd3"

    side = None
    if jobs > 1 and "clip" in stages and not _done(clip_dir):
        import multiprocessing as mp

        side = mp.get_context("spawn").Process(
            target=build_world, args=(out, scale, seed, ("clip",), threads, 1, recipe.clip_vision)
        )
        side.start()
    if side is None and "clip" in stages and not _done(clip_dir):
        t = time.time()
        model, tok, cfg = C.train_clip(
            recipe.clip_pairs,
            recipe.clip_steps,
            recipe.clip_batch,
            lr=2e-3,
            seed=seed,
            scale=scale,
            progress=progress,
            vision=recipe.clip_vision,
        )
        tmp = out / ".clip.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        C.save_clip(model, tok, cfg, tmp)
        _finish(tmp, clip_dir, time.time() - t)
        timings["clip"] = time.time() - t
        print(f"[world] clip: {timings['clip']:.0f} s", flush=True)

    if "judge" in stages and not _done(judge_dir):
        t = time.time()
        judge = J.train_judge(
            n_train=recipe.judge_train, steps=recipe.judge_steps, seed=seed, threads=None
        )
        tmp = out / ".judge.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        judge.save(tmp)
        _finish(tmp, judge_dir, time.time() - t)
        timings["judge"] = time.time() - t
        print(f"[world] judge: {timings['judge']:.0f} s", flush=True)

    vae_dir = out / "vae"
    if ("vae" in stages or "sd3" in stages) and not (_done(vae_dir) or _done(sd3_dir)):
        t = time.time()
        images, _ = _sd3_data(recipe.sd3_images, seed)
        vae = W.train_vae(
            images, recipe.vae_steps, recipe.vae_batch, seed=seed, scale=scale, progress=progress
        )
        tmp = out / ".vae.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        vae.save_pretrained(str(tmp), safe_serialization=True)
        _finish(tmp, vae_dir, time.time() - t)
        timings["vae"] = time.time() - t
        print(f"[world] vae: {timings['vae']:.0f} s", flush=True)

    if side is not None:
        side.join()
        if side.exitcode != 0 or not _done(clip_dir):
            raise RuntimeError(f"the clip stage failed in its process (exit {side.exitcode})")
    if "sd3" in stages and not _done(sd3_dir):
        from diffusers import AutoencoderKL

        t = time.time()
        model, tok = C.load_clip(clip_dir)
        text_encoder = C.hf_text_encoder(model, tok)
        images, captions = _sd3_data(recipe.sd3_images, seed)
        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
        latents = W.encode_latents(vae, images)
        pipe = W.build_pipeline(
            vae, W.new_transformer(text_encoder, scale, seed), text_encoder, tok
        )
        W.train_transformer(
            pipe,
            latents,
            captions,
            recipe.sd3_steps,
            recipe.sd3_batch,
            seed=seed,
            progress=progress,
        )
        tmp = out / ".sd3.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        W.save_pipeline(pipe, tmp)
        _finish(tmp, sd3_dir, time.time() - t)
        shutil.rmtree(vae_dir)  # the diffusers folder holds its own copy
        timings["sd3"] = time.time() - t
        print(f"[world] sd3: {timings['sd3']:.0f} s", flush=True)

    ict_dir = out / "ict"
    if "ict" in stages and not _done(ict_dir):
        t = time.time()
        tmp = out / ".ict.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        stats = train_world_ict(out, tmp, recipe, seed)
        _finish(tmp, ict_dir, time.time() - t)
        timings["ict"] = time.time() - t
        print(f"[world] ict: {timings['ict']:.0f} s {stats}", flush=True)

    report = {}
    if "report" in stages:
        t = time.time()
        report = world_report(out, recipe)
        timings["report"] = time.time() - t
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    seconds = {
        st: float((out / ".seconds" / st).read_text())
        for st in STAGES
        if (out / ".seconds" / st).is_file()
    }
    if "report" in timings:
        seconds["report"] = round(timings["report"], 1)
    manifest = {
        "command": f"rlhf world build{_out_arg(out)} --scale {scale} --seed {seed} --jobs {jobs}"
        + (f" --clip-vision {recipe.clip_vision}" if recipe.clip_vision != "vit" else ""),
        "recipe": asdict(recipe),
        "seconds": seconds,
        "files": file_table(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"report": report, "manifest": manifest}


def train_world_ict(out: Path, folder: Path, recipe: Recipe, seed: int) -> dict:
    """ICT from the world CLIP on Pick-High-mini (in this process), saved in fp16."""
    import tempfile

    from rewards.registry import save_reward
    from rewards.training import (
        DataConfig,
        LabelConfig,
        Objective,
        OptimConfig,
        build_model,
        make_dataset,
        run_training,
    )
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


def _out_arg(out: Path) -> str:
    from rewards.world import ASSETS

    return "" if out.resolve() == ASSETS.resolve() else f" --out {out}"


def world_report(out: Path, recipe: Recipe) -> dict:
    from rewards.world import clip as C
    from rewards.world import judge as J

    model, tok = C.load_clip(out / "clip")
    judge = J.Judge.load(out / "judge")
    n = max(50, recipe.eval_prompts * 2)
    report = {
        "clip_caption_choice": C.caption_choice_accuracy(model, tok, n=n),
        "judge": J.evaluate_judge(judge, n=n),
    }
    specs = eval_specs(recipe.eval_prompts)
    images = sample_world(out / "sd3", [s.prompt() for s in specs], recipe)
    report["generator_geneval_mini"] = judge.score(specs, images)
    report["generator_geneval_mini"].pop("per_image", None)
    return report


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
