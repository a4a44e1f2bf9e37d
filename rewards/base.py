"""The reward interface shared by every reward model.

A reward maps ``images`` of shape ``(B, 3, H, W)`` (float, values in [0, 1], any H and W)
and ``prompts`` (a sequence of ``B`` strings) to ``scores`` of shape ``(B,)``. Every step of
pre-processing (resize, centre crop, normalise) runs in torch, so the scores are
differentiable with respect to ``images``; no PIL is involved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A little slack for values that rounding puts just outside [0, 1].
_RANGE_TOL = 1e-3


def check_images(images: torch.Tensor, prompts: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` unless ``images`` is a float ``(B, 3, H, W)`` tensor in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"images must have values in [0, 1], got range [{lo:.3f}, {hi:.3f}]")
    if prompts is not None:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, not a single string")
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"got {images.shape[0]} images but {len(prompts)} prompts; they must match"
            )


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased), centre crop, normalise.

    Args:
        images: ``(B, 3, H, W)`` float in [0, 1].
    Returns:
        ``(B, 3, size, size)`` normalised pixels, differentiable w.r.t. ``images``.
    """
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(
            images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
        )
        top, left = (nh - size) // 2, (nw - size) // 2
        images = images[..., top : top + size, left : left + size]
    mean_t = images.new_tensor(mean).view(1, 3, 1, 1)
    std_t = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


class RewardModel(nn.Module):
    """Base class: ``forward(images, prompts) -> scores``.

    Subclasses implement :meth:`score`; :meth:`forward` validates the input first.
    ``uses_prompts`` is False for image-only rewards (HP, aesthetic).
    """

    uses_prompts: bool = True

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Args: images ``(B, 3, H, W)`` float in [0, 1]; prompts ``B`` strings.
        Returns: scores ``(B,)``."""
        check_images(images, prompts)
        if images.shape[0] == 0:
            # A batch whose every row was unreadable (B = 0, H = W = 0): nothing to score.
            return images.new_zeros(0)
        return self.score(images, list(prompts))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError
