"""Preference accuracy on triplets, as in the paper's table."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rewards.base import RewardModel

log = logging.getLogger(__name__)
COLUMNS = ("I2>I1", "I3>I2", "I3>I1", "mean")


def preference_accuracy(scores: torch.Tensor) -> dict[str, float]:
    """Args: scores ``(N, 3)`` for I1, I2, I3. Strict: a tie counts as wrong.
    Returns percentages for I2>I1, I3>I2, I3>I1 and their mean."""
    if scores.dim() != 2 or scores.shape[1] != 3:
        raise ValueError(f"scores must have shape (N, 3), got {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("no triplets to evaluate")
    s1, s2, s3 = scores.double().unbind(-1)
    acc = {
        "I2>I1": (s2 > s1).double().mean().item() * 100,
        "I3>I2": (s3 > s2).double().mean().item() * 100,
        "I3>I1": (s3 > s1).double().mean().item() * 100,
    }
    acc["mean"] = sum(acc.values()) / 3
    return acc


@torch.no_grad()
def score_triplets(
    reward: RewardModel,
    loader: DataLoader,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Score every triplet's three images against its *easy* prompt. Returns ``(N, 3)``."""
    out = []
    for batch in tqdm(loader, desc="scoring", disable=not progress, leave=False):
        imgs = batch["images"].to(device)  # (B, 3, 3, H, W)
        b = imgs.shape[0]
        prompts = list(batch["easy_prompt"]) * 3
        flat = imgs.transpose(0, 1).reshape(3 * b, *imgs.shape[2:])
        out.append(reward(flat, prompts).float().view(3, b).T.cpu())
    if not out:
        raise ValueError("no readable triplets to evaluate")
    return torch.cat(out)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per reward, the paper's columns."""
    head = "| reward | " + " | ".join(f"{c} (%)" for c in ("mean", *COLUMNS[:3])) + " |"
    lines = [head, "|" + "---|" * 5]
    for name, acc in results.items():
        vals = " | ".join(f"{acc[c]:.2f}" for c in ("mean", *COLUMNS[:3]))
        lines.append(f"| {name} | {vals} |")
    return "\n".join(lines)


def write_json(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return path
