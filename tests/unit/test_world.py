"""The miniature world: grammar, tokenizer, the CLIP text tower in SD3's slots, the build
recipe at toy scale, and the shipped world against its manifest."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from rewards import world
from rewards.world import clip as C
from rewards.world import scenes as S
from rewards.world import tokenizer as T


def test_every_prompt_parses_back_to_its_spec():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        spec = S.sample_spec(rng)
        text = spec.prompt()
        if rng.random() < 0.5:
            text = S.refine_prompt(text, S.sample_detail(rng))
        assert S.parse_prompt(text) == spec
    for bad in ("a cat", "two circle", "a red circle and a square", "three circles above"):
        with pytest.raises(ValueError, match="not in the world's grammar"):
            S.parse_prompt(bad)


def test_scenes_meet_their_specs_by_the_renderer_truth():
    from rewards.world.detector import TinyDetector
    from rewards.world.judge import Judge

    judge = Judge(TinyDetector())  # check() reads the truth objects; no detector needed
    rng = np.random.default_rng(1)
    for _ in range(300):
        spec = S.sample_spec(rng)
        scene = S.scene_for(spec, rng, S.sample_detail(rng) if rng.random() < 0.5 else None)
        assert judge.check(spec, scene.objects), spec


def test_object_mask_covers_exactly_the_drawn_objects_and_weights_them():
    from rlhf.world import flow_matching as FM

    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = S.scene_for(S.sample_spec(rng), rng)  # plain: objects in flat colours
        img = S.render(scene, rng)
        cover = S.object_mask(scene)
        background = np.asarray(S.BACKGROUNDS[scene.background], np.float32)
        off = np.abs(img - background).max(-1) > 1e-3  # pixels the objects changed
        assert ((cover > 0) == off).all()
        full = cover == 1.0
        assert all(
            np.isclose(img[full], S.COLOURS[o.colour], atol=1e-3).all(-1).any()
            for o in scene.objects
        )
    cover = np.zeros((2, S.SIZE, S.SIZE), np.float32)
    cover[0, :16, :16] = 1.0
    w = FM.latent_weights(cover, 4.0)
    assert w.shape == (2, 1, 16, 16) and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.isclose(w[0, 0, 0, 0] / w[1, 0, 0, 0], torch.tensor(5.0))
    w2 = FM.latent_weights(cover, 4.0, factor=2)
    assert w2.shape == (2, 1, 32, 32) and torch.isclose(w2.mean(), torch.tensor(1.0))


@pytest.mark.parametrize("factor", [2, 4])
def test_world_vae_and_transformer_take_the_recipes_latent_size(factor, one_torch_thread):
    from diffusers import AutoencoderKL

    from rlhf.world import sd3 as W

    vae = AutoencoderKL(**W.vae_config("toy", factor)).eval()
    z = vae.encode(torch.zeros(1, 3, S.SIZE, S.SIZE)).latent_dist.mean
    assert z.shape == (1, 4, S.SIZE // factor, S.SIZE // factor)
    assert vae.decode(z).sample.shape == (1, 3, S.SIZE, S.SIZE)
    cfg = W.transformer_config(8, 8, "toy", patch_size=4, sample_size=S.SIZE // factor)
    assert cfg["sample_size"] == S.SIZE // factor and cfg["patch_size"] == 4
    with pytest.raises(ValueError, match="factor=3 must be 2 or 4"):
        W.vae_config("full", 3)


def test_world_tokenizer_has_one_token_per_world_word():
    tok = T.build_tokenizer()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert eot == len(tok) - 1  # highest id: open_clip's argmax pooling finds it
    for w in T.world_words():
        assert len(tok(w).input_ids) == 3, w  # start, the word, end
    # Text outside the world falls back to bytes, nothing is unknown.
    ids = tok("wow!@# a cat").input_ids
    assert eot not in ids[1:-1]
    longest = "four purple diamonds and a yellow triangle and an orange square, " + (
        "with checkered texture, dramatic side lighting, drop shadows, starry background"
    )
    assert len(tok(longest).input_ids) <= T.CONTEXT_LENGTH


def test_hf_text_encoder_equals_open_clip_text_tower():
    torch.manual_seed(0)
    tok = T.build_tokenizer()
    model = C.create_model(C.model_config(len(tok), "toy")).eval()
    for p in model.parameters():  # non-trivial norms and biases too
        p.data.add_(0.05 * torch.randn_like(p))
    hf = C.hf_text_encoder(model, tok)
    ids = C.tokenize(tok, ["a red circle left of a blue square, with striped texture", "three"])
    with torch.no_grad():
        want = model.encode_text(ids)
        got = hf(input_ids=ids).text_embeds
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_caption_negatives_change_exactly_what_they_name():
    rng = np.random.default_rng(3)
    scene = S.Scene([S.Obj("circle", "red", 20, 16, 7), S.Obj("square", "blue", 40, 48, 7)], "grey")
    swapped = C.perturb(scene, "swap_colours", rng)
    assert [o.colour for o in swapped.objects] == ["blue", "red"]
    assert [o.shape for o in swapped.objects] == ["circle", "square"]
    moved = C.perturb(scene, "relation", rng)
    assert (moved.objects[0].x, moved.objects[1].x) == (48, 16)
    assert C.perturb(scene, "texture", rng) is None  # a plain scene has no texture


@pytest.mark.slow
def test_world_builds_at_toy_scale_and_loads_as_a_generator(tmp_path, one_torch_thread):
    from rewards.errors import ConfigError
    from rlhf.generator import GeneratorConfig, load_generator
    from rlhf.world.build import Recipe, build_world, verify_manifest

    out = tmp_path / "world"
    result = build_world(out, scale="toy", seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("rlhf world build")
    assert {"clip", "judge", "vae", "sd3"} <= set(manifest["seconds"])
    assert verify_manifest(out) == []
    geneval = result["report"]["generator_geneval_mini"]
    assert 0.0 <= geneval["mean"] <= 1.0 and set(geneval["n"]) == set(S.CATEGORIES)
    gen = load_generator(GeneratorConfig(model=str(out / "sd3"), load_t5=False))
    assert gen.transformer.config.in_channels == 4
    # The fine-tuning experiment runs on a built world (two DRaFT-K steps against its CLIP;
    # its ICT names the shipped CLIP, `backbone: world`, so it is for a shipped build).
    from rewards.world.judge import Judge
    from rlhf.world.experiments import finetune_world, world_config
    from rlhf.world.triplets import world_backbone

    assert json.loads((out / "ict" / "reward.json").read_text())["options"] == {"backbone": "world"}
    clip = {"name": "clip", "options": {"backbone": world_backbone(out)}}
    cfg = world_config(
        f"rewards={json.dumps([clip])}",
        "train.max_steps=2",
        "train.batch_size=2",
        "policy.sampler.steps=2",
        "prompts.synthetic_eval=6",
        f"policy.generator.model={out / 'sd3'}",
    )
    run = finetune_world(cfg, judge=Judge.load(out / "judge"))
    assert len(run["train"]) == 2 and all(np.isfinite(m["loss"]) for m in run["train"])
    assert set(run["after"]) == set(run["before"]) >= {"geneval_mini", "jpeg_ratio"}
    assert run["images"][1].shape == (6, 3, 64, 64)
    # Each stage records the recipe fields it read and those of the stages it was made from.
    made = {st: json.loads((out / st / ".complete").read_text()) for st in ("clip", "sd3", "ict")}
    assert made["clip"]["scale"] == "toy" and made["clip"]["seed"] == 0
    assert made["clip"]["recipe"]["clip_steps"] == Recipe.for_scale("toy").clip_steps
    assert "sd3_steps" not in made["clip"]["recipe"]
    assert {"clip_steps", "vae_images", "sd3_steps"} <= set(made["sd3"]["recipe"])
    assert "judge_steps" not in made["sd3"]["recipe"]
    assert {"clip_steps", "judge_steps", "sd3_steps", "ict_epochs", "guidance"} <= set(
        made["ict"]["recipe"]
    )
    # Another scale would keep these stages as they are: refused before anything runs.
    with pytest.raises(ConfigError, match=r"/clip was built with scale='toy' \(now 'full'\)"):
        build_world(out, scale="full", seed=0, stages=("report",))
    # A second build skips finished stages; a changed file is caught by the manifest.
    build_world(out, scale="toy", seed=0, stages=("clip",))
    w = out / "judge" / "judge.json"
    w.write_text(w.read_text() + " ")
    assert verify_manifest(out) == ["judge/judge.json"]


shipped = pytest.mark.skipif(
    not (world.ASSETS / "manifest.json").is_file(), reason="the world is not built"
)


@shipped
def test_shipped_world_matches_its_manifest():
    from rlhf.world.build import verify_manifest

    assert verify_manifest(world.ASSETS) == []
    total = sum(p.stat().st_size for p in world.ASSETS.rglob("*") if p.is_file())
    assert total <= 20 * 2**20


@shipped
def test_shipped_world_was_built_by_the_code_recipe():
    """The shipped manifest's recipe is :class:`Recipe`'s: a recipe change that alters a stage
    must rebuild (and re-ship) what it alters, or say so in the recipe (``vae_images``)."""
    from dataclasses import asdict

    from rlhf.world.build import Recipe

    manifest = json.loads((world.ASSETS / "manifest.json").read_text())
    assert manifest["recipe"] == asdict(Recipe())
    assert manifest["command"] == "rlhf world build --scale full --seed 0 --jobs 2"


@shipped
def test_shipped_clip_and_judge_read_renders():
    from rewards.registry import build_reward

    rng = np.random.default_rng(99)
    specs = [S.sample_spec(rng, S.CATEGORIES[i % 6]) for i in range(60)]
    images = torch.stack(
        [torch.from_numpy(S.render(S.scene_for(s, rng), rng)).permute(2, 0, 1) for s in specs]
    )
    prompts = [s.prompt() for s in specs]
    judge = build_reward({"name": "geneval_mini"})
    assert judge(images, prompts).mean() >= 0.9
    clip = build_reward({"name": "clip", "options": {"backbone": "world"}})
    own = clip(images, prompts)
    other = clip(images, prompts[1:] + prompts[:1])
    # Measured 0.90 on the shipped (ResNet) CLIP; the earlier ViT one scored 0.78 here.
    assert (own > other).float().mean() >= 0.85


@shipped
def test_shipped_stages_record_the_recipe_that_made_them():
    """Each shipped stage's ``.complete`` names the recipe fields it read (and those of the
    stages it was made from) with the values of :class:`Recipe`: a build into the shipped
    folder with another scale or recipe is refused instead of keeping them and rewriting the
    manifest's recipe."""
    from rewards.errors import ConfigError
    from rlhf.world.build import STAGES, Recipe, _check_kept

    for stage in ("clip", "judge", "sd3", "ict"):
        made = json.loads((world.ASSETS / stage / ".complete").read_text())
        assert (made["scale"], made["seed"]) == ("full", 0), stage
        assert made["recipe"] and made["recipe"].items() <= asdict(Recipe()).items(), stage
    _check_kept(world.ASSETS, STAGES, Recipe(), "full", 0)
    with pytest.raises(
        ConfigError, match=r"sd3 was built with clip_batch=64 \(now 16\), .* and \d+ more"
    ):
        _check_kept(world.ASSETS, ("sd3",), Recipe.for_scale("toy"), "full", 0)


