"""A memory model of DRaFT-K on SD3.5-Large at 1024 px, per GPU, and its checks on a CPU.

A **model, not a measurement**: bytes are counted from the architecture configs (below,
SD3.5-Large's published ``transformer/config.json`` and ``vae/config.json``) with one rule
per layer for what autograd keeps for backward:

- transformer block (``JointTransformerBlock``, both streams, flash / memory-efficient
  attention, no N^2 matrix): ``BLOCK_ELEMS`` = 23 tensors of ``tokens x width`` per block
  (AdaLN-Zero: 3; q, k, v and the RMS qk-norm: 2 + 3; attention output and out-projection: 2;
  gate: 1; second AdaLN: 3; feed-forward GELU input and output at 4x width: 8; gate: 1);
  the last block's context stream is ``context_pre_only`` and counted as half.
  With checkpointing only each block's inputs stay (1 per block), plus one block recomputed
  at a time in backward.
- VAE decoder (``ResnetBlock2D``: GroupNorm, SiLU, conv, twice = 6 tensors of ``C x H x W``;
  an upsampler's conv keeps its input at 4x the pixels; the mid block's attention 4; the
  output GroupNorm, SiLU, conv: 3 at full resolution). diffusers checkpoints the decoder's
  mid block and each up block as a unit: then the up blocks' inputs stay, and the largest
  up block is recomputed whole in backward, so the peak is that block plus the output layers.

DRaFT-K keeps the graph of all K gradient steps (each has the transformer's activations for
the batch), then the decode's. Weights bf16; LoRA fp32 master + grad + Adam m, v (16 B per
trainable parameter); the reward server beside it (ViT-H-14 at 224 px, bf16, its own
activations for the image gradient). CUDA context and allocator slack: a flat 3 GiB.

    python -m bench.memory_model                  # the table (markdown)
    python -m bench.memory_model --measure vae    # CPU peak RSS of a decode backward, ckpt on/off
    python -m bench.memory_model --measure transformer  # predicted vs measured, tiny transformer
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

GiB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SD3.5-Large's transformer/config.json and the SD3 VAE's vae/config.json.
from bench.sd35_shapes import SD3_VAE, SD35_LARGE  # noqa: E402

PARAMS = {  # parameter counts, bf16 weights
    "transformer": 8.06e9,
    "t5_xxl": 4.76e9,
    "clip_l_g": 0.81e9,  # CLIP-L 123 M + CLIP-G 695 M text towers: 1.5 GiB
    "vae": 0.084e9,
    "reward_vit_h14": 0.99e9,  # open_clip ViT-H-14 (image + text towers)
}
LORA_PARAMS = 23.6e6  # rank 16 on the 8 joint-attention projections of 38 blocks
BLOCK_ELEMS = 23
CUDA_OVERHEAD = 3 * GiB
CLIP_TOKENS, T5_TOKENS = 77, 256


def transformer_activations(cfg: dict, px: int, batch: int, checkpointing: bool, nbytes=2):
    """``(kept, transient)`` bytes of one gradient step of the transformer: what autograd keeps
    until backward, and (with checkpointing) the one block recomputed at a time in backward."""
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    img = (px // 8 // cfg["patch_size"]) ** 2
    txt = CLIP_TOKENS + T5_TOKENS
    layers = cfg["num_layers"]
    per_block = BLOCK_ELEMS * (img + txt) * width
    if not checkpointing:
        last = BLOCK_ELEMS * (img + txt / 2) * width
        return batch * nbytes * (per_block * (layers - 1) + last), 0.0
    return batch * nbytes * layers * (img + txt) * width, batch * nbytes * per_block


def vae_decode_activations(cfg: dict, px: int, batch: int, checkpointing: bool, nbytes=2):
    """Bytes autograd keeps for the differentiable decode (peak, see the module docstring)."""
    ch = list(reversed(cfg["block_out_channels"]))
    n_up = len(ch)
    hw = (px // 2 ** (n_up - 1)) ** 2  # the latent resolution
    mid = (2 * 6 + 4) * ch[0] * hw + ch[0] * hw  # two resnets, attention, conv_in output
    blocks, inputs = [], []
    c_in = ch[0]
    for i, c in enumerate(ch):
        resnets = (cfg["layers_per_block"] + 1) * 6 * c * hw + (c_in != c) * c_in * hw
        up = c * 4 * hw if i < n_up - 1 else 0
        blocks.append(resnets + up)
        inputs.append(c_in * hw)
        c_in = c
        if i < n_up - 1:
            hw *= 4
    out = 3 * ch[-1] * hw
    if not checkpointing:
        return batch * nbytes * (mid + sum(blocks) + out)
    return batch * nbytes * (ch[0] * hw // 4 ** (n_up - 1) + sum(inputs) + max(blocks) + out)


def reward_activations(batch: int, nbytes=2):
    """ViT-H-14 at 224 px (257 tokens, width 1280, 32 layers), the image gradient needs its
    activations: the same per-block rule as a transformer block (one stream, no text)."""
    return batch * nbytes * 32 * 16 * 257 * 1280


def table(batches=(1, 2), ks=(1, 2, 4), px=1024) -> tuple[dict, list[dict]]:
    w = {k: v * 2 for k, v in PARAMS.items()}
    lora = LORA_PARAMS * 16
    rows = []
    for t5_here in (True, False):
        for ckpt in (True, False):
            for k in ks:
                for b in batches:
                    weights = w["transformer"] + w["vae"] + lora
                    if t5_here:
                        weights += w["t5_xxl"] + w["clip_l_g"]
                    kept, transient = transformer_activations(SD35_LARGE, px, b, ckpt)
                    tr = k * kept + transient  # K steps' graphs; one block recomputed at a time
                    vae = vae_decode_activations(SD3_VAE, px, b, ckpt)
                    reward = w["reward_vit_h14"] + reward_activations(b)
                    total = weights + tr + vae + CUDA_OVERHEAD
                    rows.append(
                        {
                            "text_encoders": "local" if t5_here else "actor",
                            "checkpointing": ckpt,
                            "k": k,
                            "batch": b,
                            "weights_gib": weights / GiB,
                            "transformer_act_gib": tr / GiB,
                            "vae_act_gib": vae / GiB,
                            "generator_gib": total / GiB,
                            "with_reward_gib": (total + reward) / GiB,
                        }
                    )
    parts = {k: v / GiB for k, v in w.items()} | {"lora_fp32_adam": lora / GiB}
    return parts, rows


def markdown(parts: dict, rows: list[dict]) -> str:
    out = ["| part | GiB |", "|---|---|"]
    out += [f"| {k} | {v:.2f} |" for k, v in parts.items()]
    out += [
        "",
        "| text encoders | ckpt | K | batch | weights | transformer act. | VAE act. "
        "| generator total | + reward server | fits 40 GB alone | fits 80 GB with reward |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gb40, gb80 = 39.5, 79.6  # usable GiB of an A100-40GB (40,536 MiB), H100/A100-80GB
    for r in rows:
        g, a = r["generator_gib"], r["with_reward_gib"]
        out.append(
            f"| {r['text_encoders']} | {'on' if r['checkpointing'] else 'off'} | {r['k']} "
            f"| {r['batch']} | {r['weights_gib']:.1f} | {r['transformer_act_gib']:.1f} "
            f"| {r['vae_act_gib']:.1f} | {g:.1f} | {a:.1f} "
            f"| {'yes' if g <= gb40 else 'no'} | {'yes' if a <= gb80 else 'no'} |"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- CPU checks


def _child(kind: str, ckpt: bool, px: int, threads: int) -> dict:
    """In a fresh process: peak RSS increase of one forward + backward (fp32)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if kind == "vae":
        from diffusers import AutoencoderKL

        # SD3's decoder structure at 1/4 width (4 up blocks, 3 resnets each, 16 channels).
        vae = AutoencoderKL(
            block_out_channels=[32, 64, 128, 128],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).requires_grad_(False)
        if ckpt:
            vae.enable_gradient_checkpointing()
        cfg = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 2}
        z = torch.randn(1, 16, px // 8, px // 8, requires_grad=True)
        predicted = vae_decode_activations(cfg, px, 1, ckpt, nbytes=4)

        def run():
            vae.decode(z).sample.square().mean().backward()

    else:
        from diffusers import SD3Transformer2DModel

        cfg = {
            "num_layers": 4,
            "attention_head_dim": 32,
            "num_attention_heads": 4,
            "joint_attention_dim": 64,
            "caption_projection_dim": 128,
            "pooled_projection_dim": 32,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
        }
        model = SD3Transformer2DModel(sample_size=px // 8, qk_norm="rms_norm", **cfg)
        model.requires_grad_(False)
        if ckpt:
            model.enable_gradient_checkpointing()
        x = torch.randn(1, 16, px // 8, px // 8, requires_grad=True)
        ctx = torch.randn(1, CLIP_TOKENS + T5_TOKENS, 64)
        pooled = torch.randn(1, 32)
        predicted = sum(transformer_activations(cfg, px, 1, ckpt, nbytes=4))

        def run():
            out = model(x, ctx, pooled, torch.tensor([500.0]), return_dict=False)[0]
            out.square().mean().backward()

    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_increase": peak - before, "predicted": predicted}


def measure(kind: str, px: int, threads: int) -> list[dict]:
    out = []
    for ckpt in (False, True):
        cmd = [sys.executable, "-m", "bench.memory_model", "--child", kind, str(int(ckpt))]
        cmd += ["--px", str(px), "--threads", str(threads)]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r.update(kind=kind, checkpointing=ckpt, px=px)
        r["ratio"] = r["peak_increase"] / r["predicted"]
        out.append(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", choices=("vae", "transformer"))
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        r = _child(args.child[0], bool(int(args.child[1])), args.px, args.threads)
        print(json.dumps(r))
        return 0
    if args.measure:
        rows = measure(args.measure, args.px, args.threads)
        print(
            "| part | px | checkpointing | predicted MiB | measured peak RSS increase MiB | ratio |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['kind']} | {r['px']} | {'on' if r['checkpointing'] else 'off'} "
                f"| {r['predicted'] / 2**20:.0f} | {r['peak_increase'] / 2**20:.0f} "
                f"| {r['ratio']:.2f} |"
            )
        return 0
    print(markdown(*table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
