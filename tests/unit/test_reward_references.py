"""Rewards exact to their reference code (BarretBa/ICTHP, tgxs002/HPSv2, the LAION aesthetic
predictor), each pinned against an independent computation on tiny real models."""

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from rewards.backbones import TINY_HF_CLIP_DIR, HFClipBackbone, OpenClipBackbone
from rewards.builtin_rewards import AESTHETIC_BACKBONE, HPSV2_FILES
from rewards.evaluate import evaluate_reward, preference_accuracy
from rewards.losses import ict_hp_loss
from rewards.objective import Objective, build_model
from rewards.registry import build_reward
from rlhf.reward_run_config import RewardTrainConfig

TINY = {"backbone": "tiny"}


# --------------------------------------------------------------------------- ICT-HP training


def test_icthp_term_pairs_each_triplet_with_its_own_prompt_and_sums():
    cfg = RewardTrainConfig(
        kind="hp",
        model={"options": {**TINY, "head": {"dropout": [0, 0, 0, 0]}}},
        ict_model={"options": TINY},
    )
    cfg.loss.icthp_weight = 1.0
    torch.manual_seed(0)
    model, _, ict = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 3, 32, 32, generator=g)
    prompts = ["a red circle", "two blue squares", "a green star", "one yellow cube"]
    batch = {"images": images, "easy_prompt": prompts, "refine_prompt": prompts}
    out = Objective(cfg, model, ict_model=ict)(batch)
    with torch.no_grad():
        cos = torch.stack([ict.score(images[i], [prompts[i]] * 3) for i in range(4)])
        logits = torch.stack([model.logits(images[i]) for i in range(4)])
    expected = ict_hp_loss(cos, logits, cfg.loss.margin)
    torch.testing.assert_close(out["icthp_21"], expected["icthp_21"])
    torch.testing.assert_close(out["icthp_32"], expected["icthp_32"])


# --------------------------------------------------------------------------- text masking


def test_hf_text_mask_keeps_the_exclamation_token():
    # CLIP's BPE gives "!" id 0, the same number as the padding. The reference feeds input ids
    # only; CLIP's text attention is causal, so the padding after the end-of-text token cannot
    # reach the pooled token and no mask is needed to match it.
    torch.manual_seed(0)
    bb = HFClipBackbone(TINY_HF_CLIP_DIR).eval()
    prompts = ["wow!@# a cat", "a cat"]
    ids = bb.tokenizer(prompts)
    assert (ids[0, :7] == 0).any(), "the prompt must contain token id 0"
    with torch.no_grad():
        ours = bb.encode_text(prompts)
        ref = bb.model.get_text_features(input_ids=ids)
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    torch.testing.assert_close(ours, ref)


# --------------------------------------------------------------------------- HP freezing


def _trainable(module):
    # logit_scale belongs to neither tower (build_model freezes it for every cosine reward)
    return {n for n, p in module.named_parameters() if p.requires_grad and "logit_scale" not in n}


def test_hp_freezing_matches_reference_on_hf_clip():
    torch.manual_seed(0)
    bb = HFClipBackbone(TINY_HF_CLIP_DIR)
    bb.freeze(text_fraction=1.0, vision_fraction=0.5)
    got = {n.removeprefix("model.") for n in _trainable(bb)}
    # The reference (set_grad_with_rate, fix_rate 0.5) on 2 vision layers: [layer0, layer1,
    # post_layernorm][:int(3 * 0.5)] frozen, visual_projection frozen; the embeddings and
    # pre_layrnorm are never touched, so they stay trainable.
    ref = CLIPModel(CLIPConfig.from_pretrained(TINY_HF_CLIP_DIR))
    expected = set()
    for n, _ in ref.named_parameters():
        if n.startswith("vision_model.") and not n.startswith("vision_model.encoder.layers.0."):
            expected.add(n)
    assert got == expected
    assert any(n.startswith("vision_model.embeddings.patch_embedding") for n in got)
    assert any(n.startswith("vision_model.pre_layrnorm") for n in got)
    assert not any(n.startswith("visual_projection") for n in got)


def test_hp_freezing_on_open_clip_and_ends():
    torch.manual_seed(0)
    bb = OpenClipBackbone("tiny-clip")
    bb.freeze(text_fraction=1.0, vision_fraction=0.5)
    got = _trainable(bb)
    # The same rule: resblocks.0 and proj frozen; conv1, the embeddings, ln_pre, resblocks.1
    # and ln_post trainable; the text tower and logit_scale frozen (text 1.0).
    expected = {
        f"model.visual.{n}"
        for n, _ in bb.model.visual.named_parameters()
        if not n.startswith("transformer.resblocks.0.") and n != "proj"
    }
    assert got == expected
    assert {"model.visual.conv1.weight", "model.visual.ln_pre.weight"} <= got
    # 0 freezes nothing, 1 everything
    bb = OpenClipBackbone("tiny-clip")
    n_all = len(list(bb.parameters())) - 1  # logit_scale
    bb.freeze(0.0, 0.0)
    assert len(_trainable(bb)) == n_all
    bb.freeze(1.0, 1.0)
    assert _trainable(bb) == set()
    with pytest.raises(ValueError, match="freeze.vision_fraction"):
        bb.freeze(0.0, 1.5)