def test_a_build_refuses_finished_stages_that_another_recipe_made(tmp_path, one_torch_thread):
    from rewards.errors import ConfigError
    from rlhf.world.build import build_world

    out = tmp_path / "world"
    build_world(out, scale="toy", seed=0, stages=("clip",))
    before = (out / "clip" / "open_clip.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"clip was built with precision='fp32' \(now 'bf16'\)"):
        build_world(out, scale="toy", seed=0, stages=("clip",), precision="bf16")
    with pytest.raises(ConfigError, match=r"clip was built with seed=0 \(now 1\)"):
        build_world(out, scale="toy", seed=1, stages=("clip", "judge"))
    # The SD3 is made from the CLIP: asking for it checks the CLIP it would be trained on.
    with pytest.raises(ConfigError, match=r"clip_vision='resnet' \(now 'vit'\).*another --out"):
        build_world(out, scale="toy", seed=0, stages=("sd3",), clip_vision="vit")
    assert not (out / "judge").exists() and not (out / "sd3").exists()
    assert (out / "clip" / "open_clip.safetensors").read_bytes() == before
    (out / "clip" / ".complete").write_text('{"scale": "toy"')  # torn
    with pytest.raises(ConfigError, match=r"clip/.complete is not a stage record"):
        build_world(out, scale="toy", seed=0, stages=("clip",))
    # A stage finished before stages recorded their recipe (an empty .complete) is kept.
    (out / "clip" / ".complete").write_text("")
    build_world(out, scale="toy", seed=1, stages=("clip",))
    assert (out / "clip" / "open_clip.safetensors").read_bytes() == before


def test_chance_specs_pair_each_prompt_with_another_of_its_category():
    from rlhf.world.sampling import chance_specs, eval_specs

    specs = eval_specs(24)
    rolled = chance_specs(specs)
    assert [s.category for s in rolled] == [s.category for s in specs]
    assert rolled[0] is specs[len(S.CATEGORIES)] and rolled[-1] is specs[len(S.CATEGORIES) - 1]
    with pytest.raises(ValueError, match="cycle through the categories"):
        chance_specs(specs[1:])


@pytest.mark.slow
def test_two_process_and_bf16_builds_against_one_fp32_process(tmp_path, one_torch_thread):
    """One fp32 build in one process is the reference for two others: the same recipe in two
    processes trains bit-identical CLIP, judge and VAE; in bf16 (side process included) every
    stage trains in bf16 and keeps fp32 weights."""
    from safetensors.torch import load_file

    from rlhf.world.build import _recipe, build_world

    stages = ("clip", "judge", "vae", "sd3")
    build_world(tmp_path / "one", scale="toy", seed=0, stages=stages, jobs=1)
    build_world(tmp_path / "two", scale="toy", seed=0, stages=stages[:3], jobs=2)
    for name_one, name_two in (
        ("clip/open_clip.safetensors",) * 2,
        ("judge/judge.safetensors",) * 2,
        ("sd3/vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
    ):
        a, b = load_file(tmp_path / "one" / name_one), load_file(tmp_path / "two" / name_two)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name_two
    # no timings or paths in hashed files (the SD3 stage names the VAE's folder in its copy)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "judge/judge.json").read_text() == (two / "judge/judge.json").read_text()
    vae_one = json.loads((one / "sd3/vae/config.json").read_text())
    vae_two = json.loads((two / "vae/config.json").read_text())
    vae_one.pop("_name_or_path", None), vae_two.pop("_name_or_path", None)
    assert vae_one == vae_two
    seconds = json.loads((tmp_path / "two" / "manifest.json").read_text())["seconds"]
    assert set(seconds) == set(stages[:3])  # the side process's stages are on the books too

    # jobs=2: the CLIP and judge train in the side process, which must get the precision too.
    build_world(tmp_path / "bf16", scale="toy", seed=0, stages=stages, jobs=2, precision="bf16")
    for name in (
        "clip/open_clip.safetensors",
        "judge/judge.safetensors",
        "sd3/vae/diffusion_pytorch_model.safetensors",
        "sd3/transformer/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "bf16" / name)
        assert a.keys() == b.keys(), name
        assert all(b[k].dtype == a[k].dtype and torch.isfinite(b[k]).all() for k in b), name
        assert not all(torch.equal(a[k], b[k]) for k in a), f"{name}: not trained in bf16"
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["recipe"]["precision"] == "bf16"
    assert manifest["command"].endswith("--precision bf16")
    with pytest.raises(ValueError, match="precision='fp16'"):
        _recipe("toy", None, "fp16")


def test_sd3_pretraining_encodes_each_distinct_caption_once_and_alike():
    from rlhf.world import sd3 as W
    from rlhf.world.sampling import load_world_generator

    pipe = load_world_generator(world.SD3_DIR).pipe
    captions = ["a red circle", "two squares", "a red circle", "", "two squares", "a triangle"]
    embeds, pooled, row = W._encode_captions(pipe, captions, 1, batch=2)
    assert embeds.shape[0] == pooled.shape[0] == 4 and row.tolist() == [0, 1, 0, 2, 1, 3]
    for i, caption in enumerate(captions):
        e, p = W._encode(pipe, [caption], 1)
        torch.testing.assert_close(embeds[row[i]], e[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled[row[i]], p[0], rtol=0, atol=1e-5)


@shipped
def test_sd3_text_states_with_gradients_equal_the_pipelines_encoding_and_train(one_torch_thread):
    from rlhf.world import flow_matching as FM
    from rlhf.world import sd3 as W
    from rlhf.world.sampling import load_world_generator

    pipe = load_world_generator(world.SD3_DIR).pipe
    captions = ["a red circle", "", "two triangles above a blue square, with striped texture"]
    e0, p0 = W._encode(pipe, captions, 1)
    e1, p1 = W.text_states(pipe, W._tokenize(pipe, captions), 1)
    assert e1.requires_grad is False  # the shipped encoders are frozen until text_lr asks
    torch.testing.assert_close(e1, e0, rtol=0, atol=0)
    torch.testing.assert_close(p1, p0, rtol=0, atol=0)
    # With text_lr the encoders train beside the transformer, and the pipeline then encodes
    # prompts with the trained ones (what save_pipeline ships).
    before = [t.clone() for t in pipe.text_encoder.parameters()]
    latents = torch.randn(4, 4, 16, 16)
    FM.train_transformer(pipe, latents, captions + ["a square"], 2, 4, progress=False, text_lr=1e-3)
    assert not any(t.requires_grad for t in pipe.text_encoder.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(before, pipe.text_encoder.parameters())]
    assert any(moved)
    e2, _ = W._encode(pipe, captions, 1)
    assert not torch.equal(e2, e0)


def test_geneval_mini_is_refused_as_a_training_reward():
    from rlhf.config import load_config
    from rlhf.run_config import RunConfig

    world_yaml = world.ASSETS.parents[2] / "configs" / "world.yaml"
    with pytest.raises(ValueError, match=r"rewards\[0\]\.name=geneval_mini is an evaluator"):
        load_config(RunConfig, world_yaml, ["rewards=[{name: geneval_mini}]"])
    cfg = load_config(RunConfig, world_yaml)
    assert "geneval_mini" in [s.name for s in cfg.eval_reward_specs()]


# Measured on the shipped world (BENCHMARKS.md section 2, "the fine-tuning tests"), one thread,
# 48 held-out prompts and seeds. Against the shipped ICT, 200 DRaFT-K steps at lr 3e-4 raise
# the held-out ICT 0.584 -> 0.600 and GenEval-mini 0.229 -> 0.271 (two images more; on 120
# prompts 0.192 -> 0.233). At lr 1e-3 the same run lowers both (ICT 0.584 -> 0.545 in 120
# steps): the better-trained SD3 needs the smaller step. (Against the world CLIP score, 120
# steps at lr 1e-3 raise the held-out CLIP score 0.540 -> 0.575 and collapse GenEval-mini
# 0.229 -> 0.062, the paper's "CLIP as a reward collapses"; measured, not a test, to keep the
# suite inside its 25 minutes.) The run is deterministic; the GenEval-mini rise is asserted
# as a rise of at least one image (two measured), since one image's verdict is the smallest
# change a numerically different CPU could make. It is not a robust effect: table 2 (120
# prompts) gives +ICT between +0.00 and +0.04 depending on the ICT checkpoint, and +CLIP
# score up to +0.04 at this lr.
ICT_STEPS, ICT_LR, ICT_RISE, EVAL_PROMPTS = 200, 3e-4, 0.01, 48


@shipped
@pytest.mark.slow
def test_finetuning_the_world_generator_against_ict_raises_ict_and_geneval(one_torch_thread):
    from rewards.registry import build_reward
    from rlhf.world.experiments import finetune_world, world_config

    ict = {"name": "ict", "checkpoint": str(world.ASSETS / "ict")}
    cfg = world_config(
        f"rewards={json.dumps([ict])}",
        f"train.max_steps={ICT_STEPS}",
        f"policy.engine.lr={ICT_LR}",
        "train.batch_size=8",
        f"prompts.synthetic_eval={EVAL_PROMPTS}",
    )
    out = finetune_world(cfg, scorers={"ict": build_reward(ict)})
    before, after = out["before"], out["after"]
    geneval = before["geneval_mini"]["mean"], after["geneval_mini"]["mean"]
    print(
        f"ICT {before['ict']:.3f} -> {after['ict']:.3f}, "
        f"GenEval-mini {geneval[0]:.3f} -> {geneval[1]:.3f}"
    )
    assert after["ict"] - before["ict"] >= ICT_RISE
    assert geneval[1] - geneval[0] >= 1 / EVAL_PROMPTS - 1e-9


def test_world_clip_with_a_resnet_image_tower_trains_loads_and_freezes(tmp_path, one_torch_thread):
    """The recipe's ``clip_vision: resnet`` (the default): open_clip's ModifiedResNet as the
    image tower, saved and loaded like the ViT one, and frozen stage by stage like a ViT's
    blocks; ``--clip-vision vit`` builds the earlier ViT tower and says so in the command."""
    from rewards.backbones import build_backbone
    from rlhf.world.build import build_world

    out = tmp_path / "world"
    build_world(out, scale="toy", seed=0, stages=("clip",))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["clip_vision"] == "resnet"
    assert "--clip-vision" not in manifest["command"]
    build_world(tmp_path / "vit", scale="toy", seed=0, stages=("clip",), clip_vision="vit")
    vit = json.loads((tmp_path / "vit" / "manifest.json").read_text())
    assert vit["command"].endswith("--clip-vision vit")
    assert isinstance(
        json.loads((tmp_path / "vit" / "clip" / "open_clip_config.json").read_text())["vision_cfg"][
            "layers"
        ],
        int,
    )
    clip = out / "clip"
    assert isinstance(
        json.loads((clip / "open_clip_config.json").read_text())["vision_cfg"]["layers"], list
    )
    spec = {
        "kind": "open_clip",
        "model": str(clip / "open_clip_config.json"),
        "pretrained": str(clip / "open_clip.safetensors"),
        "extra": {"tokenizer": str(clip / "tokenizer")},
    }
    backbone = build_backbone(spec)
    v = backbone.model.visual
    assert hasattr(v, "attnpool")
    feats = backbone.encode_image(backbone.pixels(torch.rand(2, 3, 64, 64)))
    assert feats.shape == (2, backbone.embed_dim) and torch.isfinite(feats).all()

    def trainable(m):
        return all(p.requires_grad for p in m.parameters())

    def frozen(m):
        return not any(p.requires_grad for p in m.parameters())

    # Half of [layer1, layer2, layer3, layer4, attention pool]: the first two stages.
    backbone.freeze(vision_fraction=0.5)
    assert frozen(v.layer1) and frozen(v.layer2)
    assert trainable(v.layer3) and trainable(v.layer4) and trainable(v.attnpool)
    assert trainable(v.conv1) and trainable(backbone.model.transformer)
    backbone.freeze(vision_fraction=1.0)
    assert frozen(v)
    with pytest.raises(ValueError, match="clip_vision"):
        build_world(tmp_path / "bad", scale="toy", stages=("clip",), clip_vision="convnext")


def test_reward_judge_auc_counts_pairs_and_half_ties():
    from bench.world_reward_judge import auc

    labels = torch.tensor([True, True, False, False])
    assert auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), labels) == 1.0
    assert auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), labels) == 0.0
    assert auc(torch.tensor([0.5, 0.9, 0.5, 0.1]), labels) == 0.875  # 3 wins + 1 tie of 4
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([True, True])) is None


