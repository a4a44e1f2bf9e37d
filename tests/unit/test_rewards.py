"""Reward models: gradients, checkpoint formats, registry, bad input."""

import textwrap

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from rewards.backbones import TINY_HF_CLIP_DIR, _features, register_model_configs
from rewards.builtin_rewards import list_rewards
from rewards.heads import MLPHead
from rewards.registry import RewardSpec, build_reward, load_reward, save_reward

PROMPTS = ["a red circle", "two blue squares", "a green triangle on the left"]
TINY = {"backbone": "tiny"}


def _spec(name, **kw):
    return {"name": name, "options": kw.pop("options", TINY), **kw}


@pytest.mark.parametrize("name", ["ict", "hp", "ict_hp", "clip", "aesthetic"])
def test_gradients_reach_images(name, images):
    reward = build_reward({"name": name, "options": TINY})
    x = images.clone().requires_grad_(True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def test_ict_is_cosine_of_normalised_features(images):
    r = build_reward(_spec("ict"))
    s = r(images, PROMPTS)
    assert (s.abs() <= 1 + 1e-5).all()
    f_i = r.backbone.encode_image(r.backbone.pixels(images))
    f_t = r.backbone.encode_text(PROMPTS)
    torch.testing.assert_close(s, torch.nn.functional.cosine_similarity(f_i, f_t))


def test_hp_is_image_only_and_in_unit_interval(images):
    r = build_reward(_spec("hp"))
    torch.nn.init.normal_(r.head.layers[-1].weight, std=1.0)
    a, b = r(images, PROMPTS), r(images, ["x", "y", "z"])
    torch.testing.assert_close(a, b)
    assert ((a > 0) & (a < 1)).all()


def test_ict_hp_is_product(images):
    r = build_reward(_spec("ict_hp"))
    torch.testing.assert_close(r(images, PROMPTS), r.ict(images, PROMPTS) * r.hp(images, PROMPTS))


def test_default_head_matches_imagereward_layout():
    head = MLPHead(1024)
    names = [n for n, _ in head.named_parameters()]
    assert names == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    dims = [(m.in_features, m.out_features) for m in head.layers if hasattr(m, "in_features")]
    assert dims == [(1024, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]


def _tiny_clipmodel(seed=1):
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig.from_pretrained(TINY_HF_CLIP_DIR)).eval()


def test_released_ict_format_loads_strictly(tmp_path, images):
    src = _tiny_clipmodel()
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    r = build_reward(
        {"name": "ict", "checkpoint": str(tmp_path), "options": {"backbone": "tiny-hf"}}
    )
    for k, v in src.state_dict().items():
        torch.testing.assert_close(r.backbone.model.state_dict()[k], v)
    # A stray key must not be dropped silently.
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected key"):
        build_reward(
            {"name": "ict", "checkpoint": str(tmp_path), "options": {"backbone": "tiny-hf"}}
        )
    sd.pop("extra.weight")
    sd.pop("logit_scale")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing key"):
        build_reward(
            {"name": "ict", "checkpoint": str(tmp_path), "options": {"backbone": "tiny-hf"}}
        )


def test_released_hp_format_loads(tmp_path, images):
    src = _tiny_clipmodel(2)
    head = MLPHead(64)
    torch.nn.init.normal_(head.layers[0].weight)
    (tmp_path / "hp_backbone").mkdir()
    (tmp_path / "hp_scorer").mkdir()
    torch.save(src.state_dict(), tmp_path / "hp_backbone" / "pytorch_model.bin")
    torch.save(head.state_dict(), tmp_path / "hp_scorer" / "mlp_pytorch_model.bin")
    r = build_reward(
        {"name": "hp", "checkpoint": str(tmp_path), "options": {"backbone": "tiny-hf"}}
    )
    pix = r.backbone.pixels(images)
    with torch.no_grad():
        expected = torch.sigmoid(head.eval()(_features(src.get_image_features(pixel_values=pix))))
        torch.testing.assert_close(r(images, PROMPTS), expected)


def test_pickscore_format_is_a_saved_clipmodel(tmp_path, images):
    src = _tiny_clipmodel(3)
    src.save_pretrained(tmp_path)
    r = build_reward({"name": "pickscore", "checkpoint": str(tmp_path)})
    with torch.no_grad():
        s = r(images, PROMPTS)
        cos = build_reward(
            {"name": "clip", "checkpoint": str(tmp_path), "options": {"backbone": "tiny-hf"}}
        )(images, PROMPTS)
    torch.testing.assert_close(s, cos * src.logit_scale.exp())


def test_hpsv2_format_wrapped_state_dict(tmp_path, images):
    register_model_configs()
    torch.manual_seed(4)
    src = open_clip.create_model("tiny-clip")
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "HPS_v2.pt")
    r = build_reward({"name": "hpsv2", "checkpoint": str(tmp_path / "HPS_v2.pt"), "options": TINY})
    for k, v in src.state_dict().items():
        torch.testing.assert_close(r.backbone.model.state_dict()[k], v)


