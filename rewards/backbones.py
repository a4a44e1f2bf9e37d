"""CLIP backbones behind one small interface: open_clip (default) and transformers ``CLIPModel``.

Both expose ``encode_image(pixels)`` and ``encode_text(prompts)`` returning *unnormalised*
features, the input resolution and normalisation constants, and their transformer blocks for
layer freezing. The released ICT/HP weights are transformers ``CLIPModel`` state dicts, which
is why the second kind exists.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from rewards.checkpoints import load_state_dict_file, strict_load

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_OPEN_CLIP = "tiny-clip"
TINY_HF_CLIP_DIR = MODEL_CONFIG_DIR / "tiny-hf-clip"
_registered = False


def register_model_configs() -> None:
    """Make the JSON model configs shipped in ``rewards/model_configs`` known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass
class BackboneSpec:
    """Which CLIP to build.

    kind: ``open_clip`` (``model`` is an open_clip model name, ``pretrained`` a tag or a local
        file) or ``hf`` (``model`` is a hub id or a local folder holding a ``CLIPConfig``;
        ``pretrained=True`` also loads that folder's weights).
    """

    kind: str = "open_clip"
    model: str = TINY_OPEN_CLIP
    pretrained: str | bool | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict | None) -> BackboneSpec:
        d = dict(d or {})
        unknown = set(d) - {"kind", "model", "pretrained", "extra"}
        if unknown:
            raise ValueError(f"backbone: unknown key(s) {sorted(unknown)}")
        spec = cls(**d)
        if spec.kind not in ("open_clip", "hf"):
            raise ValueError(f"backbone.kind={spec.kind!r} must be 'open_clip' or 'hf'")
        return spec

    def to_dict(self) -> dict:
        return asdict(self)


class ClipBackbone(nn.Module):
    """Common interface; see module docstring."""

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> normalised ``(B, 3, S, S)``."""
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def tower(self, which: str) -> Tower:
        """The parts of the ``text`` or ``vision`` tower (for freezing)."""
        raise NotImplementedError

    def freeze(self, text_fraction: float = 0.0, vision_fraction: float = 0.0) -> None:
        """Freeze each tower by ``fraction``, as the reference's ``set_grad_with_rate``.

        - ``0``: nothing frozen; ``1``: the whole tower (embeddings and projection too).
        - In between, for a tower of ``L`` blocks: the first ``int(fraction * (L + 1))`` of
          [block 0, ..., block L-1, final layer norm] (the reference counts that norm as a
          layer) and the output projection are frozen; the embeddings (patch or token, class,
          position) and the norm before the blocks (``pre_layrnorm``, ``ln_pre``) stay
          trainable. The reference HP training: text 1.0, vision 0.5.
        """
        for which, frac in (("text", text_fraction), ("vision", vision_fraction)):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"freeze.{which}_fraction={frac} must be in [0, 1]")
            tower = self.tower(which)
            if frac >= 1.0:
                targets = tower.whole
            elif frac <= 0.0:
                targets = []
            else:
                layers = [*tower.blocks, tower.final_norm]
                targets = layers[: int(frac * len(layers))] + [tower.projection]
            for m in targets:
                for p in m.parameters():
                    p.requires_grad_(False)


@dataclass
class Tower:
    """One CLIP tower's parts: ``blocks`` (transformer blocks, input side first), the
    ``final_norm`` after them, the output ``projection``, and ``whole`` (every module)."""

    blocks: list[nn.Module]
    final_norm: nn.Module
    projection: nn.Module
    whole: list[nn.Module]


class OpenClipBackbone(ClipBackbone):
    """An open_clip model: ``model_name`` is a name open_clip knows, or the path of a JSON
    model config (``embed_dim``, ``vision_cfg``, ``text_cfg``; then ``tokenizer`` is needed).
    ``tokenizer``: a local ``CLIPTokenizer`` folder to use instead of open_clip's own (the
    world CLIP's small vocabulary)."""

    def __init__(
        self, model_name: str, pretrained: str | None = None, tokenizer: str | None = None
    ):
        super().__init__()
        import open_clip

        register_model_configs()
        from_json = str(model_name).endswith(".json")
        if from_json:
            if not os.path.isfile(model_name):
                raise FileNotFoundError(f"backbone.model={model_name}: no such config file")
            if not tokenizer:
                raise ValueError(f"backbone.model={model_name}: give extra.tokenizer as well")
        if from_json or (pretrained and os.path.isfile(str(pretrained))):
            # A local checkpoint: build empty, then load strictly (open_clip's own loader
            # unpickles full checkpoints).
            self.model = (
                open_clip.model.CLIP(**json.loads(Path(model_name).read_text()))
                if from_json
                else open_clip.create_model(model_name, pretrained=None)
            )
            if pretrained:
                strict_load(self.model, load_state_dict_file(pretrained), what=str(pretrained))
        else:
            self.model = open_clip.create_model(model_name, pretrained=pretrained or None)
        self.tokenizer = (
            _FolderTokenizer(tokenizer) if tokenizer else open_clip.get_tokenizer(model_name)
        )
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(self.model.visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        self.std = tuple(getattr(self.model.visual, "image_std", None) or OPENAI_CLIP_STD)
        self.embed_dim = int(self.model.text_projection.shape[-1])

    def encode_image(self, pixels):
        return self.model.encode_image(pixels)

    def encode_text(self, prompts):
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(list(prompts)).to(device))

    def tower(self, which):
        m = self.model
        if which == "text":
            params = [m.positional_embedding, m.text_projection]
            return Tower(
                list(m.transformer.resblocks),
                m.ln_final,
                _ParamHolder([m.text_projection]),
                [m.transformer, m.token_embedding, m.ln_final, _ParamHolder(params)],
            )
        v = m.visual
        if hasattr(v, "attnpool"):
            # open_clip's ModifiedResNet (RN50, the world CLIP's resnet): its four stages are
            # the blocks and the attention pool, which holds the output projection, the last
            # layer; the convolutional stem stays trainable, as a ViT's patch embedding does.
            stages = [v.layer1, v.layer2, v.layer3, v.layer4]
            return Tower(stages, v.attnpool, _ParamHolder([]), [v])
        proj = [v.proj] if getattr(v, "proj", None) is not None else []
        return Tower(list(v.transformer.resblocks), v.ln_post, _ParamHolder(proj), [v])