def _first_step_by_hand(pipe, latents, captions, batch: int):
    """The draws ``train_transformer`` makes from seed 0 for its first step of ``batch``, and the
    untouched transformer's velocity on them: ``(idx, t, v, target)``."""
    from rlhf.world import sd3 as W

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(latents), (batch,), generator=gen)
    drop = torch.rand(batch, generator=gen) < 0.1
    e, p, rows = W._encode_captions(pipe, captions, 1)
    empty_e, empty_p = W._encode(pipe, [""], 1)
    e = torch.where(drop[:, None, None], empty_e, e[rows[idx]])
    p = torch.where(drop[:, None], empty_p, p[rows[idx]])
    t = torch.sigmoid(torch.randn(batch, generator=gen))
    noise = torch.randn(latents[idx].shape, generator=gen)
    x0 = latents[idx]
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    with torch.no_grad():
        v = pipe.transformer(
            hidden_states=xt, timestep=t * 1000, encoder_hidden_states=e, pooled_projections=p
        ).sample
    return idx, t, v, noise - x0


@shipped
def test_contrastive_flow_matching_subtracts_the_distance_to_another_samples_target(
    one_torch_thread,
):
    import copy

    from rlhf.world import flow_matching as FM
    from rlhf.world.sampling import load_world_generator

    pipe = load_world_generator(world.SD3_DIR).pipe
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "two squares", "a triangle", "a blue diamond"]
    # lr 0: the first step's loss is the untouched model's, the same draws for both.
    plain = FM.train_transformer(copy.copy(pipe), latents, captions, 1, 4, lr=0.0, progress=False)
    lam = 0.2
    both = FM.train_transformer(
        copy.copy(pipe), latents, captions, 1, 4, lr=0.0, progress=False, contrastive=lam
    )
    # Redo the step by hand: the same draws (seed 0) and the rolled batch's target.
    _, _, v, target = _first_step_by_hand(pipe, latents, captions, 4)
    negative = (v - target.roll(1, dims=0)).pow(2).mean().item()
    assert plain[0] == pytest.approx((v - target).pow(2).mean().item(), rel=1e-4)
    assert both[0] == pytest.approx(plain[0] - lam * negative, rel=1e-4)


