"""The SD3/SD3.5 generator: loading, LoRA, checkpointing (attention: rlhf.attention; tiny: rlhf.tiny_sd3).

The policy is a diffusers ``StableDiffusion3Pipeline``: the transformer is trained (LoRA via
peft, or every weight), the VAE and text encoders stay frozen. ``model`` is a hub id
(``stabilityai/stable-diffusion-3.5-large-turbo``), a local diffusers folder, or ``tiny``: a
tiny SD3 built from the JSON configs in ``rlhf/model_configs/tiny_sd3`` with random weights
(seeded), two CLIP text encoders and locally built CLIP tokenizers, no T5; or ``world``: the
miniature world's pretrained tiny SD3 (``rlhf world build``), a diffusers folder shipped in
``rewards/world/assets/sd3``. Nothing is downloaded for these or a local folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from rewards.checkpoint_refs import is_hub_id
from rlhf.attention import (  # noqa: F401  (re-exported: callers import them from here)
    ATTENTION_BACKENDS,
    set_attention_backend,
    xformers_unusable,
)
from rlhf.tiny_sd3 import TINY_SD3_DIR, build_tiny_pipeline  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

TINY = "tiny"
WORLD = "world"  # the miniature world's pretrained SD3, shipped in rewards/world/assets/sd3
DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-large-turbo"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FINETUNE_MODES = ("lora", "full")
# Where prompt embeddings come from: the generator's own text encoders, or a text-encoder
# actor (actors/text_encoder.py) so that generator processes hold no text encoder.
TEXT_ENCODERS = ("local", "actor")
# The joint-attention projections of every SD3 block: image stream and context stream.
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


@dataclass
class GeneratorConfig:
    """Which SD3 to load and how to run it. Defaults: the paper's GPU setting.

    ``dtype``: ``auto`` is bf16 on CUDA and fp32 on CPU. ``attention``: ``auto`` uses xformers
    on CUDA when it is installed, else PyTorch SDPA. ``load_t5``: SD3's third text encoder
    (T5-XXL, ~4.7B parameters); without it the T5 tokens are zeros, as diffusers does.
    ``seed`` seeds the random weights of ``tiny``. ``text_encoders``: ``local`` loads CLIP-L,
    CLIP-G (and T5) here; ``actor``: this process loads none and takes prompt embeddings from
    :attr:`Generator.prompt_encoder` (a text-encoder actor that caches them per prompt), which
    saves T5's 8.9 GiB and CLIP's 1.5 GiB per generator GPU at SD3.5-Large.
    ``gradient_checkpointing``: the transformer blocks; ``vae_gradient_checkpointing``: the VAE
    decoder's blocks in the differentiable decode (null: as ``gradient_checkpointing``).
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    variant: str | None = None
    load_t5: bool = True
    dtype: str = "auto"
    attention: str = "auto"
    gradient_checkpointing: bool = True
    vae_gradient_checkpointing: bool | None = None
    text_encoders: str = "local"
    seed: int = 0

    def validate(self, path: str = "generator") -> None:
        if not self.model:
            raise ValueError(f"{path}.model must be 'tiny', a hub id or a local folder")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"{path}.dtype={self.dtype!r} must be one of {('auto', *DTYPES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"{path}.attention={self.attention!r} must be one of {ATTENTION_BACKENDS}"
            )
        if self.text_encoders not in TEXT_ENCODERS:
            raise ValueError(
                f"{path}.text_encoders={self.text_encoders!r} must be one of {TEXT_ENCODERS}"
            )


