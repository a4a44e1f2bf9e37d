"""The flow-matching Euler sampler of SD3/SD3.5, differentiable in its last K steps.

Timesteps and sigmas come from diffusers' ``FlowMatchEulerDiscreteScheduler`` configured
from the model's own scheduler config (shift 3.0 for SD3.5, dynamic shifting where the
config asks for it), so that sampling without gradient reproduces
``StableDiffusion3Pipeline`` for the same prompts and seeds. The Euler update
``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v`` runs here, in fp32 like the scheduler, so
that gradients flow through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf.generator import Generator, PromptEmbeds


@dataclass
class SamplerConfig:
    """Sampling settings. Defaults: SD3.5-Large-Turbo as the paper runs it (4 steps, no
    classifier-free guidance, 1024 px). ``guidance_scale > 1`` turns CFG on, with
    ``negative_prompt`` for the unconditional branch."""

    steps: int = 4
    guidance_scale: float = 0.0
    height: int = 1024
    width: int = 1024
    max_sequence_length: int = 256
    negative_prompt: str = ""

    def validate(self, path: str = "sampler") -> None:
        if self.steps < 1:
            raise ValueError(f"{path}.steps={self.steps} must be >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"{path}.guidance_scale={self.guidance_scale} must be >= 0")
        for key in ("height", "width"):
            v = getattr(self, key)
            if v < 8 or v % 8:
                raise ValueError(f"{path}.{key}={v} must be a positive multiple of 8")
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"{path}.max_sequence_length={self.max_sequence_length} must be in [1, 512]"
            )


def schedule(scheduler_config, steps: int, latent_hw: tuple[int, int], patch_size: int):
    """``(timesteps (N,), sigmas (N+1,))`` exactly as the diffusers scheduler sets them.

    ``sigmas[-1] == 0``; ``latent_hw`` and ``patch_size`` feed the resolution-dependent
    shift of configs with ``use_dynamic_shifting`` (computed as the pipeline does).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift,
    )

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    kwargs = {}
    if sched.config.get("use_dynamic_shifting", False):
        h, w = latent_hw
        kwargs["mu"] = calculate_shift(
            (h // patch_size) * (w // patch_size),
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.16),
        )
    sched.set_timesteps(steps, device="cpu", **kwargs)
    return sched.timesteps.clone(), sched.sigmas.clone()


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per sample: a sample's noise depends on its seed only,
    so ``2 ranks x B`` and ``1 rank x 2B`` draw the same noise for the same seeds."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_latents(
    gen: Generator,
    generators: list[torch.Generator],
    height: int,
    width: int,
) -> torch.Tensor:
    """``(B, C, h, w)`` standard normal latents, drawn as the pipeline draws them."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (len(generators), *gen.latent_shape(height, width))
    return randn_tensor(shape, generator=generators, device=gen.device, dtype=gen.dtype)


CFG_GRAD = ("full", "cond")


def velocity(
    model: Callable,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: PromptEmbeds,
    guidance_scale: float,
    cfg_grad: str = "full",
) -> torch.Tensor:
    """The model's velocity ``v (B, C, h, w)`` at timestep ``t``, with CFG if
    ``guidance_scale > 1``: ``v_u + guidance_scale * (v_c - v_u)``.

    ``cfg_grad`` (with gradient enabled): ``full`` backpropagates through both branches, the
    exact gradient of the guided sample (DRaFT's definition); ``cond`` runs the unconditional
    branch without gradient, which saves its activations but is an approximation (the
    gradient misses the ``(1 - guidance_scale) * dv_u`` term).
    """
    if cfg_grad not in CFG_GRAD:
        raise ValueError(f"cfg_grad={cfg_grad!r} must be one of {CFG_GRAD}")

    def call(x_, embeds, pooled):
        return model(
            hidden_states=x_,
            timestep=t.to(x_.device).expand(x_.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    if guidance_scale <= 1:
        return call(x, cond.embeds, cond.pooled)
    if cfg_grad == "full" or not torch.is_grad_enabled():
        # Batched like the pipeline, so no-grad sampling matches it bit for bit.
        both = call(
            torch.cat([x, x]),
            torch.cat([cond.neg_embeds, cond.embeds]),
            torch.cat([cond.neg_pooled, cond.pooled]),
        )
        v_u, v_c = both.chunk(2)
    else:
        with torch.no_grad():
            v_u = call(x, cond.neg_embeds, cond.neg_pooled)
        v_c = call(x, cond.embeds, cond.pooled)
    return v_u + guidance_scale * (v_c - v_u)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """``x + (sigma_next - sigma) * v`` in fp32, cast back to ``v``'s dtype (as the
    scheduler does)."""
    dt = (sigma_next - sigma).to(x.device)
    return (x.float() + dt * v).to(v.dtype)


@dataclass
class RolloutResult:
    """``latents (B, C, h, w)`` after the last step (carrying the graph of the last K steps),
    or the x0 prediction of step ``N-K`` (``predict_x0``);
    ``anchor``: mean squared difference of the velocity to the LoRA-disabled model over the
    gradient steps (a scalar), or None."""

    latents: torch.Tensor
    anchor: torch.Tensor | None = None


def rollout(
    model: Callable,
    latents: torch.Tensor,
    cond: PromptEmbeds,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    k: int,
    guidance_scale: float = 0.0,
    base_velocity: Callable | None = None,
    start: int = 0,
    cfg_grad: str = "full",
    predict_x0: bool = False,
) -> RolloutResult:
    """Euler steps ``start .. N-1``; the first ``N-K-start`` under ``torch.no_grad()``, the
    last ``K`` with gradient (if grad mode is on). The latent entering step ``N-K`` is a
    detached leaf, so the earlier steps contribute nothing to any gradient. ``cfg_grad``: see
    :func:`velocity`.

    ``base_velocity``: the reference model for the anchor penalty, called like ``model``
    (same keyword arguments, same conditioning and guidance), always without gradient.

    ``predict_x0`` (ReFL): stop at step ``i = N-K`` and return the model's prediction of the
    clean latent from it, ``x_i - sigma_i * v`` (fp32, cast back to ``v``'s dtype), instead of
    stepping on; it carries the graph of that one step.
    """
    n = len(timesteps)
    if not 0 <= k <= n - start:
        raise ValueError(f"k={k} must be in [0, {n - start}] for {n - start} remaining steps")
    if predict_x0 and k == 0:
        raise ValueError("predict_x0 needs k >= 1: the step whose x0 prediction is returned")
    x = latents
    first_grad = n - k
    anchor_terms = []
    for i in range(start, n):
        t = timesteps[i]
        if i < first_grad:
            with torch.no_grad():
                v = velocity(model, x, t, cond, guidance_scale)
        else:
            if i == first_grad:
                x = x.detach()
            v = velocity(model, x, t, cond, guidance_scale, cfg_grad)
            if base_velocity is not None and torch.is_grad_enabled():
                with torch.no_grad():
                    v_ref = velocity(base_velocity, x.detach(), t, cond, guidance_scale)
                anchor_terms.append((v.float() - v_ref.float()).pow(2).mean())
            if predict_x0:
                x = (x.float() - sigmas[i].to(x.device) * v).to(v.dtype)
                break
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    anchor = torch.stack(anchor_terms).mean() if anchor_terms else None
    return RolloutResult(x, anchor)


@torch.no_grad()
def sample(
    model: Callable,
    gen: Generator,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cfg: SamplerConfig,
) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] (fp32), one per prompt and seed, no gradient.

    ``model`` is the transformer (or a DeepSpeed engine around it).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; they must match")
    cond = gen.encode_prompts(
        prompts, cfg.guidance_scale, cfg.negative_prompt, cfg.max_sequence_length
    )
    x = initial_latents(gen, seeded_generators(seeds), cfg.height, cfg.width)
    timesteps, sigmas = schedule(
        gen.pipe.scheduler.config, cfg.steps, x.shape[-2:], gen.transformer.config.patch_size
    )
    out = rollout(model, x, cond, timesteps, sigmas, 0, cfg.guidance_scale)
    return gen.decode(out.latents)
