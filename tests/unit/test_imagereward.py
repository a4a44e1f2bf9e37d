"""ImageReward: the key map from the original BLIP names, loading, scoring, training pieces."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewards.data import RankedDataset, collate_ranked, ranked_pairs
from rewards.errors import ConfigError
from rewards.imagereward import MEAN, STD, map_original_keys
from rewards.objective import Objective, build_model
from rewards.registry import build_reward, load_reward, save_reward
from rewards.training import DataConfig, OptimConfig, evaluate_model, make_dataset, make_eval_loader
from rewards.training import run_training as run_plain
from rlhf import cli
from rlhf.reward_run_config import RewardScalingConfig, RewardTrainConfig
from tests.unit.test_cli import restore_console  # noqa: F401 (a fixture)

TINY = {"name": "imagereward", "options": {"size": "tiny"}}
# The tiny config (rewards/model_configs/tiny-imagereward/config.json), written out again.
DV, DT, LAYERS, VOCAB, POS, PATCHES = 32, 32, 2, 175, 40, 16


def original_tiny_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """A state dict named as the reference ``ImageReward`` module names its weights (timm's
    ViT under ``blip.visual_encoder``, BLIP's med.py BERT under ``blip.text_encoder``, the
    MLP under ``mlp.layers``), at the tiny config's shapes, every value distinct."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, DV),
        "blip.visual_encoder.pos_embed": (1, PATCHES + 1, DV),
        "blip.visual_encoder.patch_embed.proj.weight": (DV, 3, 8, 8),
        "blip.visual_encoder.patch_embed.proj.bias": (DV,),
        "blip.visual_encoder.norm.weight": (DV,),
        "blip.visual_encoder.norm.bias": (DV,),
        "blip.vision_proj.weight": (256, DV),
        "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, DT),
        "blip.text_proj.bias": (256,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (VOCAB, DT),
        "blip.text_encoder.embeddings.position_embeddings.weight": (POS, DT),
        "blip.text_encoder.embeddings.LayerNorm.weight": (DT,),
        "blip.text_encoder.embeddings.LayerNorm.bias": (DT,),
    }
    for i in range(LAYERS):
        v = f"blip.visual_encoder.blocks.{i}."
        for name, shape in {
            "norm1": (DV,),
            "norm2": (DV,),
            "attn.qkv": (3 * DV, DV),
            "attn.proj": (DV, DV),
            "mlp.fc1": (64, DV),
            "mlp.fc2": (DV, 64),
        }.items():
            shapes[v + name + ".weight"] = shape
            shapes[v + name + ".bias"] = (shape[0],)
        t = f"blip.text_encoder.encoder.layer.{i}."
        for name, shape in {
            "attention.self.query": (DT, DT),
            "attention.self.key": (DT, DT),
            "attention.self.value": (DT, DT),
            "attention.output.dense": (DT, DT),
            "attention.output.LayerNorm": (DT,),
            "crossattention.self.query": (DT, DT),
            "crossattention.self.key": (DT, DV),
            "crossattention.self.value": (DT, DV),
            "crossattention.output.dense": (DT, DT),
            "crossattention.output.LayerNorm": (DT,),
            "intermediate.dense": (64, DT),
            "output.dense": (DT, 64),
            "output.LayerNorm": (DT,),
        }.items():
            shapes[t + name + ".weight"] = shape
            shapes[t + name + ".bias"] = (shape[0],)
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, DT), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes[f"mlp.layers.{i}.weight"] = (o, n)
        shapes[f"mlp.layers.{i}.bias"] = (o,)
    sd = {k: torch.randn(*s, generator=g) * 0.05 for k, s in shapes.items()}
    for k in sd:
        if "norm" in k.lower() and k.endswith("weight"):
            sd[k] += 1.0  # layer norms near identity, so that features vary with the input
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(POS).view(1, -1)
    return sd


