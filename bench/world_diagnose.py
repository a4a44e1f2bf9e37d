"""Where the world SD3's samples lose their shapes (BENCHMARKS.md, section 0).

On renders of held-out easy prompts, GenEval-mini (the judge) of:
- the VAE's reconstructions, and of reconstructions from latents with added Gaussian noise;
- the transformer's one-step prediction of the clean latent from a render noised to ``t``
  (``x0 = x_t - t v``), decoded;
- which words the transformer reads: its flow-matching loss on renders of single-object colour
  prompts ("a purple triangle") with the true caption, the colour swapped, the shape swapped
  and the empty caption (a word it ignores costs nothing when swapped).

    python -m bench.world_diagnose [--world DIR] [--prompts 240] [--out FILE.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import world_main

NOISE = (0.0, 0.1, 0.2, 0.3, 0.5)
TIMES = (0.2, 0.4, 0.6, 0.8)


def run(world: str | None, prompts: int) -> dict:
    import numpy as np
    import torch

    from rewards import world as W
    from rewards.world import scenes as S
    from rewards.world.judge import Judge
    from rlhf.world import sd3
    from rlhf.world.sampling import eval_specs, load_world_generator

    torch.set_num_threads(1)
    root = Path(world) if world else W.ASSETS
    judge = Judge.load(root / "judge")
    gen = load_world_generator(root / "sd3")
    pipe, vae = gen.pipe, gen.pipe.vae
    specs = eval_specs(prompts)
    rng = np.random.default_rng(1)
    renders = np.stack([S.to_uint8(S.render(S.scene_for(s, rng), rng)) for s in specs])
    z = sd3.encode_latents(vae, renders)
    g = torch.Generator().manual_seed(0)

    out = {"suite": "world_diagnose", "prompts": prompts, "latent_std": float(z.std())}
    out["vae_latent_noise"] = {
        str(s): judge_latents(vae, judge, specs, z + s * torch.randn(z.shape, generator=g))
        for s in NOISE
    }
    out["one_step_x0"] = one_step_x0(pipe, judge, specs, z, g)
    out["caption_swap_loss"] = caption_swap_loss(pipe)
    return out


def caption_swap_loss(pipe, n: int = 192, times=(0.5, 0.7, 0.85, 0.95)) -> dict:
    """Per t, the unweighted flow-matching loss of ``pipe.transformer`` on renders of ``n``
    single-object colour prompts, under the true caption and three altered ones."""
    import dataclasses

    import numpy as np
    import torch

    from rewards.world import scenes as S
    from rlhf.world import sd3

    rng = np.random.default_rng(5)
    renders, captions = [], {"true": [], "colour_swapped": [], "shape_swapped": [], "empty": []}
    for _ in range(n):
        spec = S.sample_spec(rng, "colors")
        renders.append(S.to_uint8(S.render(S.scene_for(spec, rng), rng)))
        colour = rng.choice([c for c in S.COLOURS if c != spec.colours[0]])
        shape = rng.choice([c for c in S.SHAPES if c != spec.shapes[0]])
        captions["true"].append(spec.prompt())
        captions["colour_swapped"].append(dataclasses.replace(spec, colours=[colour]).prompt())
        captions["shape_swapped"].append(dataclasses.replace(spec, shapes=[shape]).prompt())
        captions["empty"].append("")
    z = sd3.encode_latents(pipe.vae, np.stack(renders))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    cond = {k: sd3._encode(pipe, v, 1) for k, v in captions.items()}
    out = {}
    for t in times:
        xt = (1 - t) * z + t * noise
        out[str(t)] = {
            name: round(float((velocity(pipe, xt, t, e, p) - (noise - z)).pow(2).mean()), 4)
            for name, (e, p) in cond.items()
        }
    return out


def velocity(pipe, xt, t: float, embeds, pooled):
    """``pipe.transformer``'s flow-matching velocity at ``xt`` (noised to ``t``), no grad."""
    import torch

    with torch.no_grad():
        return pipe.transformer(
            hidden_states=xt,
            timestep=torch.full((len(xt),), t * 1000),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample


def decode_latents(vae, latents):
    """The VAE's decode of scaled ``latents``, as images in [0, 1], no grad."""
    import torch

    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return ((x + 1) / 2).clamp(0, 1)


def judge_latents(vae, judge, specs, latents) -> float:
    """GenEval-mini of the VAE's decode of ``latents`` against ``specs`` (3 decimals)."""
    return round(judge.score(specs, decode_latents(vae, latents))["mean"], 3)


def one_step_x0(pipe, judge, specs, z, g, times=TIMES) -> dict:
    """For each t in ``times``: the transformer's one-step prediction of the clean latent
    ``x_t - t v`` from the latents ``z`` of renders of ``specs`` noised to t (noise drawn
    from ``g``), judged, and its mean squared error to ``z``."""
    import torch

    from rlhf.world import sd3

    embeds, pooled = sd3._encode(pipe, [s.prompt() for s in specs], 1)
    out = {}
    for t in times:
        xt = (1 - t) * z + t * torch.randn(z.shape, generator=g)
        x0 = xt - t * velocity(pipe, xt, t, embeds, pooled)
        out[str(t)] = {
            "geneval_mini": judge_latents(pipe.vae, judge, specs, x0),
            "latent_mse": float((x0 - z).pow(2).mean()),
        }
    return out


def main(argv=None) -> int:
    return world_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
