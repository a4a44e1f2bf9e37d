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
from rewards.ict_hp import ICTHPReward

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


def _triplet_scores(fn, loader: DataLoader, device, progress: bool) -> torch.Tensor:
    """``fn(images (B, 3, 3, H, W), batch) -> (B, 3)`` over ``loader``, concatenated."""
    out = []
    for batch in tqdm(loader, desc="scoring", disable=not progress, leave=False):
        imgs = batch["images"].to(device)
        if imgs.shape[0]:  # a batch whose every triplet was unreadable holds nothing
            out.append(fn(imgs, batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 3)


@torch.no_grad()
def score_triplets(
    reward: RewardModel,
    loader: DataLoader,
    device: str | torch.device = "cpu",
    progress: bool = True,
    prompt: str = "easy_prompt",
) -> torch.Tensor:
    """Score every triplet's three images against its ``prompt`` column (``easy_prompt``, as
    the paper's table, or ``refine_prompt``). Returns ``(N, 3)``."""

    def fn(imgs, batch):
        b = imgs.shape[0]
        flat = imgs.transpose(0, 1).reshape(3 * b, *imgs.shape[2:])  # I1s, then I2s, then I3s
        return reward(flat, list(batch[prompt]) * 3).view(3, b).T

    return _triplet_scores(fn, loader, device, progress)


@torch.no_grad()
def pair_accuracy(
    reward: RewardModel, loader: DataLoader, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Over a :class:`rewards.data.RankedDataset` loader: the percentage of ranked pairs whose
    better image scores strictly higher (``pair_acc``; also ``mean``, the key that reward
    training ranks checkpoints by)."""
    right = total = 0
    for batch in loader:
        if not batch["images"].shape[0]:
            continue
        s = reward(batch["images"].to(device), batch["prompts"]).float().cpu()
        pairs = batch["pairs"]
        right += int((s[pairs[:, 0]] > s[pairs[:, 1]]).sum())
        total += len(pairs)
    if not total:
        raise ValueError("no ranked pairs to evaluate")
    acc = 100.0 * right / total
    return {"pair_acc": acc, "mean": acc}


@torch.no_grad()
def evaluate_reward(
    label: str,
    reward: RewardModel,
    loader: DataLoader,
    device: str | torch.device = "cpu",
    progress: bool = True,
    scores: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Preference accuracy rows for one reward, keyed by a name that says what was scored.

    Every reward: each image's score against the easy prompt (the paper's table; ``scores``
    when already computed by :func:`score_triplets`). For ICT-HP that row is the reward of one
    image, ICT x sigmoid(HP), and a second row is the reference's ICT-HP validation,
    ICT x softmax(HP logits over the triplet). For ICT a second row scores against the
    refined prompt, which the reference's ICT validation also reports.
    """
    if scores is None:
        scores = score_triplets(reward, loader, device, progress)
    if not isinstance(reward, ICTHPReward):
        rows = {label: preference_accuracy(scores)}
        if getattr(reward, "reward_name", None) == "ict":
            refined = score_triplets(reward, loader, device, progress, prompt="refine_prompt")
            rows[f"{label}: refined prompt"] = preference_accuracy(refined)
        return rows

    def softmax_over_triplet(imgs, batch):
        return reward.triplet_scores(imgs, list(batch["easy_prompt"]))

    reference = _triplet_scores(softmax_over_triplet, loader, device, progress)
    return {
        f"{label}: ICT x sigmoid(HP), per image": preference_accuracy(scores),
        f"{label}: ICT x softmax(HP over triplet), reference": preference_accuracy(reference),
    }


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