def _images(b=2, h=40, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_key_map_loads_a_tiny_original_state_dict_strictly():
    sd = original_tiny_state_dict()
    mapped = map_original_keys(sd)
    model = build_reward(TINY)
    own = model.state_dict()
    # Every weight of ours comes from the file; only the unused projections and the buffer left.
    assert set(mapped) == set(own)
    assert len(sd) - len(mapped) == 5
    model.load_state_dict(mapped, strict=True)
    pairs = {
        "blip.visual_encoder.cls_token": "backbone.vision.embeddings.class_embedding",
        "blip.visual_encoder.pos_embed": "backbone.vision.embeddings.position_embedding",
        "blip.visual_encoder.patch_embed.proj.weight": (
            "backbone.vision.embeddings.patch_embedding.weight"
        ),
        "blip.visual_encoder.blocks.1.attn.qkv.weight": (
            "backbone.vision.encoder.layers.1.self_attn.qkv.weight"
        ),
        "blip.visual_encoder.blocks.0.attn.proj.bias": (
            "backbone.vision.encoder.layers.0.self_attn.projection.bias"
        ),
        "blip.visual_encoder.blocks.1.norm2.weight": (
            "backbone.vision.encoder.layers.1.layer_norm2.weight"
        ),
        "blip.visual_encoder.blocks.0.mlp.fc2.weight": (
            "backbone.vision.encoder.layers.0.mlp.fc2.weight"
        ),
        "blip.visual_encoder.norm.bias": "backbone.vision.post_layernorm.bias",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight": (
            "backbone.text.encoder.layer.1.crossattention.self.key.weight"
        ),
        "mlp.layers.7.weight": "head.layers.7.weight",
    }
    state = model.state_dict()
    for orig, ours in pairs.items():
        torch.testing.assert_close(state[ours], sd[orig], rtol=0, atol=0)


def test_key_map_refuses_unknown_and_incomplete_files(tmp_path):
    sd = original_tiny_state_dict()
    with pytest.raises(ConfigError, match="no mapping.*blip.itm_head.weight"):
        map_original_keys({**sd, "blip.itm_head.weight": torch.zeros(2, 32)})
    with pytest.raises(ConfigError, match="no mapping.*visual_encoder.blocks.0.attn.q.weight"):
        map_original_keys({**sd, "blip.visual_encoder.blocks.0.attn.q.weight": torch.zeros(1)})
    del sd["blip.visual_encoder.blocks.1.mlp.fc1.bias"]
    torch.save(sd, tmp_path / "ImageReward.pt")
    with pytest.raises(ConfigError, match="1 missing key.*layers.1.mlp.fc1.bias"):
        build_reward({**TINY, "checkpoint": str(tmp_path / "ImageReward.pt")})


def test_released_file_or_folder_loads_and_scores(tmp_path):
    sd = original_tiny_state_dict(seed=1)
    torch.save(sd, tmp_path / "ImageReward.pt")
    from_file = build_reward({**TINY, "checkpoint": str(tmp_path / "ImageReward.pt")})
    from_dir = build_reward({**TINY, "checkpoint": str(tmp_path)})
    images, prompts = _images(), ["a red circle", "two blue squares on the left"]
    s = from_file(images, prompts)
    torch.testing.assert_close(from_dir(images, prompts), s)
    assert s.shape == (2,) and torch.isfinite(s).all() and (s[0] - s[1]).abs() > 1e-4
    # The score is the head's output normalised by the released mean and std.
    torch.testing.assert_close(s, (from_file.logits(images, prompts) - MEAN) / STD)


def test_a_file_that_pickles_code_is_refused(tmp_path):
    torch.save({"model": Image.new("RGB", (2, 2))}, tmp_path / "ImageReward.pt")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        build_reward({**TINY, "checkpoint": str(tmp_path / "ImageReward.pt")})


@pytest.mark.usefixtures("restore_console")
def test_rewards_list_shows_imagereward(capsys):
    assert cli.main(["rewards", "list"]) in (0, None)
    assert "imagereward" in capsys.readouterr().out


