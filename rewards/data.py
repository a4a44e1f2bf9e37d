"""Triplet datasets: our Parquet files and the public Pick-High layout.

Columns (Pick-High names): ``easy_prompt``, ``refine_prompt``, ``easy_image_0`` (I1),
``easy_image_1`` (I2), ``refine_image`` (I3), optional ``E1 E2 R1 R2``. Image columns hold
encoded bytes or paths (relative to ``image_root``). Unreadable rows are skipped and counted.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("easy_prompt", "refine_prompt")
IMAGE_COLUMNS = ("easy_image_0", "easy_image_1", "refine_image")
LABEL_COLUMNS = ("E1", "E2", "R1", "R2")


def _check_columns(frame: pd.DataFrame, where: str) -> None:
    missing = [c for c in PROMPT_COLUMNS + IMAGE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}")


def _read_image_bytes(value, root: Path | None) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:  # the HF datasets image struct
        return bytes(value["bytes"])
    if isinstance(value, str) and value:
        p = Path(value)
        if not p.is_absolute() and root is not None:
            p = root / p
        return p.read_bytes()
    raise ValueError(f"not an image value: {type(value).__name__}")


def decode_image(value, root: Path | None, size: int) -> torch.Tensor:
    """Bytes or path -> ``(3, size, size)`` float in [0, 1] (bicubic resize)."""
    with Image.open(io.BytesIO(_read_image_bytes(value, root))) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class TripletDataset(Dataset):
    """``dataset[i]`` -> ``{easy_prompt, refine_prompt, images (3, 3, S, S) in [0, 1],
    labels (4,) [E1, E2, R1, R2] or NaN}``, or ``None`` for an unreadable row (see
    :func:`collate_triplets`)."""

    def __init__(self, source, image_root: str | os.PathLike | None = None, image_size: int = 64):
        if isinstance(source, pd.DataFrame):
            frame, where = source, "frame"
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"triplet file not found: {path}")
            frame, where = pd.read_parquet(path), str(path)
        _check_columns(frame, where)
        self.frame = frame.reset_index(drop=True)
        self.root = Path(image_root) if image_root else None
        self.image_size = image_size
        self.has_labels = all(c in frame.columns for c in LABEL_COLUMNS)
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_skipped(self) -> int:
        return len(self._bad)

    def _mark_bad(self, i: int, why: str) -> None:
        if i not in self._bad:
            self._bad.add(i)
            log.warning("skipping triplet %d: %s", i, why)

    def __getitem__(self, i: int):
        row = self.frame.iloc[i]
        prompts = [row[c] for c in PROMPT_COLUMNS]
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            self._mark_bad(i, "empty prompt")
            return None
        try:
            images = torch.stack(
                [decode_image(row[c], self.root, self.image_size) for c in IMAGE_COLUMNS]
            )
        except Exception as e:  # corrupt bytes, missing file, unsupported format
            self._mark_bad(i, f"{type(e).__name__}: {e}")
            return None
        if self.has_labels:
            labels = torch.tensor([float(row[c]) for c in LABEL_COLUMNS], dtype=torch.float32)
        else:
            labels = torch.full((4,), float("nan"))
        return {
            "easy_prompt": prompts[0],
            "refine_prompt": prompts[1],
            "images": images,
            "labels": labels,
        }

    def scan(self) -> int:
        """Decode every row once; returns the number of unreadable rows."""
        for i in range(len(self)):
            self[i]
        return self.num_skipped


def collate_triplets(batch: list) -> dict:
    """Drop ``None`` rows, stack the rest: images ``(B, 3, 3, S, S)``, labels ``(B, 4)``."""
    rows = [b for b in batch if b is not None]
    if not rows:
        return {
            "easy_prompt": [],
            "refine_prompt": [],
            "images": torch.empty(0, 3, 3, 1, 1),
            "labels": torch.empty(0, 4),
        }
    return {
        "easy_prompt": [r["easy_prompt"] for r in rows],
        "refine_prompt": [r["refine_prompt"] for r in rows],
        "images": torch.stack([r["images"] for r in rows]),
        "labels": torch.stack([r["labels"] for r in rows]),
    }


def read_pickhigh(pickle_path, root, split: str, allow_pickle: bool = False) -> pd.DataFrame:
    """Read a Pick-High split (a pickled pandas frame) with image paths resolved.

    Easy images live under ``<root>/pick_easy_img/<split>/``, refined ones under
    ``<root>/pick_refine_img/<split>/``. Unpickling runs code from the file, so this refuses
    unless ``allow_pickle`` (CLI: ``--allow-pickle``).
    """
    if not allow_pickle:
        raise ValueError(
            f"{pickle_path} is a pickle, and reading one runs code from the file; pass "
            "allow_pickle=True (CLI: --allow-pickle) only for a file you trust"
        )
    frame = pd.read_pickle(pickle_path)
    _check_columns(frame, str(pickle_path))
    root = Path(root)
    easy_dir, ref_dir = root / "pick_easy_img" / split, root / "pick_refine_img" / split
    frame = frame.copy()
    for c in ("easy_image_0", "easy_image_1"):
        frame[c] = [str(easy_dir / str(v)) for v in frame[c]]
    frame["refine_image"] = [str(ref_dir / str(v)) for v in frame["refine_image"]]
    return frame


def convert_to_parquet(frame: pd.DataFrame, out_path, embed_images: bool = True) -> dict:
    """Write triplets to Parquet (image bytes embedded, or paths kept), skipping rows whose
    images cannot be read; atomic. Returns ``{"written": n, "skipped": m}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_columns(frame, "frame")
    keep_cols = [c for c in PROMPT_COLUMNS + IMAGE_COLUMNS + LABEL_COLUMNS if c in frame.columns]
    out_rows, skipped = [], 0
    for i, row in frame.reset_index(drop=True).iterrows():
        rec = {c: row[c] for c in keep_cols}
        try:
            for c in IMAGE_COLUMNS:
                data = _read_image_bytes(row[c], None)
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
                if embed_images:
                    rec[c] = data
        except Exception as e:
            skipped += 1
            log.warning("convert: skipping row %d: %s", i, e)
            continue
        out_rows.append(rec)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: [r[c] for r in out_rows] for c in keep_cols})
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out_path)
    return {"written": len(out_rows), "skipped": skipped}


def convert_pickhigh(
    pickle_path, root, split, out_path, allow_pickle=False, embed_images=True
) -> dict:
    """:func:`read_pickhigh` then :func:`convert_to_parquet`."""
    frame = read_pickhigh(pickle_path, root, split, allow_pickle=allow_pickle)
    return convert_to_parquet(frame, out_path, embed_images=embed_images)
