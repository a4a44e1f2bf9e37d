"""The miniature world's scenes: a grammar of prompts, scenes that meet them, and a renderer.

A scene is a background and 1-4 objects, each with a shape, a colour, a centre and a radius,
drawn at 64 px (rendered at 2x and box-filtered, so edges are anti-aliased). Easy prompts
follow GenEval's six categories::

    single_object   "a circle"
    two_object      "a circle and a square"
    counting        "three triangles"
    colors          "a blue square"
    position        "a circle left of a square"     (left of, right of, above, below)
    color_attr      "a red circle and a blue triangle"

A refined prompt adds the detail that the paper's LLM refinement adds: a texture inside the
objects, a lighting, shading (drop shadows) and a background detail, e.g.
``"a blue square, with striped texture, warm top lighting, drop shadows, tiled background"``.
:func:`render` draws that detail only for a refined scene; an easy scene is drawn plainly.

Every easy prompt is a :class:`Spec` (category + the attributes it names); a scene sampled for
a spec fills in what the prompt leaves open (colours, positions, sizes, background) at random
and records the truth, which the judge is trained on and the generator is checked against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SIZE = 64
RADIUS = (6.5, 9.5)  # px: an object's radius is drawn uniformly from this range
SHAPES = ("circle", "square", "triangle", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
COLOURS = {
    "red": (0.86, 0.14, 0.12),
    "green": (0.16, 0.68, 0.22),
    "blue": (0.15, 0.30, 0.88),
    "yellow": (0.95, 0.86, 0.16),
    "purple": (0.58, 0.22, 0.72),
    "orange": (0.97, 0.56, 0.10),
}
# Neutral backgrounds, never an object colour, so colour and background cannot be confused.
BACKGROUNDS = {"grey": (0.52, 0.52, 0.52), "cream": (0.93, 0.90, 0.80), "slate": (0.20, 0.23, 0.27)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TEXTURES = ("striped", "checkered", "dotted")
LIGHTING = ("warm top lighting", "dramatic side lighting", "soft rim lighting")
SHADING = ("drop shadows",)
BACKDROPS = ("tiled background", "gradient background", "starry background")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    y: float  # centre, in pixels of a SIZE x SIZE image
    x: float
    r: float


@dataclass
class Spec:
    """What an easy prompt asks for: ``category`` and the attributes it names.

    ``shapes``/``colours`` list the named objects in prompt order (a colour is None where the
    prompt names none); ``count`` is the number asked for (counting), ``relation`` the
    relation of object 0 to object 1 (position).
    """

    category: str
    shapes: list[str]
    colours: list[str | None] = field(default_factory=list)
    count: int = 1
    relation: str | None = None

    def prompt(self) -> str:
        c, s = self.colours, self.shapes
        if self.category == "counting":
            return f"{COUNT_WORDS[self.count]} {PLURAL[s[0]] if self.count > 1 else s[0]}"
        names = [_article(" ".join(w for w in (col, sh) if w)) for col, sh in zip(c, s)]
        if self.category == "position":
            return f"{names[0]} {self.relation} {names[1]}"
        return " and ".join(names)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Detail:
    texture: str
    lighting: str
    shading: str
    backdrop: str

    def words(self) -> str:
        return f"with {self.texture} texture, {self.lighting}, {self.shading}, {self.backdrop}"


@dataclass
class Scene:
    objects: list[Obj]
    background: str
    detail: Detail | None = None


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def refine_prompt(easy: str, detail: Detail) -> str:
    return f"{easy}, {detail.words()}"


def sample_spec(rng: np.random.Generator, category: str | None = None) -> Spec:
    """A random easy prompt of ``category`` (uniform over the six when None)."""
    cat = category or str(rng.choice(CATEGORIES))
    if cat == "single_object":
        return Spec(cat, [str(rng.choice(SHAPES))], [None])
    if cat == "counting":
        return Spec(cat, [str(rng.choice(SHAPES))], [None], count=int(rng.integers(1, 5)))
    if cat == "colors":
        return Spec(cat, [str(rng.choice(SHAPES))], [str(rng.choice(list(COLOURS)))])
    shapes = [str(s) for s in rng.choice(SHAPES, size=2, replace=False)]
    if cat == "two_object":
        return Spec(cat, shapes, [None, None])
    if cat == "position":
        return Spec(cat, shapes, [None, None], relation=str(rng.choice(RELATIONS)))
    if cat == "color_attr":
        colours = [str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)]
        return Spec(cat, shapes, colours)
    raise ValueError(f"category={cat!r} must be one of {CATEGORIES}")


def sample_detail(rng: np.random.Generator) -> Detail:
    return Detail(
        str(rng.choice(TEXTURES)),
        str(rng.choice(LIGHTING)),
        str(rng.choice(SHADING)),
        str(rng.choice(BACKDROPS)),
    )


def _place(n: int, rng: np.random.Generator, radii: list[float], tries: int = 200) -> list:
    """``n`` non-overlapping centres (with a gap) inside the frame."""
    for _ in range(tries):
        pts = []
        for r in radii[:n]:
            for _ in range(50):
                y, x = rng.uniform(r + 3, SIZE - r - 3, size=2)
                if all((y - py) ** 2 + (x - px) ** 2 > (r + pr + 4) ** 2 for py, px, pr in pts):
                    pts.append((y, x, r))
                    break
            else:
                break
        if len(pts) == n:
            return pts
    raise RuntimeError(f"could not place {n} objects")


def _place_related(relation: str, rng: np.random.Generator, radii: list[float]) -> list:
    """Two centres with object 0 clearly ``relation`` object 1 (a gap of >= 14 px on the axis
    the relation names), anywhere else on the other axis."""
    while True:
        (y0, x0, r0), (y1, x1, r1) = _place(2, rng, radii)
        axis_gap = {"left of": x1 - x0, "right of": x0 - x1, "above": y1 - y0, "below": y0 - y1}
        if axis_gap[relation] >= 14:
            return [(y0, x0, r0), (y1, x1, r1)]


def scene_for(spec: Spec, rng: np.random.Generator, detail: Detail | None = None) -> Scene:
    """A scene that meets ``spec``; what the prompt leaves open is drawn at random."""
    n = spec.count if spec.category == "counting" else len(spec.shapes)
    shapes = spec.shapes * n if spec.category == "counting" else list(spec.shapes)
    colours = [c or str(rng.choice(list(COLOURS))) for c in spec.colours]
    if spec.category == "counting":
        colours = [str(rng.choice(list(COLOURS))) for _ in range(n)]
    radii = [float(rng.uniform(*RADIUS)) for _ in range(n)]
    if spec.category == "position":
        pts = _place_related(spec.relation, rng, radii)
    else:
        pts = _place(n, rng, radii)
    objs = [Obj(s, c, y, x, r) for s, c, (y, x, r) in zip(shapes, colours, pts)]
    return Scene(objs, str(rng.choice(list(BACKGROUNDS))), detail)


def random_scene(rng: np.random.Generator, detail: Detail | None = None) -> Scene:
    """1-4 objects of any shapes and colours (the judge's training distribution)."""
    n = int(rng.integers(1, 5))
    radii = [float(rng.uniform(*RADIUS)) for _ in range(n)]
    objs = [
        Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), y, x, r)
        for y, x, r in _place(n, rng, radii)
    ]
    return Scene(objs, str(rng.choice(list(BACKGROUNDS))), detail)


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that is true of ``scene`` and names every object with its colour (the tiny
    CLIP's training captions): counts for repeated objects, relations for two objects."""
    objs = scene.objects
    if len(objs) == 2 and rng.random() < 0.5:
        a, b = objs
        rel = _relation(a, b, rng)
        if rel is not None:
            text = (
                f"{_article(a.colour + ' ' + a.shape)} {rel} {_article(b.colour + ' ' + b.shape)}"
            )
            return refine_prompt(text, scene.detail) if scene.detail else text
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    parts = []
    for (colour, shape), k in groups.items():
        parts.append(
            _article(f"{colour} {shape}")
            if k == 1
            else f"{COUNT_WORDS[k]} {colour} {PLURAL[shape]}"
        )
    text = " and ".join(parts)
    return refine_prompt(text, scene.detail) if scene.detail else text


def _relation(a: Obj, b: Obj, rng: np.random.Generator) -> str | None:
    """A relation of ``a`` to ``b`` that holds with a clear gap, or None."""
    options = []
    if b.x - a.x >= 14:
        options.append("left of")
    if a.x - b.x >= 14:
        options.append("right of")
    if b.y - a.y >= 14:
        options.append("above")
    if a.y - b.y >= 14:
        options.append("below")
    return str(rng.choice(options)) if options else None


# --------------------------------------------------------------------------- rendering


def _mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.82) & (np.abs(dx) <= r * 0.82)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.12
    # triangle, apex up
    return (dy <= r * 0.75) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def _pattern(texture: str, yy, xx, phase: float) -> np.ndarray:
    if texture == "striped":
        return 0.5 + 0.5 * np.sign(np.sin((xx + yy) * (2 * np.pi / 10.0) + phase))
    if texture == "checkered":
        return ((np.floor((xx + phase) / 6) + np.floor((yy + phase) / 6)) % 2).astype(np.float32)
    fy, fx = np.mod(yy + phase, 8) - 4, np.mod(xx + phase, 8) - 4
    return (fy**2 + fx**2 > 3.0).astype(np.float32)  # dotted


