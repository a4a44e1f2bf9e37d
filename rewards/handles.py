"""Reward handles: one interface for a reward computed here or in a reward server.

A generator worker holds one :class:`RewardHandle` per configured reward and scores through
:func:`score_handles`, whatever the placement: :class:`LocalReward` (``placement:
colocated``, the model in this process) or the server's client
(:class:`actors.reward_client.RewardClient`, ``placement: server``). Both compute with
:func:`rewards.scoring.score_and_grad`, so the gradients are the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Protocol, runtime_checkable

import torch

from rewards.base import RewardModel
from rewards.registry import RewardSpec, build_reward
from rewards.scoring import Scores, score_and_grad, weighted, weighted_total


@runtime_checkable
class RewardHandle(Protocol):
    """A reward to score with. ``key``: its name in logs; ``weight``: its weight in the
    optimised total; ``in_process``: it computes in the calling thread (False: elsewhere, so
    callers may wait on several at once)."""

    in_process: bool

    @property
    def key(self) -> str: ...

    @property
    def weight(self) -> float: ...

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """Args: images ``(B, 3, H, W)`` float in [0, 1]; prompts ``B`` strings.
        Returns: scores ``(B,)`` float32 on the images' device."""
        ...

    def score_and_grad(
        self, images: torch.Tensor, prompts: Sequence[str] | None, weight: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(scores (B,), grad (B, 3, H, W))``, ``grad = d(w * sum(scores)) /
        d(images)`` in the images' dtype and device, ``w`` = ``weight`` or the handle's."""
        ...

    def info(self) -> dict: ...


class SpecHandle:
    """What a handle reads from its :class:`RewardSpec` (``self.spec``): its key and weight."""

    spec: RewardSpec

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def weight(self) -> float:
        return self.spec.weight


class LocalReward(SpecHandle):
    """A reward model in this process (``placement: colocated``)."""

    in_process = True

    def __init__(self, spec: RewardSpec, model: RewardModel):
        self.spec = spec
        self.model = model

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        ps = _prompts(self, images, prompts)
        return score_and_grad({self.key: (1.0, self.model)}, images, ps, grad=False).components[
            self.key
        ]

    def score_and_grad(
        self, images: torch.Tensor, prompts: Sequence[str] | None, weight: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight if weight is None else float(weight)
        s = score_and_grad({self.key: (w, self.model)}, images, _prompts(self, images, prompts))
        return s.components[self.key], s.grad.to(images.dtype)

    def info(self) -> dict:
        p = next(iter(self.model.parameters()), None)
        return {
            "name": self.key,
            "reward": getattr(self.model, "reward_name", self.spec.name),
            "placement": "colocated",
            "device": str(p.device if p is not None else "cpu"),
            "pid": os.getpid(),
        }


def _prompts(handle: LocalReward, images: torch.Tensor, prompts) -> Sequence[str]:
    # An image-only reward may be called without prompts, as a server accepts.
    if prompts is None and not getattr(handle.model, "uses_prompts", True):
        return [""] * len(images)
    if prompts is None:
        raise ValueError(f"reward {handle.key!r} needs prompts")
    return prompts


def build_handles(
    specs: Sequence[RewardSpec],
    servers: Mapping[str, RewardHandle],
    device: str | torch.device,
    seed: int,
) -> list[RewardHandle]:
    """One handle per spec, in order: ``servers[spec.key]`` for ``placement: server``, else
    the reward built here on ``device``, frozen, after ``torch.manual_seed(seed)`` (so that a
    random-init tiny reward has a server's weights, which seeds the same way)."""
    handles: list[RewardHandle] = []
    for spec in specs:
        if spec.placement == "server":
            if spec.key not in servers:
                raise ValueError(f"reward {spec.key!r} has placement: server but no server")
            handles.append(servers[spec.key])
            continue
        torch.manual_seed(seed)
        model = build_reward(spec).eval().requires_grad_(False).to(device)
        handles.append(LocalReward(spec, model))
    return handles


def score_handles(
    handles: Sequence[RewardHandle],
    images: torch.Tensor,
    prompts: Sequence[str],
    grad: bool = True,
    pool: Executor | None = None,
) -> Scores:
    """Score ``images (B, 3, H, W)`` in [0, 1] with every handle; with ``grad``, also
    ``d(sum_j w_j sum(r_j)) / d(images)`` (float32) over the handles of nonzero weight.

    Handles that compute elsewhere (servers) are sent first (``start_call``, no thread) or run
    from ``pool`` threads, while the in-process ones compute here; each call keeps its
    client's retry-on-restart behaviour.
    """
    x = images.detach().float()
    prompts = list(prompts)

    def call(h: RewardHandle):
        if grad and weighted(h.weight):
            return h.score_and_grad(x, prompts)
        return h.score(x, prompts), None

    # Handles that can send a call without waiting do so first (no helper thread), then the
    # others go to the pool, the in-process ones compute here, and the sent ones are waited on.
    sent = {
        h.key: h.start_call(x, prompts, grad=grad and weighted(h.weight))
        for h in handles
        if not h.in_process and callable(getattr(h, "start_call", None))
    }
    remote = {
        h.key: pool.submit(call, h)
        for h in handles
        if pool is not None and not h.in_process and h.key not in sent
    }
    out = {h.key: call(h) for h in handles if h.key not in remote and h.key not in sent}
    out.update({k: f.result() for k, f in remote.items()})
    out.update({k: wait() for k, wait in sent.items()})
    comps = {h.key: out[h.key][0].float() for h in handles}
    total = weighted_total({h.key: (h.weight, h) for h in handles}, comps)
    g = None
    if grad:
        g = torch.zeros_like(x)
        for h in handles:
            if out[h.key][1] is not None:
                g += out[h.key][1].float()
    return Scores(total, comps, g)
