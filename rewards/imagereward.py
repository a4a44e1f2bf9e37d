"""ImageReward (Xu et al., arXiv 2304.05977): BLIP + an MLP head, trained on ranked images.

Architecture as released (``THUDM/ImageReward``, ``ImageReward.pt``): BLIP's ViT-L/16 image
encoder at 224 px; a BERT-base text encoder whose layers cross-attend to the image tokens; the
output of the first text token (``[CLS]``) through the activation-free MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts 0.2, 0.2, 0.1); the score is
``(head - 0.16717362830052426) / 1.0333394966054072``. Both towers are transformers' BLIP
classes; the released weights load through :func:`map_original_keys`, which renames the
original BLIP names (timm ViT, BLIP ``med.py``) to transformers' and refuses any key it does
not know.

The reference tokenises the prompt with BLIP's BERT tokenizer (``[DEC]`` and ``[ENC]`` added
as special tokens; max length 35, padded to it, truncated) and feeds ``input_ids`` as they
are: in its scoring, training and ReFL code the first token stays ``[CLS]`` (BLIP's
``enc_token_id`` swap is not applied), and so it stays here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RewardModel, clip_preprocess
from rewards.checkpoints import find_file, load_state_dict_file, strict_load
from rewards.errors import ConfigError, MissingPathError
from rewards.heads import DEFAULT_DROPOUT, DEFAULT_HIDDEN, MLPHead

log = logging.getLogger(__name__)

MEAN = 0.16717362830052426
STD = 1.0333394966054072
HUB_REPO = "THUDM/ImageReward"
HUB_FILE = "ImageReward.pt"
CONFIG_DIR = Path(__file__).parent / "model_configs"
SIZES = {"large": CONFIG_DIR / "imagereward", "tiny": CONFIG_DIR / "tiny-imagereward"}
OPTIONS = ("size", "tokenizer", "pretrained")

# Original name (after ``blip.visual_encoder.``) -> transformers ``BlipVisionModel`` name.
_VISION_KEYS = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]
# BLIP's med.py names its BERT parts as transformers' BlipTextModel does.
_PREFIXES = {
    "blip.visual_encoder.": "backbone.vision.",
    "blip.text_encoder.": "backbone.text.",
    "mlp.": "head.",
}
# In the released file but not part of the score: BLIP's contrastive projections, and a
# position-id buffer that transformers rebuilds.
_DROPPED = re.compile(
    r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids"
)


def map_original_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of the reference ``ImageReward`` module (``blip.visual_encoder.*``,
    ``blip.text_encoder.*``, ``mlp.layers.*``) to :class:`ImageRewardModel`'s names.

    Only the keys in ``_DROPPED`` are left out; any other key without a mapping raises
    :class:`ConfigError`, so no weight is ever silently ignored.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if _DROPPED.fullmatch(key):
            continue
        new = _map_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ConfigError(
            f"ImageReward checkpoint: {len(unknown)} key(s) with no mapping, e.g. {unknown[:5]}"
        )
    return out


def _map_key(key: str) -> str | None:
    for old, new in _PREFIXES.items():
        if not key.startswith(old):
            continue
        rest = key[len(old) :]
        if old == "blip.visual_encoder.":
            for pattern, repl in _VISION_KEYS:
                if re.fullmatch(pattern, rest):
                    return new + re.sub(pattern, repl, rest)
            return None
        return new + rest
    return None


class BlipBackbone(nn.Module):
    """BLIP's image encoder and its image-grounded text encoder (transformers classes)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        # is_decoder=True is what gives BlipTextModel its cross-attention layers; forward
        # runs it as an encoder (bidirectional mask).
        self.vision = BlipVisionModel(BlipVisionConfig(**config["vision"]))
        self.text = BlipTextModel(BlipTextConfig(**config["text"]), add_pooling_layer=False)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """pixels ``(B, 3, S, S)`` normalised; input_ids, attention_mask ``(B, T)`` ->
        the first text token's output ``(B, D_text)``."""
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
        )
        return out.last_hidden_state[:, 0]

    def freeze(self, text_fraction: float = 0.0, vision_fraction: float = 0.0) -> None:
        """Freeze each encoder by ``fraction``, as the reference's ``fix_rate``: the embeddings
        and the first ``int(fraction * L)`` of its ``L`` transformer layers (``1``: all of
        it). The reference also froze the first parameter of the next layer, an artefact of
        its loop that is not kept."""
        for which, frac in (("text", text_fraction), ("vision", vision_fraction)):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"freeze.{which}_fraction={frac} must be in [0, 1]")
            model = self.text if which == "text" else self.vision
            layers = model.encoder.layer if which == "text" else model.encoder.layers
            if frac >= 1.0:
                targets = [model]
            elif frac <= 0.0:
                targets = []
            else:
                targets = [model.embeddings, *layers[: int(frac * len(layers))]]
            for m in targets:
                for p in m.parameters():
                    p.requires_grad_(False)


