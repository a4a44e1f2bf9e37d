"""The world build's training steps in fp32 and in bf16 (``rlhf world build --precision``),
side by side in one process (BENCHMARKS.md, section 0): a bare matrix product, a VAE step
(batch 16), a CLIP step (batch 64, ResNet image tower) and an SD3 flow-matching step (batch
32, the shipped transformer's shape, 33 text tokens), each eager and, for the SD3, under
``torch.compile`` too. Median milliseconds per step after warm-up, in rounds that alternate
the sides so that a slower stretch of a shared machine hits both.

    python -m bench.world_precision [--threads 1] [--steps 20] [--rounds 2] [--out FILE.json]

bf16 pays only where the CPU multiplies bf16 matrices in hardware (AMX); ``lscpu`` lists it
as ``amx_bf16``. The data are random tensors of the stages' shapes: the timings, not the
losses, are the point.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

from bench.common import emit


def _median_ms(step, steps: int, warm: int) -> float:
    times = []
    for i in range(steps + warm):
        t = time.perf_counter()
        step()
        if i >= warm:
            times.append(time.perf_counter() - t)
    return round(1000 * sorted(times)[len(times) // 2], 3)


def _matmul(precision: str):
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(3104, 96, dtype=dtype), torch.randn(96, 384, dtype=dtype)
    return lambda: a @ b


def _vae(precision: str):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from rewards.world.precision import training_autocast
    from rlhf.world.sd3 import to_tensor, vae_config

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, (256, 64, 64, 3), dtype=np.uint8)
    vae = AutoencoderKL(**vae_config("full", 4)).train()
    opt = torch.optim.AdamW(vae.parameters())

    def step():
        x = to_tensor(images[torch.randint(0, len(images), (16,)).numpy()])
        with training_autocast(precision):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        loss = F.mse_loss(rec, x) + 1e-4 * post.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _clip(precision: str):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from rewards.world import clip as C
    from rewards.world.precision import training_autocast

    torch.manual_seed(0)
    tok = C.build_tokenizer()
    model = C.create_model(C.model_config(len(tok), "full", "resnet")).train()
    opt = torch.optim.AdamW(model.parameters())
    images = np.random.default_rng(0).integers(0, 255, (256, 64, 64, 3), dtype=np.uint8)
    ids = C.tokenize(tok, ["a red circle left of two blue squares, with striped texture"] * 256)

    def step():
        idx = torch.randint(0, len(images), (64,))
        with training_autocast(precision):
            img = model.encode_image(C.pixels(images[idx.numpy()]))
            txt = model.encode_text(ids)
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        loss = F.cross_entropy(50 * img @ txt.T, torch.arange(64))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sd3(precision: str, compiled: bool):
    import torch

    from rewards.world import SD3_DIR
    from rewards.world.precision import training_autocast
    from rlhf.world.flow_matching import _encode_captions, _flow_errors
    from rlhf.world.sampling import load_world_generator

    pipe = load_world_generator(SD3_DIR).pipe
    captions = [f"{n} {c} {s}" for n in ("a", "two") for c in ("red", "blue") for s in ("circle",)]
    embeds, pooled, rows = _encode_captions(pipe, captions, 1)
    model = copy.deepcopy(pipe.transformer).float().train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)

    def step():
        x0 = torch.randn(32, 4, 16, 16, generator=g)
        noise = torch.randn(32, 4, 16, 16, generator=g)
        t = torch.rand(32, generator=g)
        r = rows[torch.randint(0, len(captions), (32,), generator=g)]
        with training_autocast(precision):  # the build's step (train_transformer)
            err, _ = _flow_errors(forward, x0, noise, t, embeds[r], pooled[r], 0.0, None)
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


CASES = {
    "matmul": _matmul,
    "vae": _vae,
    "clip": _clip,
    "sd3": lambda p: _sd3(p, compiled=False),
    "sd3_compiled": lambda p: _sd3(p, compiled=True),
}


def run(threads: int, steps: int, rounds: int, cases: list[str]) -> dict:
    import torch

    torch.set_num_threads(threads)
    out = {"suite": "world_precision", "threads": threads, "steps": steps, "results": {}}
    steps_fns = {(c, p): CASES[c](p) for c in cases for p in ("fp32", "bf16")}
    for r in range(rounds):
        for c in cases:
            row = out["results"].setdefault(c, {"fp32_ms": [], "bf16_ms": []})
            for p in ("fp32", "bf16"):
                n = steps * 20 if c == "matmul" else steps
                warm = 8 if c.endswith("compiled") and r == 0 else 3
                row[f"{p}_ms"].append(_median_ms(steps_fns[(c, p)], n, warm))
            print(f"round {r} {c}: {row}", file=sys.stderr, flush=True)
    for row in out["results"].values():
        row["speedup"] = round(min(row["fp32_ms"]) / min(row["bf16_ms"]), 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    unknown = set(a.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"--cases: unknown {sorted(unknown)}")
    return emit(run(a.threads, a.steps, a.rounds, a.cases.split(",")), a.out)


if __name__ == "__main__":
    sys.exit(main())
