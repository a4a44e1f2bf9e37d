"""One DRaFT-K step on an SD3.5-shaped generator, split into its phases (GPU; runs on a CPU
at ``--shape tiny`` for checking the code).

Random weights (:mod:`bench.sd35_shapes`), bf16 base with fp32 LoRA (rank 16 on the joint
attention), gradient checkpointing on the transformer blocks and the VAE decoder, ICT and HP
on ViT-H-14-shaped open_clip backbones (random, fp32) in the same process. The step is the one
:func:`rlhf.draft.draft_step` takes, cut at the phase boundaries with a device sync at each:

- ``encode``: the two CLIP text encoders;
- ``sample``: the ``N-K`` sampling steps without gradient;
- ``grad_forward``: the last ``K`` steps with gradient (checkpointed: block inputs kept);
- ``decode``: the VAE decode with gradient;
- ``reward``: ICT + HP scores and their image gradient (:func:`rewards.scoring.score_and_grad`);
- ``decode_backward``: the surrogate's backward through the decode to the latents;
- ``transformer_backward``: on through the ``K`` steps (recompute + backward) to the LoRA;
- ``optimizer``: AdamW on the LoRA parameters.

The achieved TFLOP/s of the *gradient step* counts the transformer's model FLOPs of the ``K``
steps, forward and backward (3x forward; the checkpoint recompute is not counted as useful
work), over ``grad_forward + transformer_backward``. Forward FLOPs per step: ``2 x params x
tokens`` for the matrix products plus ``4 x tokens^2 x width`` per attention (joint image +
text tokens; a second, image-only attention in MMDiT-X blocks).

    python -m bench.gpu_step --shape large --size 1024 --k 1 --batch 1 --out large.json
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.common import emit
from bench.sd35_shapes import SHAPES, build_pipeline, n_params

PHASES = (
    "encode",
    "sample",
    "grad_forward",
    "decode",
    "reward",
    "decode_backward",
    "transformer_backward",
    "optimizer",
)
# H100 SXM dense bf16 peak (NVIDIA's data sheet), the denominator of "% of peak".
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def transformer_flops(cfg: dict, params: int, size: int, text_tokens: int, batch: int) -> float:
    """Forward FLOPs of one call of a transformer of config ``cfg`` and ``params`` parameters
    on ``batch`` images of ``size`` px."""
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    image_tokens = (size // 8 // cfg["patch_size"]) ** 2
    tokens = image_tokens + text_tokens
    dual = len(cfg.get("dual_attention_layers", ()))
    return batch * (
        2 * params * tokens
        + cfg["num_layers"] * 4 * tokens**2 * width
        + dual * 4 * image_tokens**2 * width
    )


def _rewards(device, backbone):
    from rewards.registry import build_reward

    out = {}
    for name in ("ict", "hp"):
        m = build_reward({"name": name, "options": {"backbone": backbone}})
        out[name] = (1.0, m.to(device).eval().requires_grad_(False))
    return out


def build(shape: str, device, attention: str, rank: int = 16, backbone=None):
    """The generator (LoRA, checkpointing on) and its rewards."""
    from rlhf.generator import (
        FinetuneConfig,
        Generator,
        apply_finetune,
        set_attention_backend,
        set_gradient_checkpointing,
    )

    pipe = build_pipeline(shape, device)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False).eval()
    finetune = FinetuneConfig(rank=rank, alpha=float(rank))
    apply_finetune(pipe.transformer, finetune)
    pipe.transformer.train()
    set_gradient_checkpointing(pipe, True, True)
    pipe.set_progress_bar_config(disable=True)
    backend = set_attention_backend(pipe.transformer, attention)
    if backbone is None:
        backbone = "tiny" if shape == "tiny" else {"kind": "open_clip", "model": "ViT-H-14"}
    return Generator(pipe, backend, finetune), _rewards(device, backbone)


def timed_step(gen, rewards, opt, prompts, seeds, sampler, k: int) -> dict[str, float]:
    """One DRaFT-K step; seconds per phase (device-synchronised at each boundary)."""
    from rewards.scoring import score_and_grad
    from rlhf.sampler import initial_latents, rollout, schedule, seeded_generators

    dev = gen.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        times[name] = time.perf_counter() - t0

    model = gen.transformer
    with phase("encode"):
        cond = gen.encode_prompts(
            prompts, sampler.guidance_scale, None, sampler.max_sequence_length
        )
    x = initial_latents(gen, seeded_generators(seeds), sampler.height, sampler.width)
    ts, sigmas = schedule(
        gen.pipe.scheduler.config, sampler.steps, x.shape[-2:], model.config.patch_size
    )
    n = len(ts)
    with phase("sample"):
        x = rollout(model, x, cond, ts[: n - k], sigmas, 0, sampler.guidance_scale).latents
    with phase("grad_forward"):
        latents = rollout(model, x, cond, ts, sigmas, k, sampler.guidance_scale, start=n - k)
        latents = latents.latents
    with phase("decode"):
        # A leaf between decode and transformer, so the two backwards can be timed apart.
        z = latents.detach().requires_grad_(True)
        images = gen.decode(z)
    with phase("reward"):
        scores = score_and_grad(rewards, images.detach(), list(prompts))
    with phase("decode_backward"):
        loss = -(images * scores.grad.to(images)).sum() / images.shape[0]
        (g_latents,) = torch.autograd.grad(loss, z)
    with phase("transformer_backward"):
        latents.backward(g_latents)
    with phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    return times


def measure(gen, rewards, opt, args, k: int, batch: int) -> dict:
    """Median phase times of ``args.repeats`` steps after ``args.warmup``, at one (K, batch)."""
    from rlhf.sampler import SamplerConfig

    device = gen.device
    sampler = SamplerConfig(
        steps=args.steps,
        guidance_scale=0.0,
        height=args.size,
        width=args.size,
        max_sequence_length=args.max_sequence_length,
    )
    prompts = ["a photo of an astronaut riding a horse on the moon"] * batch
    seeds = list(range(batch))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for i in range(args.warmup + args.repeats):
        times = timed_step(gen, rewards, opt, prompts, seeds, sampler, k)
        if i >= args.warmup:
            rows.append(times)
    med = {p: sorted(r[p] for r in rows)[len(rows) // 2] for p in PHASES}
    step_s = sum(med.values())
    params = n_params(gen.transformer)
    text_tokens = 77 + args.max_sequence_length
    fwd = transformer_flops(SHAPES[args.shape], params, args.size, text_tokens, batch)
    tflops = 3 * fwd * k / (med["grad_forward"] + med["transformer_backward"]) / 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k_, v in PEAK_TFLOPS.items() if k_ in name), None)
    out = {
        "k": k,
        "batch": batch,
        "attention": gen.attention,
        "phases_s": med,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "grad_step_tflops": tflops,
        "grad_step_pct_of_peak": 100 * tflops / peak if peak else None,
        "sample_tflops": fwd * (args.steps - k) / med["sample"] / 1e12 if args.steps > k else None,
        "repeats": len(rows),
    }
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",")]


def run(args) -> dict:
    """Build once, then measure every (attention, K, batch) asked for; an out-of-memory
    configuration is recorded as such and the next one runs."""
    from rlhf.generator import set_attention_backend, xformers_unusable

    device = torch.device(args.device)
    t0 = time.perf_counter()
    backends = args.attention.split(",")
    gen, rewards = build(args.shape, device, "sdpa", args.rank)
    build_s = time.perf_counter() - t0
    params = [p for p in gen.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    results = []
    for backend in backends:
        try:
            gen.attention = set_attention_backend(gen.transformer, backend)
        except ValueError as e:  # e.g. xformers built for another PyTorch
            results.append({"attention": backend, "error": str(e)})
            print(results[-1], flush=True)
            continue
        for k in _ints(args.k):
            for batch in _ints(args.batch):
                try:
                    r = measure(gen, rewards, opt, args, k, batch)
                except torch.OutOfMemoryError as e:
                    opt.zero_grad(set_to_none=True)
                    r = {"k": k, "batch": batch, "attention": gen.attention, "oom": str(e)[:200]}
                print(r, flush=True)
                results.append(r)
    return {
        "shape": args.shape,
        "size": args.size,
        "steps": args.steps,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "xformers_unusable": xformers_unusable() if device.type == "cuda" else "no CUDA device",
        "transformer_params": n_params(gen.transformer),
        "trainable_params": sum(p.numel() for p in params),
        "build_s": build_s,
        "results": results,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="large")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--k", default="1", help="K, or a comma list (e.g. 1,2,4)")
    ap.add_argument("--batch", default="1", help="batch, or a comma list")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-sequence-length", type=int, default=256)
    ap.add_argument("--attention", default="auto", help="auto, sdpa, xformers or a comma list")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
