"""The scoring primitive and the reward handles, against hand-written references: closed-form
gradients of a toy reward, and plain autograd through a tiny real reward."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rewards.handles import LocalReward, RewardHandle, build_handles, score_handles
from rewards.registry import RewardSpec, build_reward
from rewards.scoring import score_and_grad

PROMPTS = ["a red circle", "two blue squares", "a green triangle on the left"]
TINY = {"backbone": "tiny"}


def _square_mean(x, prompts):
    """A toy reward with a closed-form gradient: mean(x^2) per image, d/dx = 2x / (3HW)."""
    assert len(prompts) == len(x)
    return x.square().mean(dim=(1, 2, 3))


def _square_mean_grad(x):
    return 2 * x / x[0].numel()


def _tiny(name):
    torch.manual_seed(0)
    return build_reward({"name": name, "options": TINY}).eval().requires_grad_(False)


def test_weighted_total_and_image_gradient_in_closed_form(images):
    a, b = 0.5, -2.0
    # The second reward is the first of 1 - x: its gradient flips sign.
    s = score_and_grad(
        {"sq": (a, _square_mean), "flip": (b, lambda x, p: _square_mean(1 - x, p))},
        images,
        PROMPTS,
    )
    sq, flip = _square_mean(images, PROMPTS), _square_mean(1 - images, PROMPTS)
    torch.testing.assert_close(s.components["sq"], sq)
    torch.testing.assert_close(s.components["flip"], flip)
    torch.testing.assert_close(s.total, a * sq + b * flip)
    want = a * _square_mean_grad(images) - b * _square_mean_grad(1 - images)
    torch.testing.assert_close(s.grad, want)
    assert not images.requires_grad and s.total.grad_fn is None


def test_per_sample_weights_scale_each_image_gradient(images):
    w = torch.tensor([1.0, -0.5, 3.0])
    s = score_and_grad({"sq": (w, _square_mean)}, images, PROMPTS)
    torch.testing.assert_close(s.total, w * _square_mean(images, PROMPTS))
    torch.testing.assert_close(s.grad, w.view(-1, 1, 1, 1) * _square_mean_grad(images))


def test_real_reward_gradient_is_plain_autograd_and_reward_gets_none(images):
    ict, hp = _tiny("ict"), _tiny("hp")
    ict.requires_grad_(True)  # even a trainable reward gets no parameter gradient
    s = score_and_grad({"ict": (0.7, ict), "hp": (1.5, hp)}, images, PROMPTS)
    x = images.clone().requires_grad_(True)
    total = 0.7 * ict(x, PROMPTS) + 1.5 * hp(x, PROMPTS)
    (want,) = torch.autograd.grad(total.sum(), x)
    torch.testing.assert_close(s.total, total.detach())
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-7)
    assert s.grad.abs().sum() > 0
    assert all(p.grad is None for p in ict.parameters())


def test_zero_weight_is_scored_without_gradient_and_kept_out_of_the_total(images):
    seen = {}

    def nan_reward(x, prompts):
        seen["grad_enabled"] = torch.is_grad_enabled()
        return torch.full((len(x),), float("nan"))

    s = score_and_grad({"sq": (2.0, _square_mean), "logged": (0.0, nan_reward)}, images, PROMPTS)
    assert seen["grad_enabled"] is False
    assert s.components["logged"].isnan().all()
    torch.testing.assert_close(s.total, 2.0 * _square_mean(images, PROMPTS))
    torch.testing.assert_close(s.grad, 2.0 * _square_mean_grad(images))
    only_zero = score_and_grad({"logged": (0.0, nan_reward)}, images, PROMPTS)
    assert only_zero.total.eq(0).all() and only_zero.grad.eq(0).all()


def test_without_grad_the_same_scores_and_no_gradient(images):
    comps = {"sq": (0.5, _square_mean)}
    s = score_and_grad(comps, images, PROMPTS, grad=False)
    assert s.grad is None
    torch.testing.assert_close(s.total, score_and_grad(comps, images, PROMPTS).total)
    with pytest.raises(ValueError, match="no reward component"):
        score_and_grad({}, images, PROMPTS)


def test_local_handle_weights_by_its_spec_and_keeps_the_images_dtype(images):
    ict = _tiny("ict")
    h = LocalReward(RewardSpec("ict", weight=-1.5), ict)
    assert isinstance(h, RewardHandle) and h.in_process and (h.key, h.weight) == ("ict", -1.5)
    x = images.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(-1.5 * ict(x, PROMPTS).sum(), x)
    s, g = h.score_and_grad(images, PROMPTS)
    torch.testing.assert_close(s, ict(images, PROMPTS))
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.score_and_grad(images, PROMPTS, 2.0)[1], want * (2.0 / -1.5))
    assert h.score_and_grad(images.double(), PROMPTS)[1].dtype == torch.float64
    torch.testing.assert_close(h.score(images, PROMPTS), s)
    assert h.info()["placement"] == "colocated"
    with pytest.raises(ValueError, match="needs prompts"):
        h.score(images, None)
    # An image-only reward takes no prompts, as a server does.
    hp = LocalReward(RewardSpec("hp"), _tiny("hp"))
    torch.testing.assert_close(hp.score(images, None), hp.score(images, PROMPTS))


def test_score_handles_sums_every_placement_and_runs_remote_ones_in_the_pool(images):
    ict, hp, clip = _tiny("ict"), _tiny("hp"), _tiny("clip")
    remote = LocalReward(RewardSpec("hp", weight=2.0), hp)
    remote.in_process = False  # stands in for a server's client: called from the pool
    threads = {}
    score_and_grad_of = remote.score_and_grad

    def record(*args):
        threads["hp"] = threading.current_thread().name
        return score_and_grad_of(*args)

    remote.score_and_grad = record
    handles = [
        LocalReward(RewardSpec("ict", weight=0.5), ict),
        remote,
        LocalReward(RewardSpec("clip", weight=0.0), clip),  # logged, not optimised
    ]
    with ThreadPoolExecutor(2, thread_name_prefix="reward-call") as pool:
        s = score_handles(handles, images, PROMPTS, pool=pool)
        e = score_handles(handles, images, PROMPTS, grad=False, pool=pool)
    assert threads["hp"].startswith("reward-call")
    x = images.clone().requires_grad_(True)
    total = 0.5 * ict(x, PROMPTS) + 2.0 * hp(x, PROMPTS)
    (want,) = torch.autograd.grad(total.sum(), x)
    assert list(s.components) == ["ict", "hp", "clip"]
    torch.testing.assert_close(s.components["clip"], clip(images, PROMPTS))
    torch.testing.assert_close(s.total, total.detach())
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-7)
    assert e.grad is None
    torch.testing.assert_close(e.total, s.total)


def test_build_handles_seeds_colocated_rewards_and_takes_servers_by_key():
    specs = [RewardSpec("ict", options=TINY), RewardSpec("hp", options=TINY, placement="server")]
    server = LocalReward(specs[1], _tiny("hp"))
    a = build_handles(specs, {"hp": server}, "cpu", seed=3)
    b = build_handles(specs[:1], {}, "cpu", seed=3)
    assert a[1] is server and isinstance(a[0], LocalReward)
    for p, q in zip(a[0].model.parameters(), b[0].model.parameters(), strict=True):
        assert torch.equal(p, q) and not p.requires_grad
    with pytest.raises(ValueError, match="'hp' has placement: server but no server"):
        build_handles(specs, {}, "cpu", seed=3)
