"""SD3.5-shaped pipelines with random weights: the GPU tier's stand-in for the real models.

Nothing is downloaded. The transformer and VAE have the published shapes of
``stabilityai/stable-diffusion-3.5-{medium,large}`` (``transformer/config.json``,
``vae/config.json``); the two CLIP text encoders have SD3's widths (768 and 1280, 77 tokens)
but one layer each, so the conditioning has the real shapes at a fraction of the cost; T5 is
off (its tokens are zeros, as diffusers does without it). ``large`` is ~8.1 B transformer
parameters, ``medium`` ~2.2 B. ``tiny`` is a small transformer of the same kind for checking the
code on a CPU.

    python -m bench.sd35_shapes --shape medium --out /tmp/sd35m   # a diffusers folder
"""

from __future__ import annotations

import argparse
import os

import torch

# stabilityai/stable-diffusion-3.5-large[-turbo], transformer/config.json
SD35_LARGE = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: a second,
# image-only attention in the first 13 blocks)
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}
# A CPU-sized transformer of the same kind (code checks only).
SD3_TINY = {
    **SD35_MEDIUM,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 64,
    "dual_attention_layers": [0],
}
# The 16-channel SD3 VAE (vae/config.json of SD3 and SD3.5).
SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD3_TINY_VAE = {**SD3_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
SHAPES = {"large": SD35_LARGE, "medium": SD35_MEDIUM, "tiny": SD3_TINY}
# SD3's two CLIP text encoders: CLIP-L (768) and OpenCLIP bigG (1280); their pooled outputs
# concatenate to the transformer's pooled_projection_dim (2048) and their hidden states
# (768 + 1280, zero-padded to 4096) to its joint_attention_dim.
TEXT_WIDTHS = (768, 1280)
TINY_TEXT_WIDTHS = (32, 32)


def build_pipeline(shape: str, device: str | torch.device = "cpu", seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of shape ``shape`` (``SHAPES``) with random weights:
    transformer and text encoders in bf16 on a CUDA ``device`` (fp32 on a CPU), VAE likewise."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from rlhf.tokenizers import build_clip_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} must be one of {sorted(SHAPES)}")
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = shape == "tiny"
    torch.manual_seed(seed)
    with device:
        # Built in fp32 (diffusers' initialisation), then cast: ~32 GB transiently for Large.
        transformer = SD3Transformer2DModel(**SHAPES[shape]).to(dtype)
        vae = AutoencoderKL(**(SD3_TINY_VAE if tiny else SD3_VAE)).to(dtype)
        encoders = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=w,
                    projection_dim=w,
                    intermediate_size=4 * w,
                    num_hidden_layers=1,
                    num_attention_heads=max(1, w // 64),
                    max_position_embeddings=77,
                )
            ).to(dtype)
            for w in (TINY_TEXT_WIDTHS if tiny else TEXT_WIDTHS)
        ]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tok = build_clip_tokenizer({"model_max_length": 77})
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tok,
        text_encoder_2=encoders[1],
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def save_folder(shape: str, out: str, device: str | torch.device = "cpu", seed: int = 0) -> str:
    """Write the random pipeline as a diffusers folder (safetensors) that
    ``policy.generator.model`` loads like a downloaded one; returns ``out``."""
    pipe = build_pipeline(shape, device, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    save_folder(args.shape, args.out, args.device)
    print(f"{args.shape}: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