@shipped
def test_representation_alignment_adds_the_projected_tokens_cosine_to_clip_features(
    one_torch_thread,
):
    import copy

    from rlhf.world import flow_matching as FM
    from rlhf.world.sampling import load_world_generator

    clip_model, _ = C.load_clip(world.CLIP_DIR)
    rng = np.random.default_rng(0)
    renders = np.stack(
        [S.to_uint8(S.render(S.scene_for(S.sample_spec(rng), rng), rng)) for _ in range(4)]
    )
    feats = FM.clip_token_features(clip_model.eval(), renders, grid=8, stage=2, batch=3)
    # Stage 2 of the ResNet is already 8x8 (8 px cells): the targets are its map, row-major.
    with torch.no_grad():
        v = clip_model.visual
        ref = v.layer2(v.layer1(v.stem(C.pixels(renders))))
    assert feats.shape == (4, 64, ref.shape[1])
    torch.testing.assert_close(feats[2, 8 * 3 + 5], ref[2, :, 3, 5], rtol=0, atol=1e-5)

    pipe = load_world_generator(world.SD3_DIR).pipe
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "two squares", "a triangle", "a blue diamond"]
    plain = FM.train_transformer(copy.copy(pipe), latents, captions, 1, 4, lr=0.0, progress=False)
    blocks = []
    hook = pipe.transformer.transformer_blocks[1].register_forward_hook(
        lambda _m, _i, out: blocks.append(out[1].detach())
    )
    aligned = FM.train_transformer(
        copy.copy(pipe), latents, captions, 1, 4, lr=0.0, progress=False, align=feats
    )
    hook.remove()
    # The same draws as the plain step (seed 0), and the projector the step built from seed 0.
    torch.manual_seed(0)
    width = 32 * pipe.transformer.config.num_attention_heads
    proj = torch.nn.Sequential(
        torch.nn.Linear(width, 2 * width),
        torch.nn.SiLU(),
        torch.nn.Linear(2 * width, feats.shape[-1]),
    )
    idx = torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sim = torch.nn.functional.cosine_similarity(proj(blocks[0]), feats[idx], dim=-1).mean()
    assert aligned[0] == pytest.approx(plain[0] - 0.5 * sim.item(), rel=1e-4, abs=1e-6)
    assert not any(m._forward_hooks for m in pipe.transformer.transformer_blocks)


