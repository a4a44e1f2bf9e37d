"""ICT labels E1, E2, R1, R2 (paper, Key Design 2).

    C(I, P)  = min(cos(I, P) / theta, 1)          (teacher CLIP cosine, thresholded)
    E3 = 1,  E2 = C(I2, P_easy),  E1 = min(C(I1, P_easy), E2)
    R3 = 1,  R2 = E2 * sim(P_easy, P_ref),  R1 = E1 * sim(P_easy, P_ref)

``sim`` is the teacher's text-text cosine. Labels present in the data win over computed ones.
"""

from __future__ import annotations

import torch

from rewards.ict import ClipCosineReward


def thresholded(cos: torch.Tensor, theta: float) -> torch.Tensor:
    """``C = min(cos / theta, 1)``."""
    if not theta > 0:
        raise ValueError(f"labels.theta={theta} must be > 0")
    return torch.clamp(cos / theta, max=1.0)


def labels_from_cosines(
    cos_i1: torch.Tensor, cos_i2: torch.Tensor, text_sim: torch.Tensor, theta: float
) -> torch.Tensor:
    """Args: teacher cosines ``(B,)`` of (I1, P_easy), (I2, P_easy) and (P_easy, P_ref).
    Returns: ``(B, 4)`` = [E1, E2, R1, R2]."""
    e2 = thresholded(cos_i2, theta)
    e1 = torch.minimum(thresholded(cos_i1, theta), e2)
    return torch.stack([e1, e2, e1 * text_sim, e2 * text_sim], dim=-1)


@torch.no_grad()
def teacher_labels(
    teacher: ClipCosineReward,
    images: torch.Tensor,
    easy_prompts: list[str],
    refine_prompts: list[str],
    theta: float,
) -> torch.Tensor:
    """Args: images ``(B, 3, 3, H, W)`` in [0, 1] (I1, I2, I3). Returns ``(B, 4)``."""
    text = teacher.text_features(list(easy_prompts) + list(refine_prompts))
    easy, ref = text.chunk(2)
    i1 = teacher.image_features(images[:, 0])
    i2 = teacher.image_features(images[:, 1])
    return labels_from_cosines(
        (i1 * easy).sum(-1), (i2 * easy).sum(-1), (easy * ref).sum(-1), theta
    )


def fill_labels(
    labels: torch.Tensor,
    computed: torch.Tensor | None,
) -> torch.Tensor:
    """Keep labels from the data where present (not NaN), else take the computed ones."""
    if computed is None:
        if torch.isnan(labels).any():
            raise ValueError(
                "triplets lack E1/E2/R1/R2 labels and no teacher is configured (set labels.teacher)"
            )
        return labels
    return torch.where(torch.isnan(labels), computed.to(labels), labels)


def word_overlap(a: str, b: str) -> float:
    """A stand-in for the teacher's text-text cosine: |words(a) & words(b)| / |words(b)|."""
    wa, wb = set(a.lower().replace(",", " ").split()), set(b.lower().replace(",", " ").split())
    return len(wa & wb) / max(len(wb), 1)


def rule_labels(
    easy_prompt: str, refine_prompt: str, e1: float = 0.6, e2: float = 0.9
) -> list[float]:
    """Labels for data whose I1 is known to violate its prompt and I2 to render it (the
    synthetic triplets), where no pretrained teacher exists: E1 and E2 fixed, and ``sim``
    taken as :func:`word_overlap`. Returns [E1, E2, R1, R2]."""
    sim = word_overlap(easy_prompt, refine_prompt)
    return [e1, e2, e1 * sim, e2 * sim]
