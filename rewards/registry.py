"""Rewards by name or import path, and their checkpoints.

A reward spec (one entry of a config's ``rewards:`` list)::

    {name: ict, weight: 1.0, checkpoint: models:/ict/3, placement: server,
     options: {backbone: tiny}}

``name`` is a built-in (see :func:`list_rewards`) or ``package.module:factory``; ``checkpoint``
is a local file or folder, a hub id, or an MLflow model URI (``models:/name/version``,
``models:/name@alias``, ``runs:/...``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from rewards import world
from rewards.backbones import TINY_HF_CLIP_DIR, TINY_OPEN_CLIP, BackboneSpec, build_backbone
from rewards.base import RewardModel
from rewards.checkpoints import find_file, load_state_dict_file, strict_load
from rewards.errors import ConfigError, MissingPathError, UntrustedCheckpointError
from rewards.hp import AestheticReward, HPReward
from rewards.ict import ClipCosineReward
from rewards.ict_hp import ICTHPReward

log = logging.getLogger(__name__)

PLACEMENTS = ("colocated", "server")
REWARD_FILE = "reward.json"
WEIGHTS_FILE = "model.safetensors"
_MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
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


@dataclass
class RewardSpec:
    name: str
    weight: float = 1.0
    checkpoint: str | None = None
    placement: str = "colocated"
    label: str | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict | str, where: str = "reward") -> RewardSpec:
        if isinstance(d, str):
            d = {"name": d}
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a mapping with a 'name', got {d!r}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        if "name" not in d or not d["name"]:
            raise ConfigError(f"{where}.name is required")
        spec = cls(**d)
        if not isinstance(spec.weight, (int, float)):
            raise ConfigError(f"{where}.weight={spec.weight!r} must be a number")
        if spec.placement not in PLACEMENTS:
            raise ConfigError(f"{where}.placement={spec.placement!r} must be one of {PLACEMENTS}")
        if spec.name not in BUILTINS and ":" not in spec.name:
            raise ConfigError(
                f"{where}.name={spec.name!r} is not a known reward "
                f"(built-ins: {', '.join(sorted(BUILTINS))}; or use 'package.module:factory')"
            )
        return spec

    @property
    def key(self) -> str:
        return self.label or self.name.split(":")[-1]


# --------------------------------------------------------------------------- checkpoints


def is_hub_id(ref: str) -> bool:
    """``owner/name`` that the hub accepts as a repository id, with no such local path and
    nothing that reads as a path: no weight-file suffix, no local folder called ``owner``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.count("/") != 1 or os.path.exists(ref):
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    owner, name = ref.split("/")
    return not os.path.isdir(owner) and Path(name).suffix not in _WEIGHT_SUFFIXES


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")


def resolve_checkpoint(ref: str | os.PathLike, where: str = "checkpoint") -> Path:
    """A local path for a checkpoint reference: local path, MLflow URI, or hub id.

    ``where`` (e.g. ``rewards[0].checkpoint``) names the reference in errors.
    """
    ref = str(ref)
    if ref.startswith(_MLFLOW_PREFIXES):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(ref))
        except Exception as e:  # MlflowException, OSError: not found, store unreachable
            raise MissingPathError(f"{where}={ref!r}: cannot fetch from MLflow: {e}") from e
    if os.path.exists(ref):
        return Path(ref)
    if is_hub_id(ref):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref))
        except Exception as e:  # offline, unknown repo, gated: all end here
            raise MissingPathError(
                f"{where}={ref!r}: no such local path, and fetching it from the Hugging Face "
                f"hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})"
            ) from e
    raise MissingPathError(f"{where}={ref!r}: no such file or folder (relative to {os.getcwd()})")