@shipped
def test_object_weights_apply_only_below_their_timestep(one_torch_thread):
    import copy

    from rlhf.world import flow_matching as FM
    from rlhf.world.sampling import load_world_generator

    pipe = load_world_generator(world.SD3_DIR).pipe
    latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "two squares", "a triangle", "a blue diamond"] * 2
    weights = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 3

    def first_loss(**kw):  # lr 0: the untouched model's loss on the same draws (seed 0)
        return FM.train_transformer(
            copy.copy(pipe), latents, captions, 1, 8, lr=0.0, progress=False, **kw
        )[0]

    plain, weighted = first_loss(), first_loss(weights=weights)
    assert weighted != pytest.approx(plain, rel=1e-3)
    assert first_loss(weights=weights, weight_below=1.0) == weighted
    assert first_loss(weights=weights, weight_below=0.0) == pytest.approx(plain, rel=1e-6)
    # In between, each sample is weighted or not by its own timestep: redo the step by hand,
    # with the draws train_transformer makes from seed 0.
    idx, t, v, target = _first_step_by_hand(pipe, latents, captions, 8)
    cut = float(t.median())
    err = (v - target).pow(2)
    w = torch.where(t[:, None, None, None] < cut, weights[idx], torch.ones_like(weights[idx]))
    assert (t < cut).any() and (t >= cut).any()
    mixed = first_loss(weights=weights, weight_below=cut)
    assert mixed == pytest.approx((err * w).mean().item(), rel=1e-4)
    assert mixed != pytest.approx(plain, rel=1e-3) and mixed != pytest.approx(weighted, rel=1e-3)


