"""The tiny SD3: random weights (seeded) from the JSON configs in ``rlhf/model_configs/tiny_sd3``,
two small CLIP text encoders and the locally built CLIP tokenizer, no T5. It runs the whole
machinery on a CPU in seconds (``generator.model: tiny``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_SD3_DIR = Path(__file__).parent / "model_configs" / "tiny_sd3"


def build_tiny_pipeline(seed: int = 0, config_dir: str | os.PathLike = TINY_SD3_DIR):
    """A tiny ``StableDiffusion3Pipeline`` with random weights (seeded) from shipped configs.

    Same seed, same weights, in any process: tests and Ray workers rely on it.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from rlhf.tokenizers import build_clip_tokenizer

    d = Path(config_dir)

    def cfg(sub: str, name: str = "config.json") -> dict:
        return json.loads((d / sub / name).read_text())

    def no_meta(c: dict) -> dict:
        return {k: v for k, v in c.items() if not k.startswith("_")}

    # Seeded per component, so changing one config leaves the others' weights unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**no_meta(cfg("transformer")))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**no_meta(cfg("vae")))
        encoders = []
        for i, sub in enumerate(("text_encoder", "text_encoder_2")):
            torch.manual_seed(seed + 2 + i)
            c = {k: v for k, v in cfg(sub).items() if k not in ("architectures", "model_type")}
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**c)))
    tokenizer = build_clip_tokenizer(d / "tokenizer" / "config.json")
    scheduler = FlowMatchEulerDiscreteScheduler(
        **no_meta(cfg("scheduler", "scheduler_config.json"))
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=encoders[0].eval(),
        tokenizer=tokenizer,
        text_encoder_2=encoders[1].eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
