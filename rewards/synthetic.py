"""Seeded synthetic triplets for tests and the CPU quickstart.

Prompts are built from attributes: shape, colour, count (1-3), position and background colour,
e.g. ``"two red circles on the left, blue background"``; the refined prompt appends detail
words: ``"..., with striped texture, soft rim lighting, golden sparkles"``. Per triplet:

- I1 (``easy_image_0``, non-preferred) *violates* the easy prompt: exactly one of colour,
  shape, count or position is wrong; otherwise drawn plainly (flat colours).
- I2 (``easy_image_1``, preferred) draws the easy prompt plainly (flat colours).
- I3 (``refine_image``) draws the refined prompt: the same scene with the texture inside the
  shapes, the lighting and the decoration that its detail words name.

Each image gets its own exposure, colour cast, sensor noise and size/position jitter, and
I3's detail has a random strength, so trivial scorers (mean brightness, saturation, edge
density) do not solve the ranking; the differences stay visible at 32 px for a tiny CLIP.
Images are RGB PNG bytes of ``image_size`` x ``image_size``.
"""

from __future__ import annotations

import io
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
TEXTURES = ("striped", "checkered", "dotted")
LIGHTING = ("soft rim lighting", "dramatic side lighting", "warm top lighting")
DECORATION = ("an ornate border", "golden sparkles")
COLUMNS = ("easy_prompt", "refine_prompt", "easy_image_0", "easy_image_1", "refine_image")
GOLD = np.array((0.9, 0.72, 0.2), np.float32)


def _easy_prompt(a: dict) -> str:
    n = a["count"]
    noun = a["shape"] + ("s" if n > 1 else "")
    where = "in the center" if a["position"] == "center" else f"on the {a['position']}"
    return f"{COUNT_WORDS[n]} {a['colour']} {noun} {where}, {a['background']} background"


