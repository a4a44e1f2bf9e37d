"""ICT-HP = ICT x HP: how much of the prompt the image contains, times its preference."""

from __future__ import annotations

from rewards.base import RewardModel
from rewards.hp import HPReward
from rewards.ict import ClipCosineReward


class ICTHPReward(RewardModel):
    def __init__(self, ict: ClipCosineReward, hp: HPReward):
        super().__init__()
        self.ict = ict
        self.hp = hp

    def score(self, images, prompts):
        return self.ict.score(images, prompts) * self.hp.score(images, prompts)
