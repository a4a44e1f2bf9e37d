"""Reading weight files safely and loading them strictly.

Safetensors is preferred; legacy ``.bin``/``.pt``/``.pth`` files go through
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rewards.errors import ConfigError, MissingPathError

# Buffers that older transformers versions saved and newer ones rebuild; harmless to drop.
_BENIGN_UNEXPECTED = ("position_ids",)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A checkpoint that wraps its weights (``{"state_dict": ...}`` as HPSv2 ships) is unwrapped,
    and a ``module.`` prefix left by DDP is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            # Read, not mmap: a file replaced while mapped would crash the process (SIGBUS).
            sd = load(path.read_bytes())
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files surface here
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"checkpoint {path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def strict_load(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "") -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatched keys.

    Only known-benign legacy buffers (``position_ids``) are dropped first, so no weight is
    ever silently ignored.
    """
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if k in own or not k.endswith(_BENIGN_UNEXPECTED)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {what or ''} does not match {type(module).__name__}: "
            f"{len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"checkpoint {what} shape mismatch for {k}: "
            f"{tuple(sd[k].shape)} vs {tuple(own[k].shape)} ({len(bad)} key(s) differ)"
        )
    module.load_state_dict(sd, strict=True)


def find_file(folder: str | os.PathLike, *names: str) -> Path:
    """The first of ``names`` that exists in ``folder``; a clear error otherwise."""
    folder = Path(folder)
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise MissingPathError(f"none of {list(names)} found in {folder}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoint and world manifests)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