def _refine_prompt(easy: str, d: dict) -> str:
    return f"{easy}, with {d['texture']} texture, {d['lighting']}, {d['decoration']}"


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


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with radius ``r`` given offsets from its centre."""
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.1
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)  # triangle, apex up


def _centres(position: str, count: int, s: int, rng: np.random.Generator) -> list:
    cy, cx = {
        "left": (0.5, 0.25),
        "right": (0.5, 0.75),
        "top": (0.25, 0.5),
        "bottom": (0.75, 0.5),
        "center": (0.5, 0.5),
    }[position]
    # Several objects line up along the axis that the region leaves free.
    along_y = position in ("left", "right")
    out = []
    for i in range(count):
        off = (i - (count - 1) / 2) * 0.3
        jy, jx = rng.normal(0, 0.015, size=2)
        out.append(
            ((cy + (off if along_y else 0) + jy) * s, (cx + (0 if along_y else off) + jx) * s)
        )
    return out


def _texture(name: str, yy: np.ndarray, xx: np.ndarray, s: int, rng) -> np.ndarray:
    """A pattern in [0, 1]; periods scale with ``s`` so they survive a resize to 32 px."""
    phase = rng.uniform(0, 2 * np.pi)
    if name == "striped":
        return 0.5 + 0.5 * np.sin((xx + yy) * (2 * np.pi / (s / 8)) + phase)
    if name == "checkered":
        c = s / 10
        return ((np.floor(xx / c) + np.floor(yy / c)) % 2).astype(np.float32)
    p = s / 10
    fy, fx = np.mod(yy + phase, p) - p / 2, np.mod(xx + phase, p) - p / 2
    return (fy**2 + fx**2 > (p * 0.28) ** 2).astype(np.float32)  # dotted: dark dots


def _light(name: str, yy, xx, s: int, strength: float, rng) -> np.ndarray:
    """``(s, s, 3)`` multiplicative light with mean ~1, so it does not shift brightness."""
    if name.startswith("dramatic"):
        side = rng.choice((-1.0, 1.0))
        g = 1 + strength * side * (xx / s - 0.5) * 2
        return np.repeat(g[..., None], 3, -1)
    if name.startswith("warm"):
        g = 1 + strength * (0.5 - yy / s) * 2
        return g[..., None] * np.array((1.08, 1.0, 0.85), np.float32)
    return np.ones((s, s, 3), np.float32)  # rim light is drawn per shape


def _decorate(img: np.ndarray, name: str, yy, xx, s: int, rng) -> None:
    if name == "an ornate border":
        b = max(2, round(s / 16))
        frame = (yy < b) | (yy >= s - b) | (xx < b) | (xx >= s - b)
        # Ornaments along the frame, a few pixels apart so they survive downsampling.
        dots = frame & ((((xx + yy) // max(2, b)) % 2) == 0)
        img[frame] = GOLD
        img[dots] = GOLD * 0.35
        return
    for y, x in rng.integers(2, s - 2, size=(int(rng.integers(6, 12)), 2)):
        r = max(1, s // 32)
        img[y - r : y + r + 1, x] = (1.0, 0.9, 0.45)
        img[y, x - r : x + r + 1] = (1.0, 0.9, 0.45)


def _render(a: dict, detail: dict | None, s: int, rng: np.random.Generator) -> np.ndarray:
    """Draw attributes ``a`` (plainly when ``detail`` is None); ``(s, s, 3)`` float in [0, 1]."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # Per-image colour cast: names stay recognisable, exact RGB values do not rank images.
    cast = rng.uniform(0.88, 1.12, size=3).astype(np.float32)
    img = np.empty((s, s, 3), np.float32)
    img[:] = np.asarray(COLOURS[a["background"]], np.float32) * cast
    colour = np.asarray(COLOURS[a["colour"]], np.float32) * cast
    r = s * rng.uniform(0.10, 0.15)
    if detail is not None:
        pattern = _texture(detail["texture"], yy, xx, s, rng)
        contrast = rng.uniform(0.25, 0.5)
        rim = detail["lighting"].startswith("soft")
    for cy, cx in _centres(a["position"], a["count"], s, rng):
        dy, dx = yy - cy, xx - cx
        m = _shape_mask(a["shape"], dy, dx, r)
        if detail is None:
            img[m] = colour
            continue
        img[m] = colour * (1 - contrast + contrast * pattern[m])[:, None]
        if rim:
            edge = m & ~_shape_mask(a["shape"], dy, dx, r * 0.72)
            img[edge] = 0.45 * img[edge] + 0.55
    if detail is not None:
        img *= _light(detail["lighting"], yy, xx, s, rng.uniform(0.15, 0.35), rng)
        _decorate(img, detail["decoration"], yy, xx, s, rng)
    # Exposure and noise vary per image, so neither brightness nor high-frequency energy
    # ranks the images. Grain of 2x2 px at 64 px survives a resize to 32 px, as texture does.
    g = max(1, s // 32)
    k = -(-s // g)
    grain = rng.normal(0, rng.uniform(0.0, 0.07), size=(k, k, 3)).astype(np.float32)
    grain = grain.repeat(g, 0).repeat(g, 1)[:s, :s]
    noise = rng.normal(0, rng.uniform(0.0, 0.06), size=img.shape).astype(np.float32)
    return np.clip(img * rng.uniform(0.7, 1.2) + grain + noise, 0.0, 1.0)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_triplets(n: int, seed: int = 0, image_size: int = 64) -> list[dict]:
    """``n`` triplets as dicts with the columns ``easy_prompt``, ``refine_prompt`` (str) and
    ``easy_image_0`` (I1), ``easy_image_1`` (I2), ``refine_image`` (I3): RGB PNG bytes of
    ``image_size`` x ``image_size``.

    Deterministic for a given ``seed``; row ``i`` depends only on ``(seed, i)``, so a smaller
    ``n`` gives a prefix of a larger one.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size} must be >= 16 (shapes and detail need room)")
    rows = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
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
    """Write ``n`` synthetic triplets (see :func:`make_triplets`) to a Parquet file, prompts
    as strings and images as binary PNG; atomic (temp file in the same folder, then rename)."""
    import pyarrow as pa

    from rewards.data import write_table_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_triplets(n, seed=seed, image_size=image_size)
    schema = pa.schema(
        [(c, pa.string()) for c in COLUMNS[:2]] + [(c, pa.binary()) for c in COLUMNS[2:]]
    )
    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS}, schema=schema)
    return write_table_atomic(table, path)
