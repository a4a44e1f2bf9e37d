"""The MLP score head shared by HP and the LAION aesthetic predictor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# ImageReward's activation-free head, which the ICT/HP reference and the LAION aesthetic
# predictor both use: dim -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts 0.2, 0.2, 0.1.
DEFAULT_HIDDEN = (1024, 128, 64, 16)
DEFAULT_DROPOUT = (0.2, 0.2, 0.1, 0.0)


class MLPHead(nn.Module):
    """``features (B, D) -> logits (B,)``.

    Layers are laid out in one ``nn.Sequential`` named ``layers`` (Linear, then Dropout where
    its rate is > 0) so that with the defaults the parameter names are exactly those of the
    released checkpoints: ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = DEFAULT_HIDDEN,
        dropout: Sequence[float] = DEFAULT_DROPOUT,
        activation: str | None = None,
    ):
        super().__init__()
        hidden, dropout = list(hidden), list(dropout)
        if len(dropout) != len(hidden):
            raise ValueError(
                f"head.dropout has {len(dropout)} entries but head.hidden has {len(hidden)}"
            )
        acts = {None: None, "none": None, "gelu": nn.GELU, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"head.activation={activation!r} must be one of none, gelu, relu")
        layers: list[nn.Module] = []
        dim = in_dim
        for h, p in zip(hidden, dropout):
            layers.append(nn.Linear(dim, h))
            if acts[activation] is not None:
                layers.append(acts[activation]())
            if p > 0:
                layers.append(nn.Dropout(p))
            dim = h
        layers.append(nn.Linear(dim, 1))
        self.layers = nn.Sequential(*layers)
        for name, p in self.layers.named_parameters():
            # The reference's init: small normal weights keep the initial logits near 0.
            if name.endswith("weight"):
                nn.init.normal_(p, std=1.0 / (in_dim + 1))
            else:
                nn.init.zeros_(p)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)