def test_aesthetic_format_mlp_state_dict(tmp_path, images):
    head = MLPHead(64)
    torch.nn.init.normal_(head.layers[0].weight)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    r = build_reward(
        {
            "name": "aesthetic",
            "checkpoint": str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
            "options": TINY,
        }
    )
    torch.testing.assert_close(r.head.state_dict()["layers.0.weight"], head.layers[0].weight)


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    # Any non-tensor global would run code on unpickling; weights_only refuses it.
    torch.save({"state_dict": {"w": argparse.Namespace(x=1)}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        build_reward({"name": "hpsv2", "checkpoint": str(tmp_path / "evil.pt"), "options": TINY})


def test_own_format_round_trip(tmp_path, images):
    r = build_reward(_spec("ict_hp"))
    save_reward(r, tmp_path / "m")
    back = load_reward(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(images, PROMPTS), r(images, PROMPTS))
    # and through the registry, as a config's `checkpoint:` would
    via = build_reward({"name": "ict_hp", "checkpoint": str(tmp_path / "m")})
    with torch.no_grad():
        torch.testing.assert_close(via(images, PROMPTS), r(images, PROMPTS))


def test_import_path_reward(tmp_path, monkeypatch, images):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def brightness(scale=1.0):
                return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = build_reward({"name": "my_rewards:brightness", "options": {"scale": 2.0}})
    torch.testing.assert_close(r(images, PROMPTS), 2.0 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="no attribute"):
        build_reward({"name": "my_rewards:nothing"})
    with pytest.raises(ValueError, match="cannot import"):
        build_reward({"name": "no_such_module_xyz:f"})


def test_unknown_reward_and_bad_spec():
    with pytest.raises(ValueError, match="not a known reward"):
        build_reward({"name": "imagereward9000"})
    with pytest.raises(ValueError, match="placement"):
        RewardSpec.from_dict({"name": "ict", "placement": "moon"})
    with pytest.raises(ValueError, match="unknown key"):
        RewardSpec.from_dict({"name": "ict", "wieght": 1})
    with pytest.raises(FileNotFoundError):
        build_reward({"name": "ict", "checkpoint": "/no/such/dir", "options": TINY})
    assert {"ict", "hp", "ict_hp", "clip", "pickscore", "hpsv2", "aesthetic"} <= set(list_rewards())


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 4, 8, 8), "shape"),
        (torch.rand(3, 8, 8), "shape"),
        (torch.rand(2, 3, 8, 8) * 255, r"\[0, 1\]"),
        (torch.randint(0, 2, (2, 3, 8, 8)), "float"),
    ],
)
def test_bad_images_rejected(bad, match):
    r = build_reward(_spec("ict"))
    with pytest.raises(ValueError, match=match):
        r(bad, PROMPTS[: bad.shape[0]] if bad.dim() == 4 else PROMPTS)


def test_prompt_count_must_match(images):
    r = build_reward(_spec("ict"))
    with pytest.raises(ValueError, match="prompts"):
        r(images, PROMPTS[:2])
    with pytest.raises(ValueError, match="single string"):
        r(images[:1], "a red circle")
