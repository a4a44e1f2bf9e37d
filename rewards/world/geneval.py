"""GenEval-mini as an evaluation reward: 1.0 where the judge finds that an image meets its
easy prompt (parsed back into the world's grammar), else 0.0.

It is an evaluator, never a training reward: it has no gradient, and a run config that puts
it among ``rewards`` (what is optimised) is refused. With evaluation prompts that cycle through
the six categories, its mean over them is GenEval's overall score (the mean of the category
scores).
"""

from __future__ import annotations

import torch

from rewards.base import RewardModel
from rewards.world.judge import Judge
from rewards.world.scenes import parse_prompt

NAME = "geneval_mini"


class GenEvalMini(RewardModel):
    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge
        # The judge's detector is a module of this reward (device moves, eval mode).
        self.detector = judge.model

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        specs = [parse_prompt(p) for p in prompts]
        dets = self.judge.detect(images.detach().float().cpu())
        ok = [self.judge.check(s, d) for s, d in zip(specs, dets)]
        return torch.tensor(ok, dtype=images.dtype, device=images.device)
