import math

import pytest
import torch
import torch.nn.functional as F

from rewards.evaluate import format_table, preference_accuracy
from rewards.labels import fill_labels, labels_from_cosines, rule_labels, thresholded
from rewards.losses import hp_loss, ict_hp_loss, ict_loss, negative_weights


def test_thresholded_labels_hand_computed():
    labels = labels_from_cosines(
        torch.tensor([0.2, 0.35]), torch.tensor([0.25, 0.25]), torch.tensor([0.9, 0.5]), theta=0.3
    )
    e2 = 0.25 / 0.3
    expected = torch.tensor(
        [
            [0.2 / 0.3, e2, 0.2 / 0.3 * 0.9, e2 * 0.9],
            # C(I1)=min(0.35/0.3, 1)=1 is capped by E2 so that E1 <= E2.
            [e2, e2, e2 * 0.5, e2 * 0.5],
        ]
    )
    torch.testing.assert_close(labels, expected)
    assert thresholded(torch.tensor(0.6), 0.3).item() == 1.0
    with pytest.raises(ValueError, match="theta"):
        thresholded(torch.tensor(0.1), 0.0)


def test_labels_from_data_win_and_each_from_its_own_column():
    data = torch.tensor([[0.1, 0.2, 0.3, 0.4], [float("nan")] * 4])
    computed = torch.full((2, 4), 0.9)
    out = fill_labels(data, computed)
    torch.testing.assert_close(out[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(out[1], torch.full((4,), 0.9))
    with pytest.raises(ValueError, match="teacher"):
        fill_labels(data, None)


def test_rule_labels():
    e1, e2, r1, r2 = rule_labels("a red circle", "a red circle glossy", e1=0.5, e2=0.8)
    assert (e1, e2) == (0.5, 0.8)
    assert r1 == pytest.approx(0.5 * 3 / 4) and r2 == pytest.approx(0.8 * 3 / 4)


def test_hp_margin_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.5, 0.6], [1.0, 0.0, 0.0]])
    out = hp_loss(logits, margin=0.3)
    assert out["hp_21"].item() == pytest.approx((0.0 + 1.3) / 2)
    assert out["hp_32"].item() == pytest.approx((0.2 + 0.3) / 2)
    assert out["loss"].item() == pytest.approx(0.65 + 0.25)


def test_ict_loss_positives_hand_computed():
    easy = torch.tensor([[1.0, 0.0]])
    ref = torch.tensor([[0.0, 1.0]])
    imgs = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
    labels = torch.tensor([[0.5, 0.6, 0.2, 0.3]])
    out = ict_loss(easy, ref, imgs, labels)
    # easy cosines (1, .6, 0) vs (.5, .6, 1); refined (0, .8, 1) vs (.2, .3, 1)
    assert out["ict_easy"].item() == pytest.approx(1.25 / 3)
    assert out["ict_refine"].item() == pytest.approx(0.29 / 3)
    assert out["ict_neg"].item() == 0.0
    assert out["loss"].item() == pytest.approx(1.54 / 3)


def test_ict_loss_in_batch_negatives_weighted_on_scaled_logits():
    easy = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ref = easy.clone()
    # triplet 0's images all equal e0, triplet 1's all e1 -> off-diagonal cosines are 0 except
    # we tilt triplet 1's images to give prompt 0 a cosine of 0.3 with them.
    c, s = 0.3, math.sqrt(1 - 0.09)
    imgs = torch.tensor([[[1.0, 0.0]] * 3, [[c, s]] * 3])
    labels = torch.ones(2, 4)
    out = ict_loss(easy, ref, imgs, labels, neg_weight=0.5, neg_scale=20.0)
    # negatives per prompt kind: (prompt0, triplet1) cos .3 x3 images, (prompt1, triplet0) cos 0 x3
    w = 1 / (1 + math.exp(20 * (abs(20 * 0.3) - 6)))  # = 0.5 exactly at the threshold
    per_kind = (3 * w * 0.09 + 3 * 1.0 * 0.0) / 6
    assert out["ict_neg"].item() == pytest.approx(2 * per_kind, rel=1e-5)
    assert w == pytest.approx(0.5)
    # the reference applied the weight to raw cosines: there it would always be ~1
    assert negative_weights(torch.tensor(0.3), scale=1.0).item() == pytest.approx(1.0)
    assert negative_weights(torch.tensor(0.5), scale=20.0).item() < 1e-6


