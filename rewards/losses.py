"""Training losses for ICT, HP and ICT-HP, with the reductions of the reference code.

ICT and HP take batch means; the ICT-HP term takes a batch *sum*, as the reference does
(``margin_ranking_loss(reduction="none").sum()``), so its weight relative to the HP term grows
with the batch. Each is computed over the global batch (the training objective all-gathers
its inputs), so a batch split across data-parallel workers gives the same gradient as one
worker with the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_weights(
    cos: torch.Tensor, scale: float, threshold: float = 6.0, sharpness: float = 20.0
):
    """``w = 1 / (1 + exp(sharpness * (|scale * cos| - threshold)))``.

    In-batch negatives whose scaled logit exceeds ``threshold`` are likely false negatives
    (another prompt the image also contains) and get weight ~0. The public reference applied
    this to raw cosines (|cos| <= 1 < threshold), where every weight is ~1 and the weighting
    does nothing; we apply it to ``scale * cos`` with ``scale`` a config value. The weights
    act as a gate and carry no gradient.
    """
    return torch.sigmoid(-sharpness * ((scale * cos).abs() - threshold))


def ict_loss(
    easy_text: torch.Tensor,
    refine_text: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    neg_weight: float = 0.5,
    neg_scale: float = 20.0,
    neg_threshold: float = 6.0,
    neg_sharpness: float = 20.0,
) -> dict[str, torch.Tensor]:
    """ICT loss (paper eq. for L_total = L_ICT + lambda * L_neg).

    Args:
        easy_text, refine_text: L2-normalised text features ``(B, D)``.
        images: L2-normalised image features ``(B, 3, D)`` for I1, I2, I3.
        labels: ``(B, 4)`` = [E1, E2, R1, R2]; E3 = R3 = 1.
    Returns:
        ``loss`` = MSE(cos(P_easy, I_k), E_k) + MSE(cos(P_ref, I_k), R_k)
                   + neg_weight * (mean_w(cos_neg^2) over both prompt kinds),
        where cos_neg are the in-batch pairs (prompt i, image of triplet j != i), each
        squared error to 0 multiplied by :func:`negative_weights`; plus its parts.
    """
    b = images.shape[0]
    one = labels.new_ones(b)
    e_target = torch.stack([labels[:, 0], labels[:, 1], one], -1)
    r_target = torch.stack([labels[:, 2], labels[:, 3], one], -1)
    # (B_text, B_img, 3): every prompt against every triplet's three images.
    cos_e = torch.einsum("td,ikd->tik", easy_text, images)
    cos_r = torch.einsum("td,ikd->tik", refine_text, images)
    idx = torch.arange(b, device=images.device)
    pos_e, pos_r = cos_e[idx, idx], cos_r[idx, idx]
    loss_e = F.mse_loss(pos_e, e_target)
    loss_r = F.mse_loss(pos_r, r_target)
    off = ~torch.eye(b, dtype=torch.bool, device=images.device)
    neg = torch.zeros((), device=images.device)
    if b > 1:
        for cos in (cos_e[off], cos_r[off]):
            w = negative_weights(cos.detach(), neg_scale, neg_threshold, neg_sharpness)
            neg = neg + (w * cos.pow(2)).mean()
    loss = loss_e + loss_r + neg_weight * neg
    return {"loss": loss, "ict_easy": loss_e, "ict_refine": loss_r, "ict_neg": neg}


def hp_loss(logits: torch.Tensor, margin: float = 0.3) -> dict[str, torch.Tensor]:
    """HP margin ranking loss on head logits ``(B, 3)`` for I1, I2, I3:
    ``max(0, margin - (s2 - s1)) + max(0, margin - (s3 - s2))``, batch mean."""
    s1, s2, s3 = logits.unbind(-1)
    l21 = F.relu(margin - (s2 - s1)).mean()
    l32 = F.relu(margin - (s3 - s2)).mean()
    return {"loss": l21 + l32, "hp_21": l21, "hp_32": l32}


def ict_hp_loss(ict_cos: torch.Tensor, hp_logits: torch.Tensor, margin: float = 0.3):
    """ICT-HP ranking loss, as the reference: ``p = softmax(hp_logits over the triplet)``,
    ``s_k = ict_cos_k * p_k``, then ``sum_b max(0, margin - (s2 - s1)) + max(0, margin -
    (s3 - s2))``: a batch **sum**, not a mean, so at a global batch of 256 this term weighs
    256 times what a mean would (the reference's choice, kept for its learning rates).

    Args: ict_cos ``(B, 3)`` (from a frozen ICT model), hp_logits ``(B, 3)``; B is the
    global batch.
    """
    s = ict_cos * torch.softmax(hp_logits, dim=-1)
    s1, s2, s3 = s.unbind(-1)
    l21 = F.relu(margin - (s2 - s1)).sum()
    l32 = F.relu(margin - (s3 - s2)).sum()
    return {"loss": l21 + l32, "icthp_21": l21, "icthp_32": l32}


def pairwise_loss(s1: torch.Tensor, s2: torch.Tensor) -> dict[str, torch.Tensor]:
    """PickScore's preference loss on the winner I2 over the loser I1 of one prompt: cross
    entropy of ``softmax([s1, s2])`` against I2, i.e. ``softplus(s1 - s2)``, batch mean.

    Args: s1, s2 ``(B,)`` scores (``logit_scale * cosine``) of I1 and I2."""
    loss = F.softplus(s1 - s2).mean()
    return {"loss": loss, "pair_acc": (s2 > s1).float().mean()}
