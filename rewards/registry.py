"""Rewards by name or import path, and their checkpoints.

A reward spec (one entry of a config's ``rewards:`` list)::

    {name: ict, weight: 1.0, checkpoint: models:/ict/3, placement: server,
     options: {backbone: tiny}}

``name`` is a built-in (:mod:`rewards.builtin_rewards`, see :func:`list_rewards` there) or
``package.module:factory``; ``checkpoint`` is a local file or folder, a hub id, or an MLflow
model URI (``models:/name/version``, ``models:/name@alias``, ``runs:/...``), located by
:mod:`rewards.checkpoint_refs`.
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

from rewards.base import RewardModel
from rewards.builtin_rewards import BUILTINS, DEFAULT_CHECKPOINTS, tag_reward
from rewards.checkpoint_refs import (
    MLFLOW_PREFIXES,
    check_hub_id,
    check_mlflow_ref,
    is_hub_id,
    resolve_checkpoint,
)
from rewards.checkpoints import load_state_dict_file, strict_load
from rewards.errors import ConfigError, UntrustedCheckpointError

log = logging.getLogger(__name__)

PLACEMENTS = ("colocated", "server")
REWARD_FILE = "reward.json"
WEIGHTS_FILE = "model.safetensors"


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
        check_mlflow_ref(ref, key)
    elif ref.startswith(MLFLOW_PREFIXES):
        return
    elif os.path.exists(ref):
        # A local reward folder is read now: one that names code is refused before anything
        # starts (MLflow and hub checkpoints are checked the same way when they are built).
        meta = Path(ref) / REWARD_FILE
        if meta.is_file():
            name = json.loads(meta.read_text()).get("name")
            _check_trusted(Path(ref), name, spec.name if ":" in spec.name else None)
    elif is_hub_id(ref):
        check_hub_id(ref, key)
    else:
        resolve_checkpoint(ref, key)  # raises the missing-path error


def build_reward(spec: RewardSpec | dict | str, where: str = "reward") -> RewardModel:
    """Build one reward model (weights loaded, in eval mode) from a spec; errors name
    ``where`` (e.g. ``rewards[0]``)."""
    if not isinstance(spec, RewardSpec):
        spec = RewardSpec.from_dict(spec, where)
    ckpt = spec.checkpoint or DEFAULT_CHECKPOINTS.get(spec.name)
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
            tag_reward(model, spec.name, dict(spec.options))
    else:
        model = BUILTINS[spec.name][0](dict(spec.options), path)
    return model.eval()