def test_sd3_data_takes_its_mix_and_category_from_the_caller():
    from rlhf.world.stages import _sd3_data

    images, captions = _sd3_data(40, 0, easy=1.0, category="colors")
    assert images.shape == (40, S.SIZE, S.SIZE, 3)
    assert {S.parse_prompt(c).category for c in captions} == {"colors"}
    assert all("," not in c for c in captions)  # easy prompts only: no refined detail
    _, mixed = _sd3_data(40, 0)  # the build's mix: refined prompts among the easy ones
    assert any("," in c for c in mixed) and any("," not in c for c in mixed)


@shipped
def test_guidance_interval_probe_samples_as_the_project_sampler(one_torch_thread):
    from bench.world_guidance import sample_guided
    from rlhf.world.build import Recipe
    from rlhf.world.sampling import load_world_generator, sample_world

    gen = load_world_generator(world.SD3_DIR)
    prompts = ["a red circle", "two squares", "a triangle above a diamond"]
    cond = gen.encode_prompts(prompts, 2.0, "", 1)
    for scale in (1.0, 2.0):  # no guidance; guidance at every step (sigma >= 0)
        ours = sample_guided(gen, cond, [0, 1, 2], 3, scale, 0.0)
        recipe = Recipe(sample_steps=3, guidance=scale)
        torch.testing.assert_close(ours, sample_world(None, prompts, recipe, gen=gen))
    # Guided only while sigma >= 0.5: the early steps as guided, then unguided.
    mixed = sample_guided(gen, cond, [0, 1, 2], 3, 2.0, 0.5)
    assert not torch.equal(mixed, sample_guided(gen, cond, [0, 1, 2], 3, 1.0, 0.0))


