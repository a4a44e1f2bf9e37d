"""The world's tiny SD3: a VAE and an SD3 transformer pretrained with flow matching on rendered
scenes, with the world CLIP's text tower in both CLIP text-encoder slots (no T5), saved as a
diffusers folder that ``policy.generator.model`` loads like any other.

The transformer's flow-matching pretraining is in :mod:`rlhf.world.flow_matching`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0}


def vae_config(scale: str = "full", factor: int = 4) -> dict:
    """A tiny ``AutoencoderKL`` that downsamples by ``factor`` (2 or 4) to 4 latent channels."""
    if factor not in (2, 4):
        raise ValueError(f"vae factor={factor} must be 2 or 4")
    levels = factor.bit_length()  # down blocks: 2 for factor 2, 3 for factor 4
    ch = ([16, 32, 32] if scale == "full" else [8, 16, 16])[:levels]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": ch,
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        # Flat shapes need no attention in the bottleneck; it would cost 40% of a step.
        "mid_block_add_attention": False,
    }


def transformer_config(
    text_width: int,
    pooled_dim: int,
    scale: str = "full",
    patch_size: int = 2,
    sample_size: int = 16,
) -> dict:
    """Two CLIP slots of ``text_width`` features each are concatenated (SD3's layout);
    ``sample_size``: the latent's side (64 px over the VAE's factor)."""
    layers, heads = (4, 3) if scale == "full" else (1, 2)
    return {
        "sample_size": sample_size,
        "patch_size": patch_size,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": layers,
        "attention_head_dim": 32,
        "num_attention_heads": heads,
        "joint_attention_dim": 2 * text_width,
        "caption_projection_dim": 32 * heads,
        "pooled_projection_dim": 2 * pooled_dim,
        "pos_embed_max_size": 16,
        "qk_norm": "rms_norm",
    }


def _cosine(opt, steps: int):
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1] (the VAE's range)."""
    return torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(
    images: np.ndarray,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    scale: str = "full",
    progress: bool = True,
    factor: int = 4,
    precision: str = "fp32",
):
    """An ``AutoencoderKL`` (downsampling by ``factor``) trained to reconstruct ``images``
    (uint8 ``(N, 64, 64, 3)``); its ``scaling_factor`` and ``shift_factor`` are set from the
    latents' statistics. ``precision``: :mod:`rewards.world.precision`."""
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from rewards.world.precision import training_autocast

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(scale, factor))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    sched = _cosine(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc="world-vae", disable=not progress, mininterval=5)
    for _ in bar:
        x = to_tensor(images[torch.randint(0, len(images), (batch_size,), generator=gen).numpy()])
        with training_autocast(precision):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
            kl = post.kl().float().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    z = encode_latents(vae, images[:512], raw=True)
    shift, std = float(z.mean()), float(z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return vae


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, raw: bool = False, batch: int = 256) -> torch.Tensor:
    """Posterior means of ``images``; scaled to the transformer's space unless ``raw``."""
    out = []
    for i in range(0, len(images), batch):
        z = vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean
        if not raw:
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        out.append(z)
    return torch.cat(out)


def build_pipeline(vae, transformer, text_encoder, tokenizer):
    """A ``StableDiffusion3Pipeline`` with ``text_encoder`` in both CLIP slots and no T5."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=copy.deepcopy(text_encoder).eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def _encode(pipe, prompts: list[str], max_sequence_length: int):
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


def _tokenize(pipe, captions: list[str]) -> torch.Tensor:
    """The pipeline's CLIP token ids of ``captions`` ``(N, tokenizer_max_length)``."""
    return pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def text_states(pipe, ids: torch.Tensor, max_sequence_length: int = 1):
    """``pipe.encode_prompt``'s embeddings and pooled embeddings of token ``ids`` (no T5: its
    slot is zeros), computed with gradients so the text encoders can train with the SD3."""
    states, pooled = [], []
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        out = enc(ids, output_hidden_states=True)
        pooled.append(out[0])
        states.append(out.hidden_states[-2])
    e = torch.cat(states, dim=-1)
    dim = pipe.transformer.config.joint_attention_dim
    e = F.pad(e, (0, dim - e.shape[-1]))
    t5 = torch.zeros(len(ids), max_sequence_length, dim, dtype=e.dtype)
    return torch.cat([e, t5], dim=-2), torch.cat(pooled, dim=-1)


def _caption_rows(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct ``captions`` in first-seen order, and each caption's row among them
    ``(N,)``: what is encoded (or tokenized) once, and how each sample finds it."""
    distinct = list(dict.fromkeys(captions))
    row = {c: i for i, c in enumerate(distinct)}
    return distinct, torch.tensor([row[c] for c in captions])


@torch.no_grad()
def _encode_captions(pipe, captions: list[str], max_sequence_length: int, batch: int = 256):
    """Embeddings of the distinct ``captions`` ``(U, seq, dim)``, pooled ``(U, dim)``, and each
    caption's row ``(N,)``."""
    distinct, rows = _caption_rows(captions)
    parts = [
        _encode(pipe, distinct[i : i + batch], max_sequence_length)
        for i in range(0, len(distinct), batch)
    ]
    embeds = torch.cat([e for e, _ in parts])
    pooled = torch.cat([p for _, p in parts])
    return embeds, pooled, rows


def new_transformer(
    text_encoder, scale: str = "full", seed: int = 0, patch_size: int = 2, sample_size: int = 16
):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    c = text_encoder.config
    cfg = transformer_config(c.hidden_size, c.projection_dim, scale, patch_size, sample_size)
    return SD3Transformer2DModel(**cfg)


@torch.no_grad()
def adaln_zero_init(model) -> None:
    """DiT's initialisation (Peebles & Xie 2023) of an ``SD3Transformer2DModel`` trained from
    scratch: Xavier-uniform linear layers and patch projection with zero biases, the timestep
    MLP at std 0.02, and zero for every adaptive-norm modulation (each block's shift, scale
    and gate, so every block starts as the identity) and for the output layer. Diffusers
    leaves PyTorch's default init, meant to be overwritten by pretrained weights."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for lin in (
        model.time_text_embed.timestep_embedder.linear_1,
        model.time_text_embed.timestep_embedder.linear_2,
    ):
        nn.init.normal_(lin.weight, std=0.02)
    modulations = [model.norm_out.linear, model.proj_out]
    for block in model.transformer_blocks:
        modulations += [block.norm1.linear, block.norm1_context.linear]
    for lin in modulations:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def save_pipeline(pipe, folder: str | Path) -> Path:
    """The diffusers folder, the transformer's and text encoders' weights in fp16 (half the
    bytes to ship; loading in fp32 upcasts them)."""
    folder = Path(folder)
    parts = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    for m in parts:
        m.half()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for m in parts:
        m.float()
    return folder


def timed(fn, *args, **kwargs):
    t = time.time()
    out = fn(*args, **kwargs)
    return out, time.time() - t