def test_tiny_scores_have_pixel_gradients_matching_finite_differences():
    torch.manual_seed(0)
    model = build_reward(TINY).double()
    images = _images(2, 40, 48).double().clamp(0.05, 0.95).requires_grad_(True)
    prompts = ["a red circle", "zebra crossing at night"]
    s = model(images, prompts)
    (grad,) = torch.autograd.grad(s.sum(), images)
    assert grad.abs().sum() > 0
    d = torch.randn_like(images) * 1e-3
    with torch.no_grad():
        fd = (model(images + d, prompts) - model(images - d, prompts)).sum() / 2
    torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-4, atol=1e-9)


def test_tokenizer_is_blips(tmp_path):
    model = build_reward(TINY)
    tok = model.tokenizer
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [173, 174] == [len(tok) - 2, 1 + 173]
    ids, mask = model.tokenize(["a red circle", "word " * 60], "cpu")
    assert ids.shape == mask.shape == (2, 35)
    # First token [CLS], as the reference feeds it (no [ENC] swap); padded and truncated.
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert mask[0].sum() < 35 and ids[0, -1] == tok.pad_token_id and mask[1].sum() == 35


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_reward(TINY)
    save_reward(model, tmp_path / "r")
    again = load_reward(tmp_path / "r")
    assert again.reward_options == {"size": "tiny", "pretrained": False}
    images, prompts = _images(), ["a", "b"]
    torch.testing.assert_close(again(images, prompts), model(images, prompts))


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"options: unknown key\(s\) \['sise'\]"):
        build_reward({"name": "imagereward", "options": {"sise": "tiny"}})
    with pytest.raises(ConfigError, match="options.size='huge' must be one of"):
        build_reward({"name": "imagereward", "options": {"size": "huge"}})
    with pytest.raises(FileNotFoundError, match="options.tokenizer="):
        build_reward({"name": "imagereward", "options": {"size": "tiny", "tokenizer": "/no/x"}})


def test_freezing_70_percent_freezes_embeddings_and_leading_layers():
    cfg = RewardTrainConfig(kind="imagereward", model={"options": {"size": "tiny"}})
    cfg.freeze.text_fraction = cfg.freeze.vision_fraction = 0.7
    model, _, _ = build_model(cfg.validate())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.vision.embeddings.class_embedding" in frozen
    assert "backbone.text.embeddings.word_embeddings.weight" in frozen
    # int(0.7 * 2) = 1 of the tiny config's 2 layers in each encoder.
    assert any(n.startswith("backbone.vision.encoder.layers.0.") for n in frozen)
    assert any(n.startswith("backbone.text.encoder.layer.0.") for n in frozen)
    assert not any(".layers.1." in n or ".layer.1." in n or n.startswith("head") for n in frozen)


# --------------------------------------------------------------------------- ranked data


def _png(seed):
    arr = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def ranked_frame(n=6, bad=()):
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": f"a red circle {i}",
                "images": [_png(3 * i), _png(3 * i + 1), _png(3 * i + 2)],
                "ranking": [2, 1, 3],
            }
        )
    for i in bad:
        rows[i]["images"] = [b"not an image", _png(0), _png(1)]
    return pd.DataFrame(rows)


def test_ranked_pairs_follow_the_reference():
    pairs = ranked_pairs(torch.tensor([2.0, 1.0, 3.0, 1.0]))
    # Lower rank is better; the tie (images 1 and 3) gives no pair.
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (1, 0), (1, 2), (3, 0), (3, 2)]