def test_ict_hp_loss_uses_softmax_of_hp_over_triplet():
    cos = torch.tensor([[0.5, 0.5, 0.5]])
    hp = torch.tensor([[0.0, 0.0, 0.0]])  # softmax = 1/3 each -> all products equal
    out = ict_hp_loss(cos, hp, margin=0.3)
    assert out["loss"].item() == pytest.approx(0.6)


def test_ict_hp_loss_is_a_batch_sum_as_the_reference():
    # The reference: margin_ranking_loss(s2, s1, 1, reduction="none").sum() + same for (s3, s2),
    # with s = ICT cosine * softmax(HP logits over the triplet).
    g = torch.Generator().manual_seed(0)
    cos, hp = torch.rand(8, 3, generator=g), torch.randn(8, 3, generator=g)
    s1, s2, s3 = (cos * torch.softmax(hp, -1)).unbind(-1)
    one = torch.ones(8)
    ref = F.margin_ranking_loss(s2, s1, one, margin=0.3, reduction="none").sum()
    ref = ref + F.margin_ranking_loss(s3, s2, one, margin=0.3, reduction="none").sum()
    out = ict_hp_loss(cos, hp, margin=0.3)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
    # twice the triplets, twice the loss: a sum, not a mean
    assert ict_hp_loss(cos.repeat(2, 1), hp.repeat(2, 1))["loss"].item() == pytest.approx(
        2 * ref.item(), rel=1e-6
    )


def test_preference_accuracy_strict_ties_wrong():
    scores = torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    acc = preference_accuracy(scores)
    assert acc["I2>I1"] == pytest.approx(100 / 3)
    assert acc["I3>I2"] == pytest.approx(200 / 3)
    assert acc["I3>I1"] == pytest.approx(200 / 3)
    assert acc["mean"] == pytest.approx(500 / 9)
    assert "| r | 55.56 | 33.33 | 66.67 | 66.67 |" in format_table({"r": acc})
    with pytest.raises(ValueError, match="shape"):
        preference_accuracy(torch.zeros(3, 2))


def test_pairwise_loss_is_pickscore_cross_entropy_on_the_winner():
    from rewards.losses import pairwise_loss

    s1, s2 = torch.tensor([1.0, 3.0, -2.0]), torch.tensor([2.0, 0.5, -2.0])
    want = F.cross_entropy(torch.stack([s1, s2], -1), torch.ones(3, dtype=torch.long))
    out = pairwise_loss(s1, s2)
    torch.testing.assert_close(out["loss"], want)
    assert out["pair_acc"] == pytest.approx(1 / 3)


def test_pickscore_kind_trains_on_i2_over_i1_only():
    from rewards.objective import Objective, build_model
    from rlhf.reward_run_config import RewardTrainConfig

    cfg = RewardTrainConfig(kind="pickscore", model={"options": {"backbone": "tiny"}}).validate()
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 3, 32, 32, generator=g)
    prompts = ["a red circle", "two blue squares", "a green star", "one yellow cube"]
    batch = {"images": images, "easy_prompt": prompts, "refine_prompt": prompts}
    out = Objective(cfg, model)(batch)
    with torch.no_grad():
        s1, s2 = model.score(images[:, 0], prompts), model.score(images[:, 1], prompts)
    torch.testing.assert_close(out["loss"].detach(), F.softplus(s1 - s2).mean())
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # I3 takes no part: changing it changes nothing.
    images2 = images.clone()
    images2[:, 2] = 0.5
    out2 = Objective(cfg, model)({**batch, "images": images2})
    torch.testing.assert_close(out2["loss"].detach(), out["loss"].detach())
