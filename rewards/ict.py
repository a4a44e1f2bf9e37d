"""ICT (Image-Contained-Text) and other CLIP-cosine rewards.

ICT score = cos(f_text(P), f_image(I)) of the L2-normalised features of a CLIP dual encoder
fine-tuned with :func:`rewards.losses.ict_loss`. The untrained model is CLIP score; PickScore
and HPSv2 are the same computation with other weights (PickScore multiplies by its learned
``logit_scale``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewards.backbones import BackboneSpec, ClipBackbone, build_backbone
from rewards.base import RewardModel


class ClipCosineReward(RewardModel):
    """``score = scale * cos(text, image)``; ``scale`` is 1, or the model's learned
    ``exp(logit_scale)`` when ``use_logit_scale`` (PickScore)."""

    def __init__(self, backbone: ClipBackbone, use_logit_scale: bool = False):
        super().__init__()
        self.backbone = backbone
        self.use_logit_scale = use_logit_scale

    @classmethod
    def from_spec(cls, backbone: BackboneSpec | dict | None, **kw) -> ClipCosineReward:
        return cls(build_backbone(backbone), **kw)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> L2-normalised ``(B, D)``."""
        return F.normalize(self.backbone.encode_image(self.backbone.pixels(images)), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """``B`` strings -> L2-normalised ``(B, D)``."""
        return F.normalize(self.backbone.encode_text(prompts), dim=-1)

    def score(self, images, prompts):
        cos = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        if self.use_logit_scale:
            cos = cos * self.backbone.model.logit_scale.exp()
        return cos