@dataclass
class FinetuneConfig:
    """What of the transformer is trained: LoRA adapters (default) or every weight.

    LoRA goes on ``target_modules`` (module-name suffixes) with rank ``rank`` and
    ``alpha`` (scale ``alpha / rank``); the adapter weights are kept in fp32.
    """

    mode: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self, path: str = "finetune") -> None:
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"{path}.mode={self.mode!r} must be one of {FINETUNE_MODES}")
        if self.mode == "lora":
            if self.rank < 1:
                raise ValueError(f"{path}.rank={self.rank} must be >= 1")
            if self.alpha <= 0:
                raise ValueError(f"{path}.alpha={self.alpha} must be > 0")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"{path}.dropout={self.dropout} must be in [0, 1)")
            if not self.target_modules:
                raise ValueError(f"{path}.target_modules must not be empty")


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: ``embeds (B, L, D)``, ``pooled (B, P)``; the negative
    pair is set only when classifier-free guidance is on."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    neg_embeds: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None

    def repeat(self, n: int) -> PromptEmbeds:
        """Each row repeated ``n`` times in place (row b -> rows b*n .. b*n+n-1)."""

        def rep(t):
            return None if t is None else t.repeat_interleave(n, dim=0)

        return PromptEmbeds(
            rep(self.embeds), rep(self.pooled), rep(self.neg_embeds), rep(self.neg_pooled)
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> PromptEmbeds:
        def move(t):
            return None if t is None else t.to(device, dtype)

        return PromptEmbeds(
            move(self.embeds), move(self.pooled), move(self.neg_embeds), move(self.neg_pooled)
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and imprecise)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# --------------------------------------------------------------------------- building


def load_pipeline(cfg: GeneratorConfig, device: str | torch.device | None = None):
    """The pipeline of ``cfg.model`` on ``device`` in the configured dtype, frozen, eval mode."""
    from diffusers import StableDiffusion3Pipeline

    device = resolve_device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    no_text = {
        f"{kind}{suffix}": None
        for kind in ("text_encoder", "tokenizer")
        for suffix in ("", "_2", "_3")
    }
    if cfg.model == TINY:
        pipe = build_tiny_pipeline(cfg.seed)
        if cfg.text_encoders == "actor":
            pipe.register_modules(**no_text)
    else:
        cfg, kwargs = pretrained_kwargs(cfg, dtype)
        if cfg.text_encoders == "actor":
            kwargs.update(no_text)
        local = os.path.isdir(cfg.model)
        if not local and not is_hub_id(cfg.model):
            raise FileNotFoundError(
                f"generator.model={cfg.model!r} is not 'tiny', a local folder or a hub id"
            )
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(cfg.model, **kwargs)
        except OSError as e:
            raise FileNotFoundError(f"generator.model={cfg.model!r}: cannot load: {e}") from e
    if cfg.model == TINY and dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.to(device)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pretrained_kwargs(cfg: GeneratorConfig, dtype: torch.dtype) -> tuple[GeneratorConfig, dict]:
    """``cfg`` with ``model: world`` resolved to the shipped folder, and the keyword
    arguments of ``StableDiffusion3Pipeline.from_pretrained`` for it (dtype, revision,
    variant; no T5 unless ``load_t5``)."""
    if cfg.model == WORLD:
        from rewards.world import SD3_DIR

        cfg = replace(cfg, model=str(SD3_DIR))
    kwargs = {_dtype_kwarg(): dtype, "revision": cfg.revision, "variant": cfg.variant}
    if not cfg.load_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    return cfg, kwargs


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns)."""
    from diffusers.utils import deprecation_utils

    return (
        "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    )


def apply_finetune(
    transformer, cfg: FinetuneConfig, seed: int | None = 0
) -> list[torch.nn.Parameter]:
    """Make the transformer trainable as configured; returns the trainable parameters.

    LoRA: peft adapters named ``default`` on ``cfg.target_modules``, gaussian init for A and
    zeros for B (so the adapted model starts equal to the base), cast to fp32. The init
    draws from a generator seeded with ``seed`` (the global RNG is left alone), so every
    rank and every process starts from the same adapters; ``seed=None`` uses the global RNG.
    """
    if cfg.mode == "full":
        transformer.requires_grad_(True)
        return list(transformer.parameters())
    from peft import LoraConfig

    transformer.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",
        target_modules=list(cfg.target_modules),
    )
    if seed is None:
        transformer.add_adapter(lora)
    else:
        devices = [transformer.device] if transformer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            transformer.add_adapter(lora)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"finetune.target_modules={cfg.target_modules} matched no module")
    for p in params:
        p.data = p.data.float()
    return params


class Generator:
    """An SD3 pipeline split into the trainable transformer and its frozen helpers.

    ``transformer`` is what a DeepSpeed engine wraps; the VAE, text encoders, tokenizers and
    scheduler config stay here. ``attention`` is the resolved backend. ``prompt_encoder``:
    where prompt embeddings come from when the text encoders live elsewhere
    (``generator.text_encoders: actor``), called like :meth:`encode_prompts`.
    """

    def __init__(self, pipe, attention: str, finetune: FinetuneConfig | None):
        self.pipe = pipe
        self.attention = attention
        self.finetune = finetune
        self.prompt_encoder: Callable[..., PromptEmbeds] | None = None

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.pipe.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.vae.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        guidance_scale: float = 0.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
    ) -> PromptEmbeds:
        """The pipeline's own ``encode_prompt``; negatives only when ``guidance_scale > 1``.
        With a :attr:`prompt_encoder`, its embeddings, moved to this device and dtype."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, not a single string")
        if self.prompt_encoder is not None:
            out = self.prompt_encoder(
                list(prompts), guidance_scale, negative_prompt, max_sequence_length
            )
            return out.to(self.device, self.dtype)
        if self.pipe.text_encoder is None:
            raise ValueError(
                "generator.text_encoders=actor: this generator has no text encoders and no "
                "prompt_encoder attached"
            )
        cfg = guidance_scale > 1
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt if cfg else None,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbeds(pe, pooled, npe if cfg else None, npooled if cfg else None)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents for ``height x width`` pixel images."""
        f = self.vae_scale_factor
        if height % (f * self.transformer.config.patch_size) or width % (
            f * self.transformer.config.patch_size
        ):
            raise ValueError(
                f"sampler.height={height} and width={width} must be multiples of "
                f"{f * self.transformer.config.patch_size} for this model"
            )
        return (self.transformer.config.in_channels, height // f, width // f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1], differentiable.

        ``latents / scaling_factor + shift_factor``, VAE decode, then ``x / 2 + 0.5`` clamped,
        as ``StableDiffusion3Pipeline`` and its image processor do.
        """
        c = self.vae.config
        z = latents / c.scaling_factor + c.shift_factor
        x = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)


