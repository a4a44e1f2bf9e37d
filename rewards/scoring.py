"""The one scoring primitive: weighted reward scores and their image gradient.

Every path that turns rewards into a training signal calls :func:`score_and_grad`: a reward
inside a generator worker, a :class:`~actors.reward_server.RewardServer` (per-sample weights,
because it batches requests of different weights together) and DRaFT-K in one process. The
caller finishes the backward pass with the gradient, e.g. ``images.backward(-grad)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
# A weight is one number, or one per sample ``(B,)``.
Weight = float | torch.Tensor
Components = Mapping[str, tuple[Weight, RewardFn]]


@dataclass
class Scores:
    """``total (B,)`` weighted sum, ``components`` name -> ``(B,)`` unweighted, and
    ``grad (B, 3, H, W)`` = d(sum of ``total``)/d images (None when not asked for)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    grad: torch.Tensor | None = None


def weighted(w: Weight) -> bool:
    """Whether a component with weight ``w`` enters the total (a weight of 0 does not: its
    scores are only logged, and a NaN among them cannot poison the total)."""
    return isinstance(w, torch.Tensor) or w != 0


def weighted_total(
    components: Mapping[str, tuple[Weight, object]], scores: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``sum_j w_j * scores_j`` over the weighted components, ``(B,)`` float32 (zeros when no
    weight is set)."""
    total = None
    for name, (w, _) in components.items():
        if weighted(w):
            s = scores[name].float()
            term = s * (w.to(s) if isinstance(w, torch.Tensor) else w)
            total = term if total is None else total + term
    if total is None:
        any_scores = next(iter(scores.values()))
        return torch.zeros(len(any_scores), device=any_scores.device)
    return total


def score_and_grad(
    components: Components, images: torch.Tensor, prompts: Sequence[str], grad: bool = True
) -> Scores:
    """Score ``images`` with every component and, with ``grad``, differentiate the weighted
    total with respect to the images.

    Args:
        components: name -> ``(weight, fn)``; ``fn(images, prompts)`` returns ``(B,)``
            scores differentiable w.r.t. ``images``; ``weight`` is a float or ``(B,)``.
        images: ``(B, 3, H, W)`` float in [0, 1], any device; never marked as requiring grad.
        prompts: ``B`` strings.
    Returns:
        :class:`Scores`: components float32 ``(B,)``; ``grad`` float32 ``(B, 3, H, W)``,
        ``d(sum_b sum_j w_j r_j(b)) / d(images)`` (zeros when every weight is 0). Reward
        parameters get no gradient; a zero-weight component is scored without one.
    """
    if not components:
        raise ValueError("rewards: no reward component given")
    prompts = list(prompts)
    x = images.detach().float().requires_grad_(grad)
    scores = {}
    # Without grad, inference mode: no autograd bookkeeping at all (a server's score path).
    with torch.inference_mode(not grad):
        for name, (w, fn) in components.items():
            with torch.set_grad_enabled(grad and weighted(w)):
                scores[name] = fn(x, prompts).float()
        total = weighted_total(components, scores)
        g = None
        if grad and any(weighted(w) for w, _ in components.values()):
            (g,) = torch.autograd.grad(total.sum(), x)
        elif grad:
            g = torch.zeros_like(x)
    return Scores(total.detach(), {k: v.detach() for k, v in scores.items()}, g)