class _ParamHolder(nn.Module):
    """Lets bare parameters take part in :meth:`ClipBackbone.freeze`."""

    def __init__(self, params):
        super().__init__()
        self._params = list(params)

    def parameters(self, recurse: bool = True):
        return iter(self._params)


class HFClipBackbone(ClipBackbone):
    """transformers ``CLIPModel``. Text is tokenised with open_clip's copy of the CLIP BPE
    (identical ids to ``CLIPTokenizer``), so no tokenizer download is needed."""

    def __init__(
        self,
        model: str | os.PathLike,
        load_weights: bool = False,
        context_length: int | None = None,
    ):
        super().__init__()
        import open_clip
        from transformers import CLIPConfig, CLIPModel

        if load_weights:
            self.model = CLIPModel.from_pretrained(str(model))
        else:
            self.model = CLIPModel(CLIPConfig.from_pretrained(str(model)))
        cfg = self.model.config
        ctx = context_length or cfg.text_config.max_position_embeddings
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
        self.image_size = int(cfg.vision_config.image_size)
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        self.embed_dim = int(cfg.projection_dim)

    def encode_image(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, prompts):
        device = next(self.model.parameters()).device
        ids = self.tokenizer(list(prompts)).to(device)
        mask = text_attention_mask(ids, self.tokenizer.eot_token_id)
        return _features(self.model.get_text_features(input_ids=ids, attention_mask=mask))

    def tower(self, which):
        m = self.model
        if which == "text":
            t = m.text_model
            return Tower(
                list(t.encoder.layers),
                t.final_layer_norm,
                m.text_projection,
                [t, m.text_projection],
            )
        v = m.vision_model
        return Tower(
            list(v.encoder.layers), v.post_layernorm, m.visual_projection, [v, m.visual_projection]
        )


def text_attention_mask(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """``(B, L)`` token ids -> ``(B, L)`` long mask, 1 up to and including the first
    end-of-text token, 0 after it (the padding). Not ``ids != 0``: id 0 is the real token
    ``!`` ("wow!@# a cat" holds one), which only looks like the padding id."""
    is_eot = (ids == eot_id).long()
    after_eot = (is_eot.cumsum(-1) - is_eot) > 0
    return (~after_eot).long()


def _features(out) -> torch.Tensor:
    # transformers 5 may return a model output instead of a bare tensor.
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


class _FolderTokenizer:
    """A saved ``CLIPTokenizer`` called like open_clip's: texts -> ``(B, context)`` ids,
    padded with its pad token (end-of-text) to ``model_max_length``."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import CLIPTokenizer

        if not Path(folder).is_dir():
            raise FileNotFoundError(f"backbone tokenizer folder {folder} does not exist")
        self.tok = CLIPTokenizer.from_pretrained(str(folder))

    def __call__(self, texts) -> torch.Tensor:
        return tokenize(self.tok, texts)


def tokenize(tokenizer, texts) -> torch.Tensor:
    """``(B, model_max_length)`` int64 ids of a ``CLIPTokenizer``, padded with its pad token
    (end-of-text), truncated."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def build_backbone(spec: BackboneSpec | dict | None) -> ClipBackbone:
    spec = spec if isinstance(spec, BackboneSpec) else BackboneSpec.from_dict(spec)
    if spec.kind == "open_clip":
        return OpenClipBackbone(spec.model, spec.pretrained or None, **spec.extra)
    return HFClipBackbone(spec.model, load_weights=bool(spec.pretrained), **spec.extra)
