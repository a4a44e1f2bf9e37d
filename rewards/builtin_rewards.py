"""The built-in rewards: a factory per name (``ict``, ``hp``, ``clip``, ...) that builds the
architecture and loads the released weights of a checkpoint in their own layout, and the CLIP
backbones the options may name (``tiny``, ``tiny-hf``, ``world`` or a backbone spec)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rewards import world
from rewards.backbones import TINY_HF_CLIP_DIR, TINY_OPEN_CLIP, BackboneSpec, build_backbone
from rewards.base import RewardModel
from rewards.checkpoints import find_file, load_state_dict_file, strict_load
from rewards.errors import ConfigError, MissingPathError
from rewards.hp import AestheticReward, HPReward
from rewards.ict import ClipCosineReward
from rewards.ict_hp import ICTHPReward

_BACKBONE_ALIASES = {
    "tiny": {"kind": "open_clip", "model": TINY_OPEN_CLIP},
    "tiny-hf": {"kind": "hf", "model": str(TINY_HF_CLIP_DIR)},
    # The miniature world's pretrained CLIP (rlhf world build), with its own tokenizer.
    "world": {
        "kind": "open_clip",
        "model": str(world.CLIP_DIR / "open_clip_config.json"),
        "pretrained": str(world.CLIP_DIR / "open_clip.safetensors"),
        "extra": {"tokenizer": str(world.CLIP_DIR / "tokenizer")},
    },
}
PAPER_BACKBONE = {"kind": "open_clip", "model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}


def _backbone(options: dict, default: dict | str) -> BackboneSpec:
    b = options.get("backbone", default)
    b = _BACKBONE_ALIASES.get(b, b) if isinstance(b, str) else b
    return BackboneSpec.from_dict(b)


def tag_reward(model: RewardModel, name: str, options: dict) -> RewardModel:
    """Record the name and options ``model`` was built from (what :func:`rewards.registry.save_reward` writes)."""
    model.reward_name, model.reward_options = name, options
    return model


def _build_cosine(name: str, default_backbone, **kw):
    def factory(options: dict, ckpt: Path | None) -> RewardModel:
        spec = _backbone(options, default_backbone)
        if name == "pickscore" and ckpt is not None:
            spec = BackboneSpec("hf", str(ckpt), True)
            ckpt = None
        opts = {**options, "backbone": spec.to_dict()}
        model = ClipCosineReward(build_backbone(spec), **kw)
        if ckpt is not None:
            # A bare CLIP state dict: the released ICT (a transformers CLIPModel).
            path = ckpt if ckpt.is_file() else find_file(ckpt, *_CLIP_FILES)
            strict_load(model.backbone.model, load_state_dict_file(path), what=str(path))
        return tag_reward(model, name, opts)

    return factory


_CLIP_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
_HEAD_FILES = ("mlp_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


def _build_hp(options: dict, ckpt: Path | None) -> RewardModel:
    spec = _backbone(options, PAPER_BACKBONE)
    opts = {**options, "backbone": spec.to_dict()}
    model = HPReward(
        build_backbone(spec), head=options.get("head"), normalize=options.get("normalize", False)
    )
    if ckpt is not None:
        # The released layout: hp_backbone/<CLIPModel state dict>, hp_scorer/<MLP state dict>.
        bb = find_file(ckpt / "hp_backbone", *_CLIP_FILES)
        head = find_file(ckpt / "hp_scorer", *_HEAD_FILES)
        strict_load(model.backbone.model, load_state_dict_file(bb), what=str(bb))
        strict_load(model.head, load_state_dict_file(head), what=str(head))
    return tag_reward(model, "hp", opts)


# The LAION aesthetic predictor ran on OpenAI's ViT-L/14 (``clip.load``), which uses QuickGELU;
# open_clip's plain ``ViT-L-14`` uses GELU and would change every feature.
AESTHETIC_BACKBONE = {"kind": "open_clip", "model": "ViT-L-14-quickgelu", "pretrained": "openai"}

# HPSv2 (tgxs002/HPSv2, ``hps_version_map``): the hub repo and its file per version.
HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}


def _build_hpsv2(options: dict, ckpt: Path | None) -> RewardModel:
    """open_clip ViT-H-14 with the HPSv2 weights (the whole CLIP, ``{"state_dict": ...}``);
    score = cosine, as ``hpsv2.score``. ``options.version``: ``"2.0"`` (the default of
    ``hpsv2.score``) or ``"2.1"``. ``ckpt``: that file, or a folder holding it (a copy of the
    hub repo); none: the file is fetched from the hub repo ``xswu/HPSv2``."""
    options = dict(options)
    version = str(options.pop("version", "2.0")).removeprefix("v")
    if version not in HPSV2_FILES:
        raise ConfigError(f"options.version={version!r} must be one of {sorted(HPSV2_FILES)}")
    filename = HPSV2_FILES[version]
    if ckpt is None:
        from huggingface_hub import hf_hub_download

        try:
            ckpt = Path(hf_hub_download(HPSV2_REPO, filename))
        except Exception as e:  # offline, moved: all end here
            raise MissingPathError(
                f"hpsv2: cannot fetch {filename} from the Hugging Face hub repo {HPSV2_REPO} "
                f"({type(e).__name__}); download it and give checkpoint: <path to the file>"
            ) from e
    elif ckpt.is_dir():
        ckpt = find_file(ckpt, filename)
    spec = _backbone(options, {"kind": "open_clip", "model": "ViT-H-14"})
    model = ClipCosineReward(build_backbone(spec))
    strict_load(model.backbone.model, load_state_dict_file(ckpt), what=str(ckpt))
    return tag_reward(model, "hpsv2", {**options, "version": version, "backbone": spec.to_dict()})


def _build_aesthetic(options: dict, ckpt: Path | None) -> RewardModel:
    spec = _backbone(options, AESTHETIC_BACKBONE)
    model = AestheticReward(build_backbone(spec), head=options.get("head"))
    if ckpt is not None:
        path = ckpt if ckpt.is_file() else find_file(ckpt, *_HEAD_FILES)
        strict_load(model.head, load_state_dict_file(path), what=str(path))
    return tag_reward(model, "aesthetic", {**options, "backbone": spec.to_dict()})


def _build_ict_hp(options: dict, ckpt: Path | None) -> RewardModel:
    # Its parts are rewards built by name; the registry imports this module, hence here.
    from rewards.registry import RewardSpec, build_reward

    if ckpt is not None:
        raise ConfigError(
            "ict_hp takes no checkpoint of its own: give options.ict.checkpoint and "
            "options.hp.checkpoint"
        )
    parts = {}
    for part in ("ict", "hp"):
        sub = dict(options.get(part) or {})
        if sub.get("name", part) != part:
            # Options may come from a checkpoint's reward.json: they must not pick code.
            raise ConfigError(f"options.{part}.name={sub['name']!r}: must be {part!r} or unset")
        sub.setdefault("options", {})
        if "backbone" in options:
            sub["options"].setdefault("backbone", options["backbone"])
        parts[part] = build_reward(RewardSpec.from_dict({"name": part, **sub}, f"options.{part}"))
    model = ICTHPReward(parts["ict"], parts["hp"])
    return tag_reward(model, "ict_hp", options)


def _build_imagereward(options: dict, ckpt: Path | None) -> RewardModel:
    from rewards.imagereward import build_imagereward

    model, opts = build_imagereward(options, ckpt)
    return tag_reward(model, "imagereward", opts)


def _build_geneval_mini(options: dict, ckpt: Path | None) -> RewardModel:
    from rewards.world.geneval import GenEvalMini
    from rewards.world.judge import Judge

    if options:
        raise ConfigError(f"geneval_mini takes no options, got {sorted(options)}")
    return tag_reward(GenEvalMini(Judge.load(ckpt or world.JUDGE_DIR)), "geneval_mini", options)


BUILTINS: dict[str, tuple[Callable, str]] = {
    "ict": (_build_cosine("ict", PAPER_BACKBONE), "ICT: cosine of a CLIP fine-tuned on ICT labels"),
    "hp": (_build_hp, "HP: CLIP image tower + MLP head, sigmoid score (image only)"),
    "ict_hp": (_build_ict_hp, "ICT x HP"),
    "clip": (_build_cosine("clip", PAPER_BACKBONE), "CLIP score: cosine of a pretrained CLIP"),
    "pickscore": (
        _build_cosine(
            "pickscore",
            {"kind": "hf", "model": "yuvalkirstain/PickScore_v1", "pretrained": True},
            use_logit_scale=True,
        ),
        "PickScore: transformers CLIPModel, logit_scale * cosine",
    ),
    "hpsv2": (
        _build_hpsv2,
        "HPSv2: open_clip ViT-H-14 + HPS_v2(.1)_compressed.pt from xswu/HPSv2, cosine",
    ),
    "aesthetic": (_build_aesthetic, "LAION aesthetic MLP on CLIP ViT-L/14 image features"),
    "imagereward": (
        _build_imagereward,
        "ImageReward: BLIP ViT-L/16 + BERT cross-attention + MLP head (THUDM/ImageReward.pt)",
    ),
    "geneval_mini": (
        _build_geneval_mini,
        "GenEval in miniature: the world's judge, 1 if an image meets its prompt (eval only)",
    ),
}
# Evaluators: scored at evaluation only, refused among the rewards that are optimised.
EVAL_ONLY = frozenset({"geneval_mini"})
# Built-ins whose weights come from a fixed hub id when no checkpoint is given (hpsv2 fetches
# its one file itself).
DEFAULT_CHECKPOINTS: dict[str, str] = {}


def list_rewards() -> dict[str, str]:
    """Built-in reward names and a line about each."""
    return {k: v[1] for k, v in BUILTINS.items()}