def build_tokenizer(ref: str | Path, where: str = "options.tokenizer"):
    """BLIP's tokenizer: BERT's WordPiece from a hub id or a local folder, with ``[DEC]``
    (bos) and ``[ENC]`` added as BLIP adds them (ids 30522 and 30523 for bert-base-uncased)."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(str(ref))
    except Exception as e:  # offline, no vocab.txt, unknown repo: all end here
        raise MissingPathError(
            f"{where}={str(ref)!r}: cannot load a BERT tokenizer from it "
            f"({type(e).__name__}); give a local folder holding vocab.txt"
        ) from e
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardModel(RewardModel):
    """``(images (B, 3, H, W) in [0, 1], B prompts) -> scores (B,)``, differentiable w.r.t.
    ``images``. Pre-processing as the reference (bicubic resize of the short side, centre
    crop, OpenAI CLIP mean/std), in torch; the reference resizes with PIL, so pixels differ
    slightly from its ``score()`` on a PIL image."""

    def __init__(self, config: dict, tokenizer):
        super().__init__()
        self.backbone = BlipBackbone(config)
        self.head = MLPHead(config["text"]["hidden_size"], DEFAULT_HIDDEN, DEFAULT_DROPOUT)
        self.tokenizer = tokenizer
        self.image_size = int(config["image_size"])
        self.max_length = int(config["max_length"])
        vocab = config["text"]["vocab_size"]
        if len(tokenizer) > vocab:
            raise ConfigError(
                f"options.tokenizer has {len(tokenizer)} tokens, more than the text encoder's "
                f"vocab_size={vocab}"
            )

    def tokenize(self, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, each ``(B, max_length)`` long, on ``device``."""
        enc = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> normalised ``(B, 3, S, S)``."""
        return clip_preprocess(images, self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def head_logits(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The MLP head's raw output ``(B,)`` from normalised pixels and token ids (the
        reference's ``mlp(txt_features)``, before normalisation)."""
        dtype = next(self.backbone.vision.parameters()).dtype
        features = self.backbone(pixels.to(dtype), input_ids, attention_mask)
        return self.head(features.to(self.head.layers[0].weight.dtype))

    def logits(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw head outputs ``(B,)``: what the pairwise ranking loss trains."""
        ids, mask = self.tokenize(prompts, images.device)
        return self.head_logits(self.pixels(images), ids, mask)

    def score(self, images, prompts):
        return (self.logits(images, prompts) - MEAN) / STD


def load_config(size: str) -> tuple[dict, Path]:
    if size not in SIZES:
        raise ConfigError(f"options.size={size!r} must be one of {sorted(SIZES)}")
    folder = SIZES[size]
    return json.loads((folder / "config.json").read_text()), folder


def _released_file(ckpt: Path | None) -> Path:
    """The ``ImageReward.pt`` to load: the file given, the one in a folder given (a copy of
    the hub repo), or, with no checkpoint, the one in the hub repo ``THUDM/ImageReward``."""
    if ckpt is None:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(HUB_REPO, HUB_FILE))
        except Exception as e:  # offline, moved: all end here
            raise MissingPathError(
                f"imagereward: cannot fetch {HUB_FILE} from the Hugging Face hub repo "
                f"{HUB_REPO} ({type(e).__name__}); download it and give checkpoint: <path>, "
                "or set options.pretrained: false for random weights"
            ) from e
    return ckpt if ckpt.is_file() else find_file(ckpt, HUB_FILE)


def build_imagereward(options: dict, ckpt: Path | None) -> tuple[ImageRewardModel, dict]:
    """The model and the options that rebuild its architecture (``pretrained`` set false:
    a saved copy carries its own weights).

    Options: ``size`` (``large``, as released, the default; ``tiny`` for tests and CPU runs),
    ``tokenizer`` (hub id or local folder; default: the size's own), ``pretrained`` (default
    true for ``large``: with no checkpoint, fetch ``ImageReward.pt`` from the hub).
    ``ckpt``: an ``ImageReward.pt`` (torch file of the reference module's state dict, read
    with ``weights_only=True``) or a folder holding one.
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ConfigError(
            f"options: unknown key(s) {sorted(unknown)} (known: {', '.join(OPTIONS)})"
        )
    size = options.get("size", "large")
    config, folder = load_config(size)
    tok_ref = options.get("tokenizer") or config["tokenizer"] or folder
    model = ImageRewardModel(config, build_tokenizer(tok_ref))
    pretrained = options.get("pretrained", size == "large")
    if ckpt is not None or pretrained:
        path = _released_file(ckpt)
        mapped = map_original_keys(load_state_dict_file(path))
        strict_load(model, mapped, what=str(path))
    opts = {"size": size, "pretrained": False}
    if options.get("tokenizer"):
        opts["tokenizer"] = str(options["tokenizer"])
    return model, opts
