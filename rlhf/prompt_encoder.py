"""Prompt embeddings outside the generator: SD3's text encoders alone, with a cache per prompt.

With ``generator.text_encoders: actor`` the generator workers load no text encoder (at
SD3.5-Large T5-XXL alone is 8.9 GiB in bf16); one :class:`PromptEncoder` (inside the
text-encoder actor, ``actors/text_encoder.py``) encodes each prompt once and serves its
embeddings from a cache afterwards. The embeddings are the pipeline's own ``encode_prompt``
rows, so sampling and DRaFT gradients are the same as with local encoders (a test asserts it).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from rlhf.generator import (
    TINY,
    GeneratorConfig,
    PromptEmbeds,
    build_tiny_pipeline,
    pretrained_kwargs,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)

TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def load_text_encoders(cfg: GeneratorConfig, device: str | torch.device | None = None):
    """A ``StableDiffusion3Pipeline`` holding only the text encoders and tokenizers of
    ``cfg.model`` (frozen, eval, on ``device`` in the configured dtype); no VAE.

    The transformer is built on the meta device (no memory): ``encode_prompt`` reads its
    ``joint_attention_dim`` for the zero T5 tokens when T5 is not loaded.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    cfg.validate()
    device = resolve_device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model == TINY:
        pipe = build_tiny_pipeline(cfg.seed)
        transformer_config = dict(pipe.transformer.config)
    else:
        cfg, kwargs = pretrained_kwargs(cfg, dtype)
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(
                cfg.model, transformer=None, vae=None, **kwargs
            )
            transformer_config = SD3Transformer2DModel.load_config(
                cfg.model, subfolder="transformer", revision=cfg.revision
            )
        except OSError as e:
            raise FileNotFoundError(f"generator.model={cfg.model!r}: cannot load: {e}") from e
    with torch.device("meta"):
        meta = SD3Transformer2DModel.from_config(transformer_config)
    pipe.register_modules(transformer=meta, vae=None)
    for name in TEXT_PARTS:
        m = getattr(pipe, name, None)
        if m is not None:
            m.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return pipe


class PromptEncoder:
    """Prompt embeddings of a text-encoder-only pipeline, each prompt encoded once.

    The cache holds up to ``cache_size`` rows (one per prompt and ``max_sequence_length``; the
    negative prompt is one row too) on the CPU, least recently used evicted first; a row of
    SD3.5-Large is ``(333, 4096)`` in bf16, 2.7 MB.
    """

    def __init__(self, pipe, cache_size: int = 1024):
        if cache_size < 1:
            raise ValueError(f"cache_size={cache_size} must be >= 1")
        self.pipe = pipe
        self.cache_size = cache_size
        self.cache: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.encoded = 0  # prompts run through the text encoders (cache misses)
        self.served = 0  # prompt rows returned

    @property
    def device(self) -> torch.device:
        return self.pipe.text_encoder.device

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        guidance_scale: float = 0.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
    ) -> PromptEmbeds:
        """Like :meth:`Generator.encode_prompts`: ``embeds (B, L, D)``, ``pooled (B, P)`` and
        the negative pair when ``guidance_scale > 1``, on the CPU in the encoders' dtype."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, not a single string")
        cfg = guidance_scale > 1
        wanted = list(prompts) + ([negative_prompt] if cfg else [])
        cached = self.cache
        missing = list(dict.fromkeys(p for p in wanted if (p, max_sequence_length) not in cached))
        if missing:
            # The negative prompt goes through the same two calls as a positive one in
            # ``encode_prompt`` (clip_skip None), so encoding it as a prompt gives its rows.
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=missing,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
            for p, e, q in zip(missing, embeds.cpu(), pooled.cpu(), strict=True):
                self.cache[(p, max_sequence_length)] = (e, q)
            self.encoded += len(missing)
        rows = []
        for p in wanted:
            key = (p, max_sequence_length)
            self.cache.move_to_end(key)
            rows.append(self.cache[key])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        self.served += len(rows)
        embeds = torch.stack([e for e, _ in rows[: len(prompts)]])
        pooled = torch.stack([q for _, q in rows[: len(prompts)]])
        if not cfg:
            return PromptEmbeds(embeds, pooled)
        neg_e, neg_q = rows[-1]
        n = len(prompts)
        return PromptEmbeds(embeds, pooled, torch.stack([neg_e] * n), torch.stack([neg_q] * n))