def load_generator(
    cfg: GeneratorConfig,
    finetune: FinetuneConfig | None = None,
    device: str | torch.device | None = None,
) -> Generator:
    """Load (or build) the pipeline, set attention, make the transformer trainable, and turn
    on gradient checkpointing (transformer blocks and VAE decoder) if configured.

    ``finetune=None`` gives a frozen generator (evaluation, references).
    """
    cfg.validate()
    if finetune is not None:
        finetune.validate()
    pipe = load_pipeline(cfg, device)
    attention = set_attention_backend(pipe.transformer, cfg.attention)
    if finetune is not None:
        apply_finetune(pipe.transformer, finetune, seed=cfg.seed)
        pipe.transformer.train()
    set_gradient_checkpointing(pipe, cfg.gradient_checkpointing, cfg.vae_gradient_checkpointing)
    log.info(
        "generator %s on %s (%s), attention=%s, finetune=%s",
        cfg.model,
        pipe.vae.device,
        pipe.vae.dtype,
        attention,
        finetune.mode if finetune else "frozen",
    )
    return Generator(pipe, attention, finetune)


def set_gradient_checkpointing(pipe, enabled: bool, vae: bool | None = None) -> None:
    """Checkpoint the transformer blocks (``enabled``) and the VAE decoder's mid and up blocks
    (``vae``; None: as ``enabled``): their activations are recomputed in backward."""
    for m, on in ((pipe.transformer, enabled), (pipe.vae, enabled if vae is None else vae)):
        if on:
            m.enable_gradient_checkpointing()
        else:
            m.disable_gradient_checkpointing()