def test_adaln_zero_init_makes_every_block_the_identity_and_still_trains(one_torch_thread):
    from diffusers import SD3Transformer2DModel

    from rlhf.world import sd3 as W

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**W.transformer_config(8, 8, "full"))
    W.adaln_zero_init(model)
    x = torch.randn(2, 4, 16, 16)
    args = dict(
        timestep=torch.tensor([300.0, 700.0]),
        encoder_hidden_states=torch.randn(2, 5, 16),
        pooled_projections=torch.randn(2, 16),
    )
    out = model(hidden_states=x, **args).sample
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    # Zero gates: each block hands its image tokens through unchanged.
    seen = []
    hook = model.transformer_blocks[1].register_forward_hook(
        lambda m, a, kw, o: seen.append((kw["hidden_states"], o[1])), with_kwargs=True
    )
    model(hidden_states=x, **args)
    hook.remove()
    assert torch.equal(seen[0][0], seen[0][1])
    # The output layer gets a gradient at once (its input is not zero), then the rest do.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(hidden_states=x, **args).sample.sub(x).pow(2).mean().backward()
        opt.step()
    assert torch.count_nonzero(model.proj_out.weight) > 0
    assert torch.count_nonzero(model.transformer_blocks[0].norm1.linear.weight) > 0


def test_word_swap_probe_swaps_one_word_and_sees_the_colour_word_read(one_torch_thread):
    from bench.world_shape_swap import run, swap_word

    rng = np.random.default_rng(0)
    for _ in range(40):
        spec = S.sample_spec(rng, "colors")
        shape, colour = swap_word(spec, "shape", rng), swap_word(spec, "colour", rng)
        assert shape.shapes != spec.shapes and shape.colours == spec.colours
        assert colour.colours != spec.colours and colour.shapes == spec.shapes
    out = run(None, 24)
    for word in ("shape", "colour"):
        for share in out[word].values():
            assert all(0.0 <= v <= 1.0 for v in share.values())
    # Lightly noised, the render decides; at t = 0.9 the shipped SD3 follows a swapped colour
    # word more often than the render's colour (it reads colour words).
    assert out["colour"]["0.3"]["own"] >= 0.9
    assert (
        out["colour"]["0.9"]["swapped_follows_caption"]
        > (out["colour"]["0.9"]["swapped_follows_render"])
    )