def test_ranked_dataset_skips_and_counts_bad_rows(tmp_path):
    frame = ranked_frame(4, bad=(1,))
    frame.loc[2, "ranking"] = [1, 1, 1]  # no pair to learn from
    frame.to_parquet(tmp_path / "ranked.parquet")
    ds = RankedDataset(tmp_path / "ranked.parquet", image_size=16)
    batch = collate_ranked([ds[i] for i in range(4)])
    assert ds.num_skipped == 2
    assert batch["images"].shape == (6, 3, 16, 16) and len(batch["prompts"]) == 6
    # Row 3's images sit at 3..5: ranking [2, 1, 3] -> 4 > 3, 4 > 5, 3 > 5.
    assert sorted(map(tuple, batch["pairs"][3:].tolist())) == [(3, 5), (4, 3), (4, 5)]
    with pytest.raises(ConfigError, match="missing required column"):
        RankedDataset(frame.drop(columns=["ranking"]))


def test_triplets_train_on_three_pairs():
    cfg = RewardTrainConfig(kind="imagereward", model={"options": {"size": "tiny"}})
    model, _, _ = build_model(cfg.validate())
    model.eval()  # no dropout: the same logits twice
    images = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = {"images": images, "easy_prompt": ["a", "b"], "refine_prompt": ["a x", "b y"]}
    out = Objective(cfg, model)(batch)
    s = model.logits(images.reshape(6, 3, 32, 32), ["a"] * 3 + ["b"] * 3).view(2, 3)
    s1, s2, s3 = s.unbind(-1)
    want = torch.cat([F.softplus(s1 - s2), F.softplus(s2 - s3), F.softplus(s1 - s3)]).mean()
    torch.testing.assert_close(out["loss"], want)


def test_plain_training_on_ranked_data_learns(tmp_path):
    ranked_frame(16).to_parquet(tmp_path / "ranked.parquet")
    cfg = RewardTrainConfig(
        kind="imagereward",
        model={"options": {"size": "tiny"}},
        data=DataConfig(
            train=str(tmp_path / "ranked.parquet"),
            eval=str(tmp_path / "ranked.parquet"),
            image_size=32,
        ),
        optim=OptimConfig(lr=3e-3, batch_size=8, epochs=8),
        scaling=RewardScalingConfig(num_workers=1),
        eval_every=16,
    ).validate()
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    ds = make_dataset(cfg.data, "train")
    assert isinstance(ds, RankedDataset)
    loader = make_eval_loader(ds, 8)
    seen = []
    run_plain(cfg, model, Objective(cfg, model), ds, loader, on_step=lambda r, e: seen.append(r))
    assert len(seen) == 16 and "eval/pair_acc" in seen[-1].metrics
    # The same 16 prompts, ranked the same way: the model must fit them.
    acc = evaluate_model(model, loader)["pair_acc"]
    assert acc > 80, acc


def test_ranked_data_is_refused_for_other_kinds(tmp_path):
    ranked_frame(2).to_parquet(tmp_path / "ranked.parquet")
    cfg = RewardTrainConfig(kind="hp", data=DataConfig(train=str(tmp_path / "ranked.parquet")))
    with pytest.raises(ValueError, match="only kind=imagereward trains on them"):
        cfg.validate()


def test_example_config_loads_and_builds():
    from pathlib import Path

    from rlhf.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "reward_imagereward.yaml"
    assert path.read_text().startswith("#")
    cfg = load_config(RewardTrainConfig, path).validate()
    assert cfg.kind == "imagereward" and cfg.freeze.vision_fraction == 0.7
    model, _, _ = build_model(cfg)
    assert any(not p.requires_grad for p in model.parameters())


@pytest.mark.usefixtures("restore_console")
def test_eval_reward_cli_scores_triplets_with_imagereward(tmp_path, capsys):
    from rewards.synthetic import write_synthetic_parquet

    write_synthetic_parquet(tmp_path / "t.parquet", 4, seed=0, image_size=32)
    reward = "{name: imagereward, options: {size: tiny}}"
    args = ["eval-reward", str(tmp_path / "t.parquet"), "--reward", reward, "--batch-size", "2"]
    assert cli.main([*args, "--image-size", "32"]) == 0
    assert "| imagereward |" in capsys.readouterr().out