def save_reward(model: RewardModel, folder: str | os.PathLike) -> Path:
    """Write ``reward.json`` + ``model.safetensors`` (our own format), atomically per file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": 1, "name": model.reward_name, "options": model.reward_options}
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, folder / WEIGHTS_FILE)
    tmp = folder / (REWARD_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / REWARD_FILE)
    return folder


def load_reward(folder: str | os.PathLike, allowed: str | None = None) -> RewardModel:
    """Inverse of :func:`save_reward`; builds the architecture without pretrained weights.

    A checkpoint never chooses code: its ``reward.json`` may name a built-in reward, or
    ``allowed`` (the import path the user's own config names); anything else is refused
    before any import.
    """
    folder = Path(folder)
    meta = json.loads((folder / REWARD_FILE).read_text())
    name = meta.get("name")
    _check_trusted(folder, name, allowed)
    options = _without_pretrained(meta["options"])
    model = build_reward(RewardSpec(name=name, options=options))
    strict_load(model, load_state_dict_file(folder / WEIGHTS_FILE), what=str(folder))
    return model


def _check_trusted(folder: Path, name, allowed: str | None) -> None:
    if name not in BUILTINS and (name != allowed or not allowed):
        raise UntrustedCheckpointError(
            f"{folder / REWARD_FILE} names reward {name!r}, which is not a built-in reward"
            + (f" nor {allowed!r}, the reward your config names" if allowed else "")
            + "; refusing it: a checkpoint may not choose which code runs"
        )


def _without_pretrained(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if k == "backbone" and isinstance(v, dict):
            v = {**v, "pretrained": None} if v.get("kind", "open_clip") == "open_clip" else v
        elif isinstance(v, dict):
            v = _without_pretrained(v)
        out[k] = v
    return out


# --------------------------------------------------------------------------- built-ins


def _backbone(options: dict, default: dict | str) -> BackboneSpec:
    b = options.get("backbone", default)
    b = _BACKBONE_ALIASES.get(b, b) if isinstance(b, str) else b
    return BackboneSpec.from_dict(b)


def _tag(model: RewardModel, name: str, options: dict) -> RewardModel:
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
        return _tag(model, name, opts)

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
    return _tag(model, "hp", opts)


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
    return _tag(model, "hpsv2", {**options, "version": version, "backbone": spec.to_dict()})


def _build_aesthetic(options: dict, ckpt: Path | None) -> RewardModel:
    spec = _backbone(options, AESTHETIC_BACKBONE)
    model = AestheticReward(build_backbone(spec), head=options.get("head"))
    if ckpt is not None:
        path = ckpt if ckpt.is_file() else find_file(ckpt, *_HEAD_FILES)
        strict_load(model.head, load_state_dict_file(path), what=str(path))
    return _tag(model, "aesthetic", {**options, "backbone": spec.to_dict()})


def _build_ict_hp(options: dict, ckpt: Path | None) -> RewardModel:
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
    return _tag(model, "ict_hp", options)


def _build_imagereward(options: dict, ckpt: Path | None) -> RewardModel:
    from rewards.imagereward import build_imagereward

    model, opts = build_imagereward(options, ckpt)
    return _tag(model, "imagereward", opts)


def _build_geneval_mini(options: dict, ckpt: Path | None) -> RewardModel:
    from rewards.world.geneval import GenEvalMini
    from rewards.world.judge import Judge

    if options:
        raise ConfigError(f"geneval_mini takes no options, got {sorted(options)}")
    return _tag(GenEvalMini(Judge.load(ckpt or world.JUDGE_DIR)), "geneval_mini", options)


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
_DEFAULT_CHECKPOINTS: dict[str, str] = {}


def list_rewards() -> dict[str, str]:
    """Built-in reward names and a line about each."""
    return {k: v[1] for k, v in BUILTINS.items()}


class _CallableReward(RewardModel):
    """Adapts a user's plain callable to the validated interface."""

    def __init__(self, fn: Callable, name: str):
        super().__init__()
        self.fn = fn
        if isinstance(fn, nn.Module):
            self.add_module("module", fn)
        self.reward_name, self.reward_options = name, {}

    def score(self, images, prompts):
        return self.fn(images, prompts)


def _import_factory(path: str, where: str = "reward") -> Callable:
    mod_name, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{where}={path!r}: cannot import module {mod_name!r}: {e}") from e
    if not hasattr(mod, attr):
        raise ConfigError(f"{where}={path!r}: module {mod_name!r} has no attribute {attr!r}")
    return getattr(mod, attr)


def check_reward(spec: RewardSpec, where: str = "reward") -> None:
    """Fail now, naming ``where``, if ``spec`` cannot be built later: its import path does not
    import, or its checkpoint does not exist (local path, MLflow model/run, or hub id). Cheap:
    it fetches nothing but a hub repository's metadata."""
    if ":" in spec.name:
        _import_factory(spec.name, f"{where}.name")
    if spec.name == "ict_hp":
        for part in ("ict", "hp"):
            sub = {"name": part, **(spec.options.get(part) or {})}
            check_reward(
                RewardSpec.from_dict(sub, f"{where}.options.{part}"), f"{where}.options.{part}"
            )
    ref = str(spec.checkpoint or "")
    key = f"{where}.checkpoint"
    if not ref:
        return
    if ref.startswith(("models:/", "runs:/")):
        _check_mlflow_ref(ref, key)
    elif ref.startswith(_MLFLOW_PREFIXES):
        return
    elif os.path.exists(ref):
        # A local reward folder is read now: one that names code is refused before anything
        # starts (MLflow and hub checkpoints are checked the same way when they are built).
        meta = Path(ref) / REWARD_FILE
        if meta.is_file():
            name = json.loads(meta.read_text()).get("name")
            _check_trusted(Path(ref), name, spec.name if ":" in spec.name else None)
    elif is_hub_id(ref):
        _check_hub_id(ref, key)
    else:
        resolve_checkpoint(ref, key)  # raises the missing-path error


def _check_mlflow_ref(ref: str, key: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if ref.startswith("runs:/"):
            client.get_run(ref[len("runs:/") :].split("/")[0])
            return
        name, _, version = ref[len("models:/") :].partition("/")
        name, _, alias = name.partition("@")
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif version.split("/")[0] == "latest":
            if not client.search_model_versions(f"name='{name}'", max_results=1):
                raise MlflowException(f"registered model {name!r} has no versions")
        else:
            client.get_model_version(name, version.split("/")[0])
    except MlflowException as e:
        raise MissingPathError(
            f"{key}={ref!r}: not found in the MLflow store {client.tracking_uri} "
            f"({e.message.splitlines()[0]})"
        ) from e


def _check_hub_id(ref: str, key: str) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(ref, local_files_only=True)
        return
    except Exception:  # not cached: ask the hub below
        pass
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(ref)
    except Exception as e:  # offline, unknown repo, gated
        raise MissingPathError(
            f"{key}={ref!r}: no such local path, and the Hugging Face hub cannot be reached "
            f"or has no such repository ({type(e).__name__})"
        ) from e


def build_reward(spec: RewardSpec | dict | str, where: str = "reward") -> RewardModel:
    """Build one reward model (weights loaded, in eval mode) from a spec; errors name
    ``where`` (e.g. ``rewards[0]``)."""
    if not isinstance(spec, RewardSpec):
        spec = RewardSpec.from_dict(spec, where)
    ckpt = spec.checkpoint or _DEFAULT_CHECKPOINTS.get(spec.name)
    path = resolve_checkpoint(ckpt, f"{where}.checkpoint") if ckpt else None
    if path is not None and (path / REWARD_FILE).is_file():
        model = load_reward(path, allowed=spec.name if ":" in spec.name else None)
    elif ":" in spec.name:
        factory = _import_factory(spec.name, f"{where}.name")
        kwargs = dict(spec.options)
        if path is not None:
            kwargs["checkpoint"] = str(path)
        out = factory(**kwargs)
        model = out if isinstance(out, RewardModel) else _CallableReward(out, spec.name)
        if not hasattr(model, "reward_name"):
            _tag(model, spec.name, dict(spec.options))
    else:
        model = BUILTINS[spec.name][0](dict(spec.options), path)
    return model.eval()
