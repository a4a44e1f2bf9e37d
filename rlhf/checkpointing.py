"""The checkpoint manifest of a fine-tuning run: what makes a checkpoint folder trustworthy.

A checkpoint (``<run_dir>/checkpoints/step_NNNNNN``) is a resume bundle plus the policy
export. Ray Train copies it into place and rotates old ones (``CheckpointConfig``); neither
Ray nor the file system says whether every file arrived whole, so the folder gets
``manifest.json`` (size and sha256 of every file), written last, and a resume takes the
newest folder that matches its manifest, naming the first bad file of each one it skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rewards.checkpoints import file_sha256

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt (the message names it)."""


def write_manifest(folder: Path, step: int) -> None:
    """Sizes and hashes of every file under ``folder``, written last and atomically: a
    checkpoint without a manifest is incomplete."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(folder: Path) -> int:
    """The checkpoint's step if every file matches its manifest; else :class:`CheckpointError`
    naming the first bad file."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {MANIFEST})")
    try:
        doc = json.loads(manifest.read_text())
    except ValueError as e:
        raise CheckpointError(f"{manifest}: corrupt manifest ({e})") from e
    for rel, want in doc["files"].items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing checkpoint file")
        if p.stat().st_size != want["bytes"]:
            raise CheckpointError(
                f"{p}: truncated or changed ({p.stat().st_size} bytes, expected {want['bytes']})"
            )
        if file_sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: corrupt checkpoint file (hash mismatch)")
    return int(doc["step"])


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """``run_dir/checkpoints/step_*``, newest first (a step written again after a resume from
    an older checkpoint, ``step_N-2``, sorts before ``step_N``)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=_order, reverse=True)


def _order(p: Path) -> tuple[int, int]:
    step, _, again = p.name[len("step_") :].partition("-")
    return int(step) if step.isdigit() else -1, int(again) if again.isdigit() else 0


def checkpoint_name(run_dir: Path, step: int) -> str:
    """A new folder name for ``step``'s checkpoint: ``step_NNNNNN``, or ``step_NNNNNN-2``, ...
    when a resume from an older checkpoint computes the step again (Ray Train keeps the old
    folder on its books until it rotates it out, so it is never overwritten)."""
    root = Path(run_dir) / CHECKPOINTS
    name, n = f"step_{step:06d}", 1
    while (root / name).exists():
        n += 1
        name = f"step_{step:06d}-{n}"
    return name
