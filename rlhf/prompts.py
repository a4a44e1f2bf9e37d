"""Prompt sources for fine-tuning, and the deterministic step -> (prompts, seeds) schedule.

The data position of a run is its step: step ``s`` (1-based) takes the global batch
``[(s-1)·G, s·G)`` of the prompt list (wrapping around, reshuffled each pass with the run's
seed), so a resumed run continues exactly where it stopped with no state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_prompts(
    source: str, column: str = "prompt", n_synthetic: int = 512, seed: int = 0
) -> list[str]:
    """``synthetic`` (the synthetic-triplet grammar), ``world`` (the miniature world's easy
    prompts, GenEval's categories in turn) or a file: ``.txt`` one prompt per line,
    ``.parquet``/``.csv`` with ``column``, ``.jsonl`` objects with ``column``. Blank prompts are
    dropped; an empty result is an error naming the file."""
    if source == "synthetic":
        from rewards.synthetic import make_prompts

        return make_prompts(n_synthetic, seed=seed)
    if source == "world":
        from rewards.world.scenes import world_prompts

        return world_prompts(n_synthetic, seed=seed)
    path = Path(source)
    if path.suffix == ".txt":
        prompts = path.read_text().splitlines()
    elif path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                row = json.loads(line)
                if column not in row:
                    raise ValueError(f"{path}:{i + 1}: no {column!r} key")
                prompts.append(row[column])
    elif path.suffix in (".parquet", ".csv"):
        import pandas as pd

        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        if column not in df.columns:
            raise ValueError(f"{path}: no column {column!r} (columns: {list(df.columns)})")
        prompts = df[column].astype(str).tolist()
    else:
        raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}")
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return prompts


def step_batch(
    prompts: list[str], step: int, global_batch: int, seed: int
) -> tuple[list[str], list[int]]:
    """Prompts and sampling seeds of training step ``step`` (1-based)."""
    n = len(prompts)
    start = (step - 1) * global_batch
    out_p, out_s = [], []
    for j in range(start, start + global_batch):
        epoch, i = divmod(j, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        out_p.append(prompts[int(order[i])])
        out_s.append(int(np.random.default_rng([seed, 7, j]).integers(2**31 - 1)))
    return out_p, out_s
