"""Seeded synthetic triplets for tests and the CPU quickstart.

Prompts are built from attributes (shape, colour, count, position, background). For each:

- I1 (``easy_image_0``, non-preferred) *violates* the easy prompt: one attribute is wrong
  (colour, shape, count or position), otherwise drawn plainly.
- I2 (``easy_image_1``, preferred) draws the easy prompt plainly (flat colours).
- I3 (``refine_image``) draws the refined prompt: the same scene with richer detail (texture
  inside the shapes, directional lighting, a decorative border or sparkles) as its detail
  words say.

Every image gets its own global exposure and a little noise, so trivial scorers (mean
brightness, saturation) do not solve the ranking, while a small CLIP can learn it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.92, 0.85, 0.15),
    "purple": (0.55, 0.20, 0.70),
    "orange": (0.95, 0.55, 0.10),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TEXTURES = ("striped", "dotted", "checkered")
LIGHTING = ("soft rim lighting", "dramatic side lighting")
DECORATION = ("an ornate border", "golden sparkles")
COLUMNS = ("easy_prompt", "refine_prompt", "easy_image_0", "easy_image_1", "refine_image")


def _easy_prompt(a: dict) -> str:
    n = a["count"]
    noun = a["shape"] + ("s" if n > 1 else "")
    where = "in the center" if a["position"] == "center" else f"on the {a['position']}"
    return f"{COUNT_WORDS[n]} {a['colour']} {noun} {where}, {a['background']} background"


def _refine_prompt(easy: str, d: dict) -> str:
    return f"{easy}, {d['texture']} texture, {d['lighting']}, with {d['decoration']}"


def _sample_attrs(rng: np.random.Generator) -> dict:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return {
        "shape": str(rng.choice(SHAPES)),
        "colour": str(colour),
        "count": int(rng.integers(1, 4)),
        "position": str(rng.choice(POSITIONS)),
        "background": str(background),
    }


def _violate(a: dict, rng: np.random.Generator) -> dict:
    """The same attributes with exactly one of colour, shape, count, position changed."""
    b = dict(a)
    key = str(rng.choice(["colour", "shape", "count", "position"]))
    if key == "colour":
        b["colour"] = str(
            rng.choice([c for c in COLOURS if c not in (a["colour"], a["background"])])
        )
    elif key == "shape":
        b["shape"] = str(rng.choice([s for s in SHAPES if s != a["shape"]]))
    elif key == "count":
        b["count"] = int(rng.choice([c for c in (1, 2, 3) if c != a["count"]]))
    else:
        b["position"] = str(rng.choice([p for p in POSITIONS if p != a["position"]]))
    return b


def _shape_mask(shape: str, yy, xx, cy, cx, r) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    # triangle, apex up
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def _centres(position: str, count: int, s: int, rng) -> list[tuple[float, float]]:
    region = {
        "left": (0.5, 0.25),
        "right": (0.5, 0.75),
        "top": (0.25, 0.5),
        "bottom": (0.75, 0.5),
        "center": (0.5, 0.5),
    }[position]
    cy, cx = region[0] * s, region[1] * s
    # Several objects spread along the axis that the region leaves free.
    along_y = position in ("left", "right")
    step = s * 0.3
    out = []
    for i in range(count):
        off = (i - (count - 1) / 2) * step
        jy, jx = rng.normal(0, s * 0.015, size=2)
        out.append((cy + (off if along_y else 0) + jy, cx + (0 if along_y else off) + jx))
    return out


def _render(a: dict, detail: dict | None, s: int, rng: np.random.Generator) -> np.ndarray:
    """``(s, s, 3)`` float image in [0, 1]."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = np.empty((s, s, 3), np.float32)
    img[:] = COLOURS[a["background"]]
    colour = np.asarray(COLOURS[a["colour"]], np.float32)
    r = s * rng.uniform(0.12, 0.15)
    for cy, cx in _centres(a["position"], a["count"], s, rng):
        m = _shape_mask(a["shape"], yy, xx, cy, cx, r)
        if detail is None:
            img[m] = colour
            continue
        tex = detail["texture"]
        if tex == "striped":
            pattern = 0.5 + 0.5 * np.sin((xx + yy) * 1.3)
        elif tex == "dotted":
            pattern = ((np.mod(xx, 4) < 2) & (np.mod(yy, 4) < 2)).astype(np.float32)
        else:
            pattern = ((np.floor(xx / 3) + np.floor(yy / 3)) % 2).astype(np.float32)
        shade = colour[None, :] * (0.65 + 0.45 * pattern[m][:, None])
        img[m] = shade
        # a highlight: the detailed render models light on the object
        hl = m & ((yy - (cy - r * 0.35)) ** 2 + (xx - (cx - r * 0.35)) ** 2 <= (r * 0.3) ** 2)
        img[hl] = 0.6 * img[hl] + 0.4
    if detail is not None:
        if detail["lighting"].startswith("soft"):
            g = 1.0 - 0.35 * np.sqrt((yy - s / 2) ** 2 + (xx - s / 2) ** 2) / s
        else:
            g = 0.7 + 0.5 * xx / s
        img *= g[..., None]
        if detail["decoration"] == "an ornate border":
            b = max(2, s // 20)
            frame = (yy < b) | (yy >= s - b) | (xx < b) | (xx >= s - b)
            dots = frame & (((xx + yy) // 2) % 2 == 0)
            img[frame] = (0.85, 0.7, 0.2)
            img[dots] = (0.3, 0.15, 0.05)
        else:
            n = 12
            py, px = rng.integers(0, s, size=(2, n))
            for y, x in zip(py, px):
                img[max(0, y - 1) : y + 1, max(0, x - 1) : x + 1] = (1.0, 0.85, 0.3)
    # Per-image exposure and noise: no ranking can be read off brightness alone.
    img = img * rng.uniform(0.7, 1.2) + rng.normal(0, 0.03, size=img.shape)
    return np.clip(img, 0.0, 1.0)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_triplets(n: int, seed: int = 0, image_size: int = 64) -> list[dict]:
    """``n`` triplets as dicts with the Pick-High columns; images are PNG bytes.

    Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a = _sample_attrs(rng)
        detail = {
            "texture": str(rng.choice(TEXTURES)),
            "lighting": str(rng.choice(LIGHTING)),
            "decoration": str(rng.choice(DECORATION)),
        }
        easy = _easy_prompt(a)
        rows.append(
            {
                "easy_prompt": easy,
                "refine_prompt": _refine_prompt(easy, detail),
                "easy_image_0": _png(_render(_violate(a, rng), None, image_size, rng)),
                "easy_image_1": _png(_render(a, None, image_size, rng)),
                "refine_image": _png(_render(a, detail, image_size, rng)),
            }
        )
    return rows


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` easy prompts from the same grammar (for policy fine-tuning)."""
    rng = np.random.default_rng(seed)
    return [_easy_prompt(_sample_attrs(rng)) for _ in range(n)]


def write_synthetic_parquet(path, n: int, seed: int = 0, image_size: int = 64) -> Path:
    """Write ``n`` synthetic triplets to a Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_triplets(n, seed=seed, image_size=image_size)
    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
