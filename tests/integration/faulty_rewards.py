"""Rewards for fault-injection tests, loaded by import path in the generator workers."""

import os

import torch
from torch import nn


class BrightnessReward(nn.Module):
    """Mean image brightness; NaN on the grad-enabled calls numbered in ``nan_calls`` (1-based,
    counted per process), to exercise the skip-and-stop rules; the process exits on those in
    ``exit_calls`` (a dying worker)."""

    def __init__(self, nan_calls=(), nan_after=None, exit_calls=()):
        super().__init__()
        self.nan_calls = set(nan_calls)
        self.nan_after = nan_after
        self.exit_calls = set(exit_calls)
        self.calls = 0

    def forward(self, images, prompts=None):
        out = images.mean(dim=(1, 2, 3))
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.exit_calls:
                os._exit(1)
            late = self.nan_after is not None and self.calls > self.nan_after
            if self.calls in self.nan_calls or late:
                out = out * float("nan")
        return out


def brightness(nan_calls=(), nan_after=None, exit_calls=(), **_):
    return BrightnessReward(nan_calls, nan_after, exit_calls)