def render(scene: Scene, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """``scene`` as ``(SIZE, SIZE, 3)`` float32 in [0, 1]; ``noise`` adds pixel noise of that
    standard deviation (augmentation for the judge)."""
    rng = rng or np.random.default_rng(0)
    s = 2 * SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = np.empty((s, s, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    d = scene.detail
    if d is not None:
        if d.backdrop == "tiled background":
            grout = (np.mod(yy, 16) < 1.5) | (np.mod(xx, 16) < 1.5)
            img[grout] *= 0.72
        elif d.backdrop == "gradient background":
            img *= (0.75 + 0.5 * yy / s)[..., None]
        else:
            for y, x in rng.integers(2, s - 2, size=(14, 2)):
                img[y - 1 : y + 2, x - 1 : x + 2] = (1.0, 1.0, 0.85)
    for o in scene.objects:
        cy, cx, r = 2 * o.y, 2 * o.x, 2 * o.r
        colour = np.asarray(COLOURS[o.colour], np.float32)
        if d is not None:
            shadow = _mask(o.shape, yy - cy - 3, xx - cx - 3, r)
            img[shadow] *= 0.55
        m = _mask(o.shape, yy - cy, xx - cx, r)
        if d is None:
            img[m] = colour
            continue
        pat = _pattern(d.texture, yy[m], xx[m], float(rng.uniform(0, 6)))
        img[m] = colour * (0.62 + 0.38 * pat)[:, None]
        if d.lighting == "soft rim lighting":
            edge = m & ~_mask(o.shape, yy - cy, xx - cx, r * 0.7)
            img[edge] = 0.5 * img[edge] + 0.5
    if d is not None and d.lighting != "soft rim lighting":
        g = (0.5 - yy / s) if d.lighting.startswith("warm") else (xx / s - 0.5)
        img *= (1 + 0.5 * g)[..., None]
        if d.lighting.startswith("warm"):
            img *= np.array((1.06, 1.0, 0.9), np.float32)
    img = img.reshape(SIZE, 2, SIZE, 2, 3).mean(axis=(1, 3))
    if noise > 0:
        img = img + rng.normal(0, noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def object_mask(scene: Scene) -> np.ndarray:
    """``(SIZE, SIZE)`` float32: the fraction of each pixel covered by an object (the
    renderer's 2x supersampling, box-filtered like :func:`render`)."""
    s = 2 * SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    m = np.zeros((s, s), bool)
    for o in scene.objects:
        m |= _mask(o.shape, yy - 2 * o.y, xx - 2 * o.x, 2 * o.r)
    return m.reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3)).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def parse_prompt(text: str) -> Spec:
    """The :class:`Spec` of an easy prompt (a refined prompt's detail, after the first comma,
    is ignored): the inverse of :meth:`Spec.prompt`. Raises ``ValueError`` for text outside
    the grammar."""
    words = text.split(",")[0].strip().lower().split()
    singular = {p: s for s, p in PLURAL.items()}
    numbers = {w: n for n, w in COUNT_WORDS.items()}

    def noun(ws: list[str]) -> tuple[str | None, str] | None:
        # "a circle", "an orange square" -> (colour, shape)
        if len(ws) == 2 and ws[0] in ("a", "an") and ws[1] in SHAPES:
            return None, ws[1]
        if len(ws) == 3 and ws[0] in ("a", "an") and ws[1] in COLOURS and ws[2] in SHAPES:
            return ws[1], ws[2]
        return None

    if len(words) == 2 and words[0] in numbers:
        n, w = numbers[words[0]], words[1]
        shape = w if n == 1 and w in SHAPES else singular.get(w) if n > 1 else None
        if shape:
            return Spec("counting", [shape], [None], count=n)
    one = noun(words)
    if one:
        return Spec("single_object" if one[0] is None else "colors", [one[1]], [one[0]])
    if "and" in words:
        i = words.index("and")
        a, b = noun(words[:i]), noun(words[i + 1 :])
        if a and b and (a[0] is None) == (b[0] is None):
            cat = "two_object" if a[0] is None else "color_attr"
            return Spec(cat, [a[1], b[1]], [a[0], b[0]])
    for rel in RELATIONS:
        r = rel.split()
        for i in range(1, len(words)):
            if words[i : i + len(r)] == r:
                a, b = noun(words[:i]), noun(words[i + len(r) :])
                if a and b and a[0] is None and b[0] is None:
                    return Spec("position", [a[1], b[1]], [None, None], relation=rel)
    raise ValueError(f"prompt {text!r} is not in the world's grammar (see rewards/world/scenes.py)")


def world_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` easy prompts cycling through GenEval's six categories (so that a mean over them
    is GenEval's mean of category scores)."""
    rng = np.random.default_rng((seed, 5))
    return [sample_spec(rng, CATEGORIES[i % len(CATEGORIES)]).prompt() for i in range(n)]
