"""HP (High-Preference): an image-only reward.

HP score = sigmoid(head(f_image(I))) with a CLIP image tower and an MLP head (the ImageReward
head by default), trained with the margin ranking loss of :func:`rewards.losses.hp_loss`.
The image features enter the head unnormalised, as in the reference evaluation code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewards.backbones import ClipBackbone
from rewards.base import RewardModel
from rewards.heads import MLPHead


class HPReward(RewardModel):
    uses_prompts = False

    def __init__(self, backbone: ClipBackbone, head: dict | None = None, normalize: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = MLPHead(backbone.embed_dim, **(head or {}))
        self.normalize = normalize

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> pre-sigmoid head outputs ``(B,)`` (what the ranking
        loss trains)."""
        f = self.backbone.encode_image(self.backbone.pixels(images))
        return self.head(F.normalize(f, dim=-1) if self.normalize else f)

    def score(self, images, prompts):
        return torch.sigmoid(self.logits(images))


class AestheticReward(HPReward):
    """The LAION aesthetic predictor: the same MLP on L2-normalised CLIP ViT-L/14 image
    features, with the raw (unsquashed) head output as the score (about 1-10)."""

    def __init__(self, backbone: ClipBackbone, head: dict | None = None):
        super().__init__(backbone, head, normalize=True)

    def score(self, images, prompts):
        return self.logits(images)