def test_hp_training_model_freezes_as_reference():
    cfg = RewardTrainConfig(kind="hp", model={"options": {"backbone": "tiny-hf"}})
    cfg.freeze.text_fraction, cfg.freeze.vision_fraction = 1.0, 0.5
    model, _, _ = build_model(cfg)
    names = _trainable(model)
    assert "backbone.model.vision_model.pre_layrnorm.weight" in names
    assert not any("visual_projection" in n or "text_model" in n for n in names)
    # gradients reach the trainable embeddings through the frozen blocks
    model.logits(torch.rand(2, 3, 32, 32)).sum().backward()
    p = dict(model.named_parameters())[
        "backbone.model.vision_model.embeddings.patch_embedding.weight"
    ]
    assert p.grad is not None and p.grad.abs().sum() > 0


# --------------------------------------------------------------------------- ICT-HP validation


@pytest.fixture(scope="module")
def triplet_loader(tmp_path_factory):
    from rewards.data import TripletDataset
    from rewards.synthetic import write_synthetic_parquet
    from rewards.training import make_eval_loader

    path = write_synthetic_parquet(tmp_path_factory.mktemp("d") / "t.parquet", 12, image_size=32)
    return make_eval_loader(TripletDataset(path, image_size=32), 5)


def _ict_hp():
    torch.manual_seed(0)
    r = build_reward({"name": "ict_hp", "options": TINY})
    torch.nn.init.normal_(r.hp.head.layers[-1].weight, std=3.0)  # logits far from 0
    return r


def test_ict_hp_reference_validation_is_ict_times_softmax_over_the_triplet(triplet_loader):
    reward = _ict_hp()
    rows = evaluate_reward("ict_hp", reward, triplet_loader, progress=False)
    per_image, reference = [], []
    with torch.no_grad():
        for batch in triplet_loader:
            for imgs, prompt in zip(batch["images"], batch["easy_prompt"]):
                cos = torch.stack([reward.ict(im[None], [prompt])[0] for im in imgs])
                logits = torch.stack([reward.hp.logits(im[None])[0] for im in imgs])
                reference.append(cos * torch.softmax(logits, 0))
                per_image.append(cos * torch.sigmoid(logits))
    reference, per_image = torch.stack(reference), torch.stack(per_image)
    assert not torch.allclose(reference, per_image)
    assert rows == {
        "ict_hp: ICT x sigmoid(HP), per image": preference_accuracy(per_image),
        "ict_hp: ICT x softmax(HP over triplet), reference": preference_accuracy(reference),
    }


def test_ict_is_also_reported_against_the_refined_prompt(triplet_loader):
    torch.manual_seed(0)
    reward = build_reward({"name": "ict", "options": TINY})
    rows = evaluate_reward("ict", reward, triplet_loader, progress=False)
    refined = []
    with torch.no_grad():
        for batch in triplet_loader:
            for imgs, prompt in zip(batch["images"], batch["refine_prompt"]):
                refined.append(reward(imgs, [prompt] * 3))
    assert set(rows) == {"ict", "ict: refined prompt"}
    assert rows["ict: refined prompt"] == preference_accuracy(torch.stack(refined))
    assert set(
        evaluate_reward(
            "clip", build_reward({"name": "clip", "options": TINY}), triplet_loader, progress=False
        )
    ) == {"clip"}


# --------------------------------------------------------------------------- HPSv2, aesthetic


def _hub_cache_with_hpsv2(root):
    """A Hugging Face cache holding both HPSv2 files (tiny CLIPs with different weights),
    laid out as ``hf_hub_download`` leaves it."""
    import open_clip

    from rewards.backbones import register_model_configs

    register_model_configs()
    repo = root / "models--xswu--HPSv2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    weights = {}
    for i, (version, filename) in enumerate(HPSV2_FILES.items()):
        torch.manual_seed(10 + i)
        sd = open_clip.create_model("tiny-clip").state_dict()
        torch.save({"state_dict": sd}, snap / filename)  # the released wrapping
        weights[version] = sd
    return snap, weights


@pytest.mark.parametrize("version", ["2.0", 2.1, "v2.1"])
def test_hpsv2_loads_its_hub_files_by_version(tmp_path, monkeypatch, version):
    import huggingface_hub.constants as hub

    snap, weights = _hub_cache_with_hpsv2(tmp_path)
    # the real hf_hub_download, answered from this cache only: nothing is downloaded
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    want = weights[str(version).removeprefix("v")]
    for spec in (
        {"name": "hpsv2", "options": {**TINY, "version": version}},  # default: the hub repo
        {"name": "hpsv2", "checkpoint": str(snap), "options": {**TINY, "version": version}},
    ):
        got = build_reward(spec).backbone.model.state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, msg=k)


def test_hpsv2_bad_version_names_the_option():
    with pytest.raises(ValueError, match=r"options.version='3.0'"):
        build_reward({"name": "hpsv2", "options": {**TINY, "version": "3.0"}})


def test_aesthetic_default_backbone_is_openai_vit_l_14_with_quickgelu():
    import open_clip

    model, tag = AESTHETIC_BACKBONE["model"], AESTHETIC_BACKBONE["pretrained"]
    assert open_clip.get_model_config(model)["quick_gelu"] is True
    assert open_clip.get_model_config(model)["embed_dim"] == 768  # the LAION head's input
    assert open_clip.get_pretrained_cfg(model, tag)["quick_gelu"] is True
