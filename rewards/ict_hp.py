"""ICT-HP = ICT x HP: how much of the prompt the image contains, times its preference."""

from __future__ import annotations

import torch

from rewards.base import RewardModel
from rewards.hp import HPReward
from rewards.ict import ClipCosineReward


class ICTHPReward(RewardModel):
    """The reward of one image: ``ICT cosine x sigmoid(HP logit)``, in [-1, 1]."""

    def __init__(self, ict: ClipCosineReward, hp: HPReward):
        super().__init__()
        self.ict = ict
        self.hp = hp

    def score(self, images, prompts):
        return self.ict.score(images, prompts) * self.hp.score(images, prompts)

    def triplet_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The reference's ICT-HP validation score, which needs the whole triplet:
        ``ICT cosine x softmax over (I1, I2, I3) of the HP logits``.

        Args: images ``(B, 3, 3, H, W)`` in [0, 1] (each triplet's I1, I2, I3); ``B`` prompts.
        Returns: ``(B, 3)``. Not :meth:`score` (``ICT x sigmoid(HP)`` of one image): the
        softmax couples the three images, so the two can rank a triplet differently.
        """
        b = images.shape[0]
        flat = images.reshape(b * 3, *images.shape[2:])
        triplet_prompts = [p for p in prompts for _ in range(3)]
        ict = self.ict(flat, triplet_prompts).view(b, 3)
        return ict * torch.softmax(self.hp.logits(flat).view(b, 3), dim=-1)
