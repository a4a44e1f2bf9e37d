"""DRaFT-K: reward fine-tuning by backpropagating through the last K sampling steps.

One step: sample with the flow-matching Euler sampler (steps ``0 .. N-K-1`` without
gradient, the last ``K`` with), decode to images in [0, 1], score them with the weighted
reward, and descend on ``-mean(sum_j w_j r_j) + anchor_weight * anchor``.

ReFL (``mode: refl``, ImageReward's Reward Feedback Learning): sample without gradient down to
a step ``i`` drawn from a late range, run that one step with gradient, decode the model's
prediction of the clean latent ``x_i - sigma_i * v``, and descend on
``refl_scale * mean(f(r))`` with ``f(r) = relu(refl_target - r)`` (the reference's
``relu(-r + 2)``) or ``-r``. In the same terms as DRaFT: the gradient step is ``N-K``.

The reward is applied through its image gradient: :func:`rewards.scoring.score_and_grad`
returns the scores and ``g = d(sum_b sum_j w_j r_j)/d images``, and the generator
backpropagates the surrogate ``-(images * g).sum() / B``, whose parameter gradient is that of
``-mean(weighted reward)``.
The same path serves a reward in this process and a reward server in another (which returns
``g``), and the reward's activations are freed before the generator's backward.

Rewards are ``{name: (weight, callable)}``; a callable maps ``images (B, 3, H, W)`` in [0, 1]
and ``B`` prompts to ``scores (B,)``, differentiable w.r.t. ``images``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from rewards.scoring import Components, Scores, score_and_grad
from rlhf.generator import FinetuneConfig, Generator, PromptEmbeds
from rlhf.sampler import (
    CFG_GRAD,
    SamplerConfig,
    initial_latents,
    rollout,
    schedule,
    seeded_generators,
)

log = logging.getLogger(__name__)

K_MODES = ("fixed", "uniform")
MODES = ("draft", "refl")
REFL_LOSSES = ("relu", "neg")


@dataclass
class DraftConfig:
    """DRaFT-K settings. Defaults: the paper's DRaFT-1 on SD3.5-Large-Turbo.

    - ``k``: gradient steps at the end of the chain; with ``k_mode: uniform`` K is drawn per
      step from ``[k_min, k]`` (the same K on every rank: it depends on ``seed`` and the step).
    - ``lv_n``: DRaFT-LV when > 0: sample without gradient to the end, re-noise the result
      ``lv_n`` times to the last step's noise level, and backpropagate through that one step
      (K is 1).
    - ``anchor_weight``: weight of ``mean ||v - v_base||^2`` over the gradient steps, ``v_base``
      from the LoRA-disabled transformer (needs ``finetune.mode: lora``).
    - ``reward_grad_clip``: clip each image's reward gradient to this L2 norm (None: off).
    - ``cfg_grad`` (classifier-free guidance only): ``full``, the exact gradient through both
      branches of the guided velocity (DRaFT's definition); ``cond``, the unconditional branch
      without gradient: saves memory, but an approximation of the reward's gradient.
    - ``mode``: ``draft`` (DRaFT-K) or ``refl`` (ReFL; ``k``, ``k_mode`` and ``k_min`` are
      then unused). ``refl_steps``: ``[lo, hi]``, the sampler-step indices (0-based, inclusive)
      the ReFL gradient step is drawn from, uniformly per training step (the same on every
      rank); null: the last quarter, ``[3N // 4, N - 1]``, as the reference's 30-39 of 40.
      ``refl_loss``: ``relu`` (``relu(refl_target - r)``) or ``neg`` (``-r``), scaled by
      ``refl_scale`` (the reference's ``grad_scale``), averaged over the batch. The paper's
      alternation with a pretraining loss is not implemented (nor in the released reference).
    """

    k: int = 1
    k_mode: str = "fixed"
    k_min: int = 1
    lv_n: int = 0
    anchor_weight: float = 0.0
    reward_grad_clip: float | None = None
    cfg_grad: str = "full"
    seed: int = 0
    mode: str = "draft"
    refl_steps: list[int] | None = None
    refl_loss: str = "relu"
    refl_target: float = 2.0
    refl_scale: float = 1e-3

    def validate(
        self,
        sampler: SamplerConfig | None = None,
        finetune: FinetuneConfig | None = None,
        path: str = "draft",
        sampler_path: str = "sampler",
        finetune_path: str = "finetune",
    ) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{path}.mode={self.mode!r} must be one of {MODES}")
        self._validate_refl(sampler, path, sampler_path)
        if self.k < 1:
            raise ValueError(f"{path}.k={self.k} must be >= 1")
        if self.k_mode not in K_MODES:
            raise ValueError(f"{path}.k_mode={self.k_mode!r} must be one of {K_MODES}")
        if self.k_mode == "uniform" and not 1 <= self.k_min <= self.k:
            raise ValueError(f"{path}.k_min={self.k_min} must be in [1, {path}.k={self.k}]")
        if self.lv_n < 0:
            raise ValueError(f"{path}.lv_n={self.lv_n} must be >= 0 (0: DRaFT-LV off)")
        if self.lv_n and (self.k != 1 or self.k_mode != "fixed"):
            raise ValueError(f"{path}.lv_n={self.lv_n} (DRaFT-LV) needs {path}.k=1, k_mode=fixed")
        if self.anchor_weight < 0:
            raise ValueError(f"{path}.anchor_weight={self.anchor_weight} must be >= 0")
        if self.cfg_grad not in CFG_GRAD:
            raise ValueError(f"{path}.cfg_grad={self.cfg_grad!r} must be one of {CFG_GRAD}")
        if self.reward_grad_clip is not None and self.reward_grad_clip <= 0:
            raise ValueError(f"{path}.reward_grad_clip={self.reward_grad_clip} must be > 0")
        if sampler is not None and self.mode == "draft" and self.k > sampler.steps:
            raise ValueError(f"{path}.k={self.k} must be <= {sampler_path}.steps={sampler.steps}")
        if finetune is not None and self.anchor_weight > 0 and finetune.mode != "lora":
            raise ValueError(
                f"{path}.anchor_weight={self.anchor_weight} needs {finetune_path}.mode=lora "
                "(the anchor is the LoRA-disabled model)"
            )

    def _validate_refl(self, sampler: SamplerConfig | None, path: str, sampler_path: str) -> None:
        if self.refl_loss not in REFL_LOSSES:
            raise ValueError(f"{path}.refl_loss={self.refl_loss!r} must be one of {REFL_LOSSES}")
        if self.refl_scale <= 0:
            raise ValueError(f"{path}.refl_scale={self.refl_scale} must be > 0")
        if self.mode == "refl" and self.lv_n:
            raise ValueError(f"{path}.lv_n={self.lv_n} (DRaFT-LV) needs {path}.mode=draft")
        r = self.refl_steps
        if r is None:
            return
        if len(r) != 2 or not 0 <= r[0] <= r[1]:
            raise ValueError(f"{path}.refl_steps={r} must be [lo, hi] with 0 <= lo <= hi")
        if sampler is not None and r[1] >= sampler.steps:
            raise ValueError(
                f"{path}.refl_steps={r}: hi={r[1]} must be < {sampler_path}.steps={sampler.steps} "
                "(0-based step indices)"
            )


def draw_k(cfg: DraftConfig, step: int) -> int:
    """K for training step ``step``: ``cfg.k``, or uniform in ``[k_min, k]`` seeded by
    ``(cfg.seed, step)`` so that every rank draws the same K."""
    if cfg.k_mode == "fixed":
        return cfg.k
    return random.Random(cfg.seed * 1_000_003 + step).randint(cfg.k_min, cfg.k)


def draw_refl_step(cfg: DraftConfig, steps: int, step: int) -> int:
    """ReFL's gradient step for training step ``step`` of an ``steps``-step sampler: uniform
    in ``cfg.refl_steps`` (default ``[3 * steps // 4, steps - 1]``), seeded by
    ``(cfg.seed, step)`` so that every rank draws the same one."""
    lo, hi = cfg.refl_steps or (3 * steps // 4, steps - 1)
    if not 0 <= lo <= hi < steps:
        raise ValueError(
            f"draft.refl_steps=[{lo}, {hi}] must lie in [0, sampler.steps-1={steps - 1}]"
        )
    return random.Random(cfg.seed * 1_000_003 + step).randint(lo, hi)


def reward_components(rewards: Mapping) -> Components:
    """Check ``{name: (weight, fn)}`` and make every weight a float."""
    if not isinstance(rewards, Mapping):
        raise ValueError(f"rewards: expected {{name: (weight, fn)}}, got {rewards!r}")
    out = dict(rewards)
    if not out:
        raise ValueError("rewards: no reward component given")
    for name, item in out.items():
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise ValueError(f"rewards[{name!r}] must be (weight, callable), got {item!r}")
    return {name: (float(w), fn) for name, (w, fn) in out.items()}


def reward_objective(total: torch.Tensor, cfg: DraftConfig) -> tuple[torch.Tensor, float]:
    """The loss on the weighted rewards ``total (B,)`` as ``(c (B,), loss)``: ``c_b = -B *
    dloss/dr_b``, so that weighting each image's reward gradient by ``c_b`` in
    :func:`surrogate_loss` gives the loss's parameter gradient.

    DRaFT: ``loss = -mean(r)``, ``c = 1``. ReFL: ``loss = refl_scale * mean(f(r))`` with
    ``f(r) = relu(refl_target - r)`` (``c = refl_scale * [r < refl_target]``, relu's
    derivative, 0 at the kink as in torch) or ``f(r) = -r`` (``c = refl_scale``).
    """
    r = total.detach().float()
    if cfg.mode == "draft":
        return torch.ones_like(r), -float(r.mean())
    if cfg.refl_loss == "neg":
        return torch.full_like(r, cfg.refl_scale), -cfg.refl_scale * float(r.mean())
    gap = cfg.refl_target - r
    return cfg.refl_scale * (gap > 0).float(), cfg.refl_scale * float(gap.clamp(min=0).mean())


def clip_image_grad(grad: torch.Tensor, max_norm: float | None) -> tuple[torch.Tensor, float]:
    """Scale each image's gradient down to L2 norm ``max_norm``; returns it and the mean norm
    before clipping."""
    norms = grad.flatten(1).norm(dim=1)
    if max_norm is not None:
        grad = grad * (max_norm / (norms + 1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
    return grad, float(norms.mean())


class _AdaptersDisabled:
    """Calls ``model`` with its LoRA adapters switched off: the anchor's reference model."""

    def __init__(self, model, module):
        self.model, self.module = model, module

    def __call__(self, **kwargs):
        self.module.disable_adapters()
        try:
            return self.model(**kwargs)
        finally:
            self.module.enable_adapters()


@dataclass
class Rollout:
    """``images (B', 3, H, W)`` in [0, 1] carrying the graph of the last K steps (ReFL: of
    step ``N-K`` and its x0 prediction); ``prompts`` (B' of them: each prompt ``lv_n`` times
    under DRaFT-LV); ``anchor`` scalar or None."""

    images: torch.Tensor
    prompts: list[str]
    anchor: torch.Tensor | None
    k: int


def rollout_images(
    model: Callable,
    gen: Generator,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerConfig,
    draft: DraftConfig,
    k: int,
) -> Rollout:
    """Sample ``len(prompts)`` images, differentiable through the last ``k`` steps and the
    decode; under ReFL (``draft.mode``), the decode of step ``N-k``'s x0 prediction,
    differentiable through that step. ``model`` is the transformer or a DeepSpeed engine
    around it."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; they must match")
    if not 1 <= k <= sampler.steps:
        raise ValueError(f"draft.k={k} must be in [1, sampler.steps={sampler.steps}]")
    cond: PromptEmbeds = gen.encode_prompts(
        prompts, sampler.guidance_scale, sampler.negative_prompt, sampler.max_sequence_length
    )
    generators = seeded_generators(seeds)
    x = initial_latents(gen, generators, sampler.height, sampler.width)
    timesteps, sigmas = schedule(
        gen.pipe.scheduler.config, sampler.steps, x.shape[-2:], gen.transformer.config.patch_size
    )
    reference = None
    if draft.anchor_weight > 0:
        reference = _AdaptersDisabled(model, getattr(model, "module", model))
    prompts = list(prompts)
    n = len(timesteps)
    if draft.lv_n:
        with torch.no_grad():
            x0 = rollout(model, x, cond, timesteps, sigmas, 0, sampler.guidance_scale).latents
        # Per-sample generators continue after the initial noise: deterministic per seed.
        noise = torch.cat(
            [torch.randn((draft.lv_n, *x.shape[1:]), generator=g) for g in generators]
        ).to(x.device, torch.float32)
        s = sigmas[n - 1].to(x.device)
        x = ((1 - s) * x0.float().repeat_interleave(draft.lv_n, 0) + s * noise).to(x.dtype)
        cond = cond.repeat(draft.lv_n)
        prompts = [p for p in prompts for _ in range(draft.lv_n)]
        out = rollout(
            model,
            x,
            cond,
            timesteps,
            sigmas,
            1,
            sampler.guidance_scale,
            reference,
            start=n - 1,
            cfg_grad=draft.cfg_grad,
        )
        k = 1
    else:
        out = rollout(
            model,
            x,
            cond,
            timesteps,
            sigmas,
            k,
            sampler.guidance_scale,
            reference,
            cfg_grad=draft.cfg_grad,
            predict_x0=draft.mode == "refl",
        )
    return Rollout(gen.decode(out.latents), prompts, out.anchor, k)


def surrogate_loss(
    ro: Rollout, image_grad: torch.Tensor, anchor_weight: float = 0.0
) -> torch.Tensor:
    """``-(images * g).sum() / B' + anchor_weight * anchor``: its parameter gradient is that of
    ``-mean(weighted reward) + anchor_weight * anchor``."""
    g = image_grad.to(ro.images.device, ro.images.dtype)
    loss = -(ro.images * g).sum() / ro.images.shape[0]
    if ro.anchor is not None and anchor_weight > 0:
        loss = loss + anchor_weight * ro.anchor
    return loss


ScoreFn = Callable[[torch.Tensor, list[str]], Scores]


def draft_step(
    engine,
    gen: Generator,
    rewards,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerConfig,
    draft: DraftConfig,
    step: int = 0,
    score_fn: ScoreFn | None = None,
) -> dict[str, float]:
    """One DRaFT-K (or ReFL, by ``draft.mode``) update on this rank's ``prompts`` (one seed
    each); returns metrics.

    ``engine``: a DeepSpeed engine around ``gen.transformer`` (or :class:`rlhf.engine.PlainEngine`);
    every rank of a data-parallel group calls this with its own prompts and seeds.
    ``rewards``: ``{name: (weight, fn)}`` (ignored when ``score_fn`` is given). ``score_fn(images, prompts) -> Scores`` with ``grad`` set replaces the in-process
    reward, e.g. by a call to reward servers.

    Metrics: ``loss``, ``reward`` (mean weighted), ``reward/<name>`` (mean of each component),
    ``anchor``, ``k`` (DRaFT) or ``refl_step`` (ReFL), ``image_grad_norm`` (mean, before
    clipping), ``grad_norm`` (if the engine reports it), ``time_s``.
    """
    t0 = time.perf_counter()
    if draft.mode == "refl":
        k = sampler.steps - draw_refl_step(draft, sampler.steps, step)
    else:
        k = draw_k(draft, step)
    ro = rollout_images(engine, gen, prompts, seeds, sampler, draft, k)
    if score_fn is None:
        components = reward_components(rewards)

        def score_fn(images, ps):
            return score_and_grad(components, images, ps)

    scores = score_fn(ro.images.detach(), ro.prompts)
    if scores.grad is None:
        raise ValueError("score_fn must return Scores with grad set")
    grad, grad_norm = clip_image_grad(scores.grad, draft.reward_grad_clip)
    coef, reward_loss = reward_objective(scores.total, draft)
    loss = surrogate_loss(ro, grad * coef.to(grad).view(-1, 1, 1, 1), draft.anchor_weight)
    engine.backward(loss)
    engine.step()
    anchor = float(ro.anchor.detach()) if ro.anchor is not None else 0.0
    metrics = {
        "loss": reward_loss + draft.anchor_weight * anchor,
        "reward": float(scores.total.mean()),
        **{f"reward/{k_}": float(v.mean()) for k_, v in scores.components.items()},
        "anchor": anchor,
        **({"refl_step": float(sampler.steps - k)} if draft.mode == "refl" else {"k": float(ro.k)}),
        "image_grad_norm": grad_norm,
        "time_s": time.perf_counter() - t0,
    }
    gn = getattr(engine, "get_global_grad_norm", lambda: None)()
    if gn is not None:
        metrics["grad_norm"] = float(gn)
    return metrics
