"""Triplet datasets (our Parquet files, the public Pick-High layout) and ranked images
(ImageRewardDB's layout, :class:`RankedDataset`).

Columns (Pick-High names): ``easy_prompt``, ``refine_prompt``, ``easy_image_0`` (I1, the
non-preferred image), ``easy_image_1`` (I2, preferred), ``refine_image`` (I3, from the
refined prompt), optional ``E1 E2 R1 R2`` (precomputed ICT labels). Image columns hold encoded
image bytes or paths (relative to ``image_root``, or absolute). Rows whose prompts or images
cannot be read are skipped and counted, never fatal.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from rewards.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("easy_prompt", "refine_prompt")
IMAGE_COLUMNS = ("easy_image_0", "easy_image_1", "refine_image")
LABEL_COLUMNS = ("E1", "E2", "R1", "R2")


def _check_columns(frame: pd.DataFrame, where: str) -> None:
    missing = [c for c in PROMPT_COLUMNS + IMAGE_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"{where}: missing required column(s) {', '.join(missing)}")


def _bad_prompt(value) -> bool:
    return not isinstance(value, str) or not value.strip()


def _read_image_bytes(value, root: Path | None) -> bytes:
    """The encoded image held in a cell: bytes, or the file at a path (relative to ``root``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:  # the HF datasets image struct
        return bytes(value["bytes"])
    if isinstance(value, (str, os.PathLike)) and str(value):
        p = Path(value)
        if not p.is_absolute() and root is not None:
            p = root / p
        return p.read_bytes()
    raise ValueError(f"not an image (bytes or path): {type(value).__name__}")


def decode_image(value, root: Path | None, size: int) -> torch.Tensor:
    """Bytes or path -> RGB ``(3, size, size)`` float32 in [0, 1] (bicubic resize)."""
    with Image.open(io.BytesIO(_read_image_bytes(value, root))) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _label(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # None or a non-number: same as absent
        return math.nan


def _read_frame(path_or_frame, what: str) -> tuple[pd.DataFrame, str]:
    """A DataFrame as it is, or a Parquet file read (``what file not found`` if missing);
    with where it came from, for error messages."""
    if isinstance(path_or_frame, pd.DataFrame):
        return path_or_frame, "DataFrame"
    path = Path(path_or_frame)
    if not path.is_file():
        raise MissingPathError(f"{what} file not found: {path}")
    return pd.read_parquet(path), str(path)


class _RowDataset(Dataset):
    """A Parquet-backed dataset whose unusable rows are skipped: each is logged once (``row_name``
    names what a row is in the message) and counted in :attr:`num_skipped`."""

    row_name = "row"

    def __init__(self, frame, image_root, image_size: int) -> None:
        self.frame = frame.reset_index(drop=True)
        self.root = Path(image_root) if image_root is not None else None
        self.image_size = image_size
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_skipped(self) -> int:
        """Distinct unusable rows seen so far in this process."""
        return len(self._bad)

    def _mark_bad(self, i: int, why: str) -> None:
        if i not in self._bad:
            self._bad.add(i)
            log.warning("skipping %s %d: %s", self.row_name, i, why)


class TripletDataset(_RowDataset):
    """Triplets from a Parquet file or a pandas DataFrame.

    ``dataset[i]`` is a dict: ``easy_prompt`` and ``refine_prompt`` (str), ``images``
    float32 ``(3, 3, S, S)`` in [0, 1] in the order I1, I2, I3, and ``labels`` float32 ``(4,)``
    ``[E1, E2, R1, R2]`` (NaN where a column is absent or empty); or ``None`` when the row's
    prompts or images cannot be read (logged once per row and counted in ``num_skipped``;
    :func:`collate_triplets` drops it). Counts are per process: with DataLoader workers, each
    worker counts the rows it saw.
    """

    row_name = "triplet"

    def __init__(
        self,
        path_or_frame: str | os.PathLike | pd.DataFrame,
        image_root: str | os.PathLike | None = None,
        image_size: int = 64,
    ):
        frame, where = _read_frame(path_or_frame, "triplet")
        _check_columns(frame, where)
        super().__init__(frame, image_root, image_size)
        # Each label from its own column: the reference code filled E2 from R1.
        self._label_cols = [c if c in frame.columns else None for c in LABEL_COLUMNS]

    def __getitem__(self, i: int) -> dict | None:
        row = self.frame.iloc[i]
        prompts = [row[c] for c in PROMPT_COLUMNS]
        if any(_bad_prompt(p) for p in prompts):
            self._mark_bad(i, "missing or empty prompt")
            return None
        try:
            images = torch.stack(
                [decode_image(row[c], self.root, self.image_size) for c in IMAGE_COLUMNS]
            )
        except Exception as e:  # PIL raises many types for bad data; a bad row must not kill a run
            self._mark_bad(i, f"{type(e).__name__}: {e}")
            return None
        labels = torch.tensor(
            [math.nan if c is None else _label(row[c]) for c in self._label_cols],
            dtype=torch.float32,
        )
        return {
            "easy_prompt": prompts[0],
            "refine_prompt": prompts[1],
            "images": images,
            "labels": labels,
        }

    @staticmethod
    def collate(batch: list) -> dict:
        return collate_triplets(batch)

    def scan(self) -> int:
        """Decode every row once; returns (and records) the number of unreadable rows."""
        for i in range(len(self)):
            self[i]
        return self.num_skipped


def collate_triplets(batch: list) -> dict:
    """DataLoader ``collate_fn``: drop ``None`` rows and stack the rest into ``easy_prompt``
    and ``refine_prompt`` (lists of B str), ``images`` ``(B, 3, 3, S, S)`` and ``labels``
    ``(B, 4)``. A batch of only bad rows gives B = 0 (images ``(0, 3, 3, 0, 0)``)."""
    rows = [b for b in batch if b is not None]
    if not rows:
        return {
            "easy_prompt": [],
            "refine_prompt": [],
            "images": torch.empty(0, 3, 3, 0, 0),
            "labels": torch.empty(0, 4),
        }
    return {
        "easy_prompt": [r["easy_prompt"] for r in rows],
        "refine_prompt": [r["refine_prompt"] for r in rows],
        "images": torch.stack([r["images"] for r in rows]),
        "labels": torch.stack([r["labels"] for r in rows]),
    }


def read_pickhigh(pickle_path, root, split: str, allow_pickle: bool = False) -> pd.DataFrame:
    """Read a Pick-High split (a pickled pandas frame) with its image columns resolved to
    absolute paths: easy images under ``<root>/pick_easy_img/<split>/``, refined ones under
    ``<root>/pick_refine_img/<split>/``.

    Unpickling runs code from the file, so this refuses unless ``allow_pickle=True`` (CLI:
    ``--allow-pickle``).
    """
    if not allow_pickle:
        raise ConfigError(
            f"{pickle_path} is a pickle, and reading one runs code from the file; pass "
            "allow_pickle=True (CLI: --allow-pickle) only for a file you trust"
        )
    frame = pd.read_pickle(pickle_path)
    if not isinstance(frame, pd.DataFrame):
        raise ConfigError(f"{pickle_path}: expected a pandas DataFrame, got {type(frame).__name__}")
    _check_columns(frame, str(pickle_path))
    root = Path(root).resolve()
    easy_dir, ref_dir = root / "pick_easy_img" / split, root / "pick_refine_img" / split
    frame = frame.copy()
    for col, folder in (
        ("easy_image_0", easy_dir),
        ("easy_image_1", easy_dir),
        ("refine_image", ref_dir),
    ):
        frame[col] = [
            str(folder / str(v)) if isinstance(v, str) and v else None for v in frame[col]
        ]
    return frame


def _check_image(data: bytes) -> None:
    """Raise if ``data`` does not decode as an image."""
    with Image.open(io.BytesIO(data)) as im:
        # Decoding at reduced scale (JPEG) still reads the whole stream, so truncation shows.
        im.draft("RGB", (64, 64))
        im.load()


def convert_to_parquet(frame: pd.DataFrame, out_path, embed_images: bool = True) -> dict:
    """Write triplets to a Parquet file, atomically.

    Image cells of ``frame`` hold bytes or paths; with ``embed_images`` the Parquet holds the
    encoded bytes, else the paths as given. Rows with a missing prompt or a missing or
    undecodable image are skipped. Label columns ``E1 E2 R1 R2`` are kept where present.
    Returns ``{"written": n, "skipped": m}``.
    """
    import pyarrow as pa

    _check_columns(frame, "DataFrame")
    labels = [c for c in LABEL_COLUMNS if c in frame.columns]
    image_type = pa.binary() if embed_images else pa.string()
    schema = pa.schema(
        [(c, pa.string()) for c in PROMPT_COLUMNS]
        + [(c, image_type) for c in IMAGE_COLUMNS]
        + [(c, pa.float64()) for c in labels]
    )
    cols: dict[str, list] = {c: [] for c in schema.names}
    skipped = 0
    for i, row in enumerate(
        frame[list(PROMPT_COLUMNS + IMAGE_COLUMNS) + labels].to_dict("records")
    ):
        try:
            if any(_bad_prompt(row[c]) for c in PROMPT_COLUMNS):
                raise ValueError("missing or empty prompt")
            images = {c: _read_image_bytes(row[c], None) for c in IMAGE_COLUMNS}
            for data in images.values():
                _check_image(data)
        except Exception as e:  # as in TripletDataset: one bad row must not stop a conversion
            skipped += 1
            log.warning("convert: skipping row %d: %s: %s", i, type(e).__name__, e)
            continue
        for c in PROMPT_COLUMNS:
            cols[c].append(row[c])
        for c in IMAGE_COLUMNS:
            cols[c].append(images[c] if embed_images else str(row[c]))
        for c in labels:
            cols[c].append(_label(row[c]))
    out_path = write_table_atomic(pa.table(cols, schema=schema), out_path)
    written = len(cols[PROMPT_COLUMNS[0]])
    log.info("wrote %d triplets to %s (%d skipped)", written, out_path, skipped)
    return {"written": written, "skipped": skipped}


def convert_pickhigh(
    pickle_path,
    root,
    split: str,
    out_path,
    allow_pickle: bool = False,
    embed_images: bool = True,
) -> dict:
    """:func:`read_pickhigh` then :func:`convert_to_parquet`; returns its counts."""
    frame = read_pickhigh(pickle_path, root, split, allow_pickle=allow_pickle)
    return convert_to_parquet(frame, out_path, embed_images=embed_images)


def write_table_atomic(table, path) -> Path:
    """Write a pyarrow ``table`` to Parquet at ``path`` atomically (a temp file in the same
    folder, then rename): a reader never sees half a file."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- ranked images

RANKED_COLUMNS = ("prompt", "images", "ranking")


def is_ranked_file(path: str | os.PathLike) -> bool:
    """True when a Parquet file has ImageRewardDB's columns (``prompt, images, ranking``)."""
    import pyarrow.parquet as pq

    return set(RANKED_COLUMNS) <= set(pq.read_schema(path).names)


class RankedDataset(_RowDataset):
    """Ranked images of a prompt, ImageRewardDB's layout, from a Parquet file or DataFrame.

    Columns: ``prompt`` (str), ``images`` (a list of encoded images or paths, relative to
    ``image_root`` or absolute), ``ranking`` (a list of the same length; lower is better,
    ties allowed, as in the reference's ``rank_pair`` data). ``dataset[i]`` is a dict:
    ``prompt``, ``images`` float32 ``(K, 3, S, S)`` in [0, 1], ``ranking`` float32 ``(K,)``;
    or ``None`` when the row cannot be used (bad prompt, an unreadable image, lengths that
    differ, fewer than two distinct ranks), logged once and counted in ``num_skipped``.
    """

    row_name = "ranked row"

    def __init__(
        self,
        path_or_frame: str | os.PathLike | pd.DataFrame,
        image_root: str | os.PathLike | None = None,
        image_size: int = 64,
    ):
        frame, where = _read_frame(path_or_frame, "ranked-image")
        missing = [c for c in RANKED_COLUMNS if c not in frame.columns]
        if missing:
            raise ConfigError(f"{where}: missing required column(s) {', '.join(missing)}")
        super().__init__(frame, image_root, image_size)

    def __getitem__(self, i: int) -> dict | None:
        row = self.frame.iloc[i]
        if _bad_prompt(row["prompt"]):
            self._mark_bad(i, "missing or empty prompt")
            return None
        try:
            cells, ranking = list(row["images"]), [float(r) for r in row["ranking"]]
            if len(cells) != len(ranking):
                raise ValueError(f"{len(cells)} images but {len(ranking)} ranks")
            if len(set(ranking)) < 2 or any(math.isnan(r) for r in ranking):
                raise ValueError(f"ranking {ranking} gives no pair to learn from")
            images = torch.stack([decode_image(c, self.root, self.image_size) for c in cells])
        except Exception as e:  # PIL, None cells, non-numbers: a bad row must not kill a run
            self._mark_bad(i, f"{type(e).__name__}: {e}")
            return None
        return {"prompt": row["prompt"], "images": images, "ranking": torch.tensor(ranking)}

    @staticmethod
    def collate(batch: list) -> dict:
        return collate_ranked(batch)


def ranked_pairs(ranking: torch.Tensor) -> torch.Tensor:
    """Every pair of differently ranked images: ``(P, 2)`` long ``[better, worse]`` indices
    into ``ranking`` ``(K,)`` (lower rank is better)."""
    i, j = torch.triu_indices(len(ranking), len(ranking), offset=1)
    keep = ranking[i] != ranking[j]
    i, j = i[keep], j[keep]
    first_better = ranking[i] < ranking[j]
    return torch.stack([torch.where(first_better, i, j), torch.where(first_better, j, i)], -1)


def collate_ranked(batch: list) -> dict:
    """Drop ``None`` rows; flatten the rest: ``prompts`` (N str, one per image), ``images``
    ``(N, 3, S, S)``, ``pairs`` ``(P, 2)`` long ``[better, worse]`` indices into the N images.
    A batch of only bad rows gives N = 0 (images ``(0, 3, 0, 0)``, no pairs)."""
    rows = [b for b in batch if b is not None]
    if not rows:
        return {
            "prompts": [],
            "images": torch.empty(0, 3, 0, 0),
            "pairs": torch.empty(0, 2, dtype=torch.long),
        }
    prompts, pairs, start = [], [], 0
    for r in rows:
        k = r["images"].shape[0]
        prompts += [r["prompt"]] * k
        pairs.append(ranked_pairs(r["ranking"]) + start)
        start += k
    return {
        "prompts": prompts,
        "images": torch.cat([r["images"] for r in rows]),
        "pairs": torch.cat(pairs),
    }