def test_twin_loss_shares_t_and_noise_within_twins_and_adds_their_residual_gap(one_torch_thread):
    import copy

    from bench.world_sd3_capacity import twin_data
    from rlhf.world import flow_matching as FM
    from rlhf.world import sd3 as W
    from rlhf.world.sampling import load_world_generator

    images, captions = twin_data(4, 0)
    assert captions[0] != captions[1] and captions[0].split()[:-1] == captions[1].split()[:-1]
    assert 0 < (images[0] != images[1]).any(-1).sum() < 0.05 * S.SIZE**2  # only the outline
    pipe = load_world_generator(world.SD3_DIR).pipe
    z = W.encode_latents(pipe.vae, images)

    def first_loss(latents, caps, w):  # lr 0: the untouched model, the same draws for any w
        return FM.train_transformer(
            copy.copy(pipe), latents, caps, 1, 8, lr=0.0, progress=False, pair_weight=w
        )[0]

    # Identical twins under one t and one noise have identical residuals: no gap to add.
    same = z[0::2].repeat_interleave(2, dim=0)
    same_caps = [c for c in captions[0::2] for _ in range(2)]
    assert first_loss(same, same_caps, 4.0) == pytest.approx(first_loss(same, same_caps, 1.0))
    # Real twins: the loss grows linearly in the weight, by a positive gap.
    l1, l2, l4 = (first_loss(z, captions, w) for w in (1.0, 2.0, 4.0))
    assert l2 - l1 > 1e-4
    assert l4 - l2 == pytest.approx(2 * (l2 - l1), rel=1e-3)
