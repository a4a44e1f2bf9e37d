"""The miniature world's judge: GenEval in miniature.

GenEval scores a text-to-image model by running an object detector over its images and
checking, per prompt category, whether what it detects meets the prompt. Here the detector is a
small fully-convolutional one-stage network (YOLO-style, torch only) trained on the world's own
renders with the renderer's truth as labels:

* input: ``(B, 3, 64, 64)`` RGB in [0, 1];
* output: an 8 x 8 grid (stride 8); per cell an objectness logit, shape logits (4), colour
  logits (6) and the object's centre as an offset from the cell's corner, in cells.

An object is assigned to the cell holding its centre and, when its centre lies within
``BORDER`` px of a cell edge, to the neighbouring cell(s) across that edge too (as YOLOv5 does),
so an object on a cell boundary is found by either cell; decoding keeps cells above
``threshold`` and suppresses a detection whose centre lies within ``nms_px`` of a higher-scoring
one (the world's objects are at least 17 px apart).

:meth:`Judge.check` decides GenEval's way whether an easy prompt (:class:`Spec`) is met by the
detections of one image, and :meth:`Judge.score` gives the per-category accuracy and their
mean (GenEval's overall score). The judge is an evaluator only, never a training reward.

The weights are written as ``judge.safetensors`` and the configuration as ``judge.json``;
:meth:`Judge.load` loads them strictly, with no pickle. ``python -m rewards.world.judge --out
DIR`` trains at full scale, saves, and prints the held-out report of :func:`evaluate_judge`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .scenes import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    SIZE,
    Scene,
    Spec,
    random_scene,
    render,
    sample_detail,
    sample_spec,
    scene_for,
    to_uint8,
)

COLOUR_NAMES = tuple(COLOURS)
STRIDE = 8
GRID = SIZE // STRIDE
BORDER = 3.0  # px: an object this close to a cell edge is also the neighbour cell's
OFF_LO, OFF_HI = -BORDER / STRIDE, 1 + BORDER / STRIDE  # range of a cell's centre offset
MAX_OBJECTS = 4
WEIGHTS, CONFIG = "judge.safetensors", "judge.json"

__all__ = [
    "Detection",
    "Judge",
    "TinyDetector",
    "augment",
    "evaluate_judge",
    "render_set",
    "train_judge",
]


@dataclass(frozen=True)
class Detection:
    """One detected object: its shape, colour, centre (px, in the 64 px frame) and score."""

    shape: str
    colour: str
    y: float
    x: float
    score: float = 1.0


# --------------------------------------------------------------------------- the detector


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TinyDetector(nn.Module):
    """Six 3x3 conv blocks (strides 2, 1, 2, 1, 2, 1) and a 1x1 head: 64 px -> 8 x 8 cells,
    a receptive field of 43 px per cell (an object is at most 19 px across)."""

    def __init__(self, widths: Sequence[int] = (24, 48, 64, 128)):
        super().__init__()
        a, b, c, d = widths
        self.widths = tuple(int(w) for w in widths)
        self.body = nn.Sequential(
            *_block(3, a, 2),
            *_block(a, b, 1),
            *_block(b, c, 2),
            *_block(c, c, 1),
            *_block(c, d, 2),
            *_block(d, d, 1),
        )
        self.head = nn.Conv2d(d, 1 + len(SHAPES) + len(COLOUR_NAMES) + 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.body(x))
        ns, nc = len(SHAPES), len(COLOUR_NAMES)
        off = torch.sigmoid(out[:, 1 + ns + nc :]) * (OFF_HI - OFF_LO) + OFF_LO
        return {
            "obj": out[:, 0],  # (B, G, G) logits
            "shape": out[:, 1 : 1 + ns],  # (B, 4, G, G) logits
            "colour": out[:, 1 + ns : 1 + ns + nc],  # (B, 6, G, G) logits
            "off": off,  # (B, 2, G, G) centre (y, x) in cells from the cell's corner
        }


# --------------------------------------------------------------------------- data


def _truth_array(scenes: Sequence[Scene]) -> np.ndarray:
    """``(N, MAX_OBJECTS, 5)`` float32: valid, shape index, colour index, y, x."""
    out = np.zeros((len(scenes), MAX_OBJECTS, 5), np.float32)
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            out[i, j] = (1, SHAPES.index(o.shape), COLOUR_NAMES.index(o.colour), o.y, o.x)
    return out


def render_set(
    n: int, seed: int, detail_frac: float = 0.5, spec_frac: float = 0.5
) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """``n`` scenes, ``spec_frac`` of them ``scene_for(sample_spec)`` and the rest
    ``random_scene``, ``detail_frac`` of them refined, rendered as uint8 ``(N, 3, 64, 64)``
    with their truth (:func:`_truth_array`) and the scenes."""
    rng = np.random.default_rng(seed)
    scenes, images = [], np.empty((n, 3, SIZE, SIZE), np.uint8)
    for i in range(n):
        detail = sample_detail(rng) if rng.random() < detail_frac else None
        if rng.random() < spec_frac:
            scene = scene_for(sample_spec(rng), rng, detail)
        else:
            scene = random_scene(rng, detail)
        img = render(scene, rng)
        images[i] = to_uint8(img).transpose(2, 0, 1)
        scenes.append(scene)
    return images, _truth_array(scenes), scenes


def _targets(truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grid targets from ``truth (B, MAX_OBJECTS, 5)``: every object marks its own cell and
    the neighbours across any cell edge within ``BORDER`` px of its centre."""
    b = truth.shape[0]
    obj = torch.zeros(b, GRID, GRID)
    shape = torch.zeros(b, GRID, GRID, dtype=torch.long)
    colour = torch.zeros(b, GRID, GRID, dtype=torch.long)
    off = torch.zeros(b, 2, GRID, GRID)
    valid = truth[..., 0] > 0
    bi, oi = valid.nonzero(as_tuple=True)
    t = truth[bi, oi]
    y, x = t[:, 3] / STRIDE, t[:, 4] / STRIDE
    cy, cx = y.floor().long().clamp(0, GRID - 1), x.floor().long().clamp(0, GRID - 1)
    fy, fx = y - cy, x - cx
    near = BORDER / STRIDE
    sy = (fy > 1 - near).long() - (fy < near).long()  # -1, 0 or +1: the neighbour row
    sx = (fx > 1 - near).long() - (fx < near).long()
    zero = torch.zeros_like(sy)
    # neighbours first, so that an object's own cell wins over a neighbour's claim
    for dy, dx, keep in ((sy, zero, sy != 0), (zero, sx, sx != 0), (sy, sx, (sy != 0) & (sx != 0))):
        gy, gx = cy + dy, cx + dx
        keep = keep & (gy >= 0) & (gy < GRID) & (gx >= 0) & (gx < GRID)
        _write(obj, shape, colour, off, bi[keep], gy[keep], gx[keep], t[keep], y[keep], x[keep])
    _write(obj, shape, colour, off, bi, cy, cx, t, y, x)
    return {"obj": obj, "shape": shape, "colour": colour, "off": off}


def _write(obj, shape, colour, off, bi, gy, gx, t, y, x) -> None:
    obj[bi, gy, gx] = 1.0
    shape[bi, gy, gx] = t[:, 1].long()
    colour[bi, gy, gx] = t[:, 2].long()
    off[bi, 0, gy, gx] = y - gy
    off[bi, 1, gy, gx] = x - gx


def _gaussian_kernels(sigma: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``(B, 1, k, k)`` normalised gaussian kernels of per-sample ``sigma``."""
    r = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    g = g / g.sum(1, keepdim=True)
    return (g[:, :, None] * g[:, None, :])[:, None]


def augment(
    x: torch.Tensor, truth: torch.Tensor, gen: torch.Generator, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a small generator's drawing differs by: a horizontal flip (the world is
    left-right symmetric; ``flip=False`` leaves it out), colour jitter (+-4% per channel), brightness (+-10%, +-0.03),
    a slight gaussian blur (half the images, sigma 0.3-1.0 px) and pixel noise (std 0-0.06)."""
    b = x.shape[0]

    def u(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=gen) * (hi - lo) + lo

    flipped = (u(b) < 0.5) & flip
    x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    truth = truth.clone()
    truth[:, :, 4] = torch.where(flipped[:, None], (SIZE - 0.5) - truth[:, :, 4], truth[:, :, 4])
    x = x * u(b, 3, 1, 1, lo=0.96, hi=1.04) * u(b, 1, 1, 1, lo=0.9, hi=1.1)
    x = x + u(b, 1, 1, 1, lo=-0.03, hi=0.03)
    sigma = u(b, lo=0.3, hi=1.0)
    blurred = F.conv2d(
        F.pad(x.reshape(1, b * 3, SIZE, SIZE), (2, 2, 2, 2), mode="replicate"),
        _gaussian_kernels(sigma).repeat_interleave(3, 0),
        groups=b * 3,
    ).reshape(b, 3, SIZE, SIZE)
    x = torch.where((u(b) < 0.5)[:, None, None, None], blurred, x)
    x = x + torch.randn(x.shape, generator=gen) * u(b, 1, 1, 1, lo=0.0, hi=0.06)
    return x.clamp(0, 1), truth


def detector_loss(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    b = tgt["obj"].shape[0]
    pos = tgt["obj"] > 0
    l_obj = F.binary_cross_entropy_with_logits(out["obj"], tgt["obj"], reduction="sum") / b
    n = pos.sum().clamp(min=1)
    shape_logits = out["shape"].permute(0, 2, 3, 1)[pos]
    colour_logits = out["colour"].permute(0, 2, 3, 1)[pos]
    l_shape = F.cross_entropy(shape_logits, tgt["shape"][pos], reduction="sum") / n
    l_colour = F.cross_entropy(colour_logits, tgt["colour"][pos], reduction="sum") / n
    l_off = (out["off"] - tgt["off"]).abs().sum(1)[pos].sum() / n
    return l_obj + l_shape + l_colour + 4.0 * l_off


# --------------------------------------------------------------------------- the judge


class Judge:
    """A trained :class:`TinyDetector` with its decoding and GenEval's checks.

    ``threshold``: the objectness above which a cell is a detection; ``nms_px``: a detection
    within this many px of a higher-scoring one is the same object; ``margin_px``: for position,
    object 0 is "left of" object 1 when its centre is more than this many px left of object 1's
    (likewise right/above/below).
    """

    def __init__(
        self,
        model: TinyDetector,
        threshold: float = 0.5,
        nms_px: float = 8.0,
        margin_px: float = 3.0,
        info: dict | None = None,
    ):
        self.model = model.eval()
        self.threshold = float(threshold)
        self.nms_px = float(nms_px)
        self.margin_px = float(margin_px)
        self.info = dict(info or {})

    # ---- detection

    @torch.inference_mode()
    def detect(
        self, images: torch.Tensor | np.ndarray, batch_size: int = 256
    ) -> list[list[Detection]]:
        """``images (B, 3, H, W)``, float in [0, 1] or uint8 (resized to 64 px if need be), ->
        per image the detected objects, highest score first. Runs on the detector's device, in
        eval mode whatever mode a wrapping module left it in."""
        x = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        x = x.detach().to(next(self.model.parameters()).device).float() / scale
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        self.model.eval()
        dets: list[list[Detection]] = []
        for i in range(0, x.shape[0], batch_size):
            out = self.model(x[i : i + batch_size].clamp(0, 1))
            dets.extend(self._decode({k: v.float().cpu() for k, v in out.items()}))
        return dets

    def _decode(self, out: dict[str, torch.Tensor]) -> list[list[Detection]]:
        score = torch.sigmoid(out["obj"])
        shape = out["shape"].argmax(1)
        colour = out["colour"].argmax(1)
        gy, gx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        cy = (gy + out["off"][:, 0]) * STRIDE
        cx = (gx + out["off"][:, 1]) * STRIDE
        result = []
        for b in range(score.shape[0]):
            idx = (score[b] > self.threshold).nonzero().tolist()
            cands = sorted(
                (
                    Detection(
                        SHAPES[int(shape[b, i, j])],
                        COLOUR_NAMES[int(colour[b, i, j])],
                        float(cy[b, i, j]),
                        float(cx[b, i, j]),
                        float(score[b, i, j]),
                    )
                    for i, j in idx
                ),
                key=lambda d: -d.score,
            )
            kept: list[Detection] = []
            for d in cands:
                if all((d.y - k.y) ** 2 + (d.x - k.x) ** 2 >= self.nms_px**2 for k in kept):
                    kept.append(d)
            result.append(kept)
        return result

    # ---- GenEval's checks

    def _related(self, a, b, relation: str) -> bool:
        m = self.margin_px
        return {
            "left of": b.x - a.x > m,
            "right of": a.x - b.x > m,
            "above": b.y - a.y > m,
            "below": a.y - b.y > m,
        }[relation]

    def check(self, spec: Spec, detections: Sequence) -> bool:
        """Whether ``detections`` (of one image; anything with ``shape``, ``colour``, ``y``,
        ``x``, e.g. :class:`Detection` or the renderer's ``Obj``) meet ``spec``, GenEval's way:

        * single_object: at least one object of the shape;
        * two_object: both shapes present;
        * counting: exactly ``count`` objects of the shape (other shapes do not count);
        * colors: an object of the shape has the colour;
        * position: both shapes present and every object of shape 0 is ``relation`` every
          object of shape 1, comparing centres with a margin of ``margin_px`` px on the axis
          the relation names (GenEval compares box centres with a margin of 0.1 x the two
          boxes' sizes, ~3 px for the world's ~16 px objects; the world defines a relation by
          the gap on its axis alone, so GenEval's extra rule that this axis dominate is left
          out);
        * color_attr: an object of shape 0 in colour 0 and an object of shape 1 in colour 1.
        """
        cat, s, c = spec.category, spec.shapes, spec.colours

        def of(shape, colour=None):
            return [d for d in detections if d.shape == shape and colour in (None, d.colour)]

        if cat == "single_object":
            return len(of(s[0])) >= 1
        if cat == "two_object":
            return len(of(s[0])) >= 1 and len(of(s[1])) >= 1
        if cat == "counting":
            return len(of(s[0])) == spec.count
        if cat == "colors":
            return len(of(s[0], c[0])) >= 1
        if cat == "position":
            a, b = of(s[0]), of(s[1])
            return bool(a and b) and all(self._related(p, q, spec.relation) for p in a for q in b)
        if cat == "color_attr":
            return len(of(s[0], c[0])) >= 1 and len(of(s[1], c[1])) >= 1
        raise ValueError(f"category={cat!r} must be one of {CATEGORIES}")

    def score(self, specs: Sequence[Spec], images: torch.Tensor | np.ndarray) -> dict:
        """GenEval-mini: per-category accuracy of ``images[i]`` meeting ``specs[i]``, ``mean``
        over the categories present (GenEval's overall score), ``overall`` over all images,
        ``per_image`` booleans and ``n`` per category."""
        if len(specs) != len(images):
            raise ValueError(f"{len(specs)} specs for {len(images)} images")
        dets = self.detect(images)
        ok = [self.check(sp, d) for sp, d in zip(specs, dets)]
        by: dict[str, list[bool]] = {}
        for sp, o in zip(specs, ok):
            by.setdefault(sp.category, []).append(o)
        cats = {k: float(np.mean(by[k])) for k in CATEGORIES if k in by}
        return {
            **cats,
            "mean": float(np.mean(list(cats.values()))) if cats else float("nan"),
            "overall": float(np.mean(ok)) if ok else float("nan"),
            "per_image": ok,
            "n": {k: len(by[k]) for k in cats},
        }

    # ---- save / load

    def config(self) -> dict:
        return {
            "arch": {"name": "TinyDetector", "widths": list(self.model.widths), "stride": STRIDE},
            "shapes": list(SHAPES),
            "colours": list(COLOUR_NAMES),
            "threshold": self.threshold,
            "nms_px": self.nms_px,
            "margin_px": self.margin_px,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``judge.safetensors`` and ``judge.json`` into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps(self.config(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        path = Path(path)
        cfg = json.loads((path / CONFIG).read_text())
        if cfg["shapes"] != list(SHAPES) or cfg["colours"] != list(COLOUR_NAMES):
            raise ValueError(f"{path / CONFIG} was trained for other shapes/colours: {cfg}")
        if cfg["arch"]["name"] != "TinyDetector" or cfg["arch"]["stride"] != STRIDE:
            raise ValueError(f"{path / CONFIG}: unknown architecture {cfg['arch']}")
        model = TinyDetector(cfg["arch"]["widths"])
        model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
        return cls(model, cfg["threshold"], cfg["nms_px"], cfg["margin_px"], cfg.get("info"))


# --------------------------------------------------------------------------- training


def train_judge(
    n_train: int = 8000,
    steps: int = 900,
    seed: int = 0,
    batch_size: int = 64,
    widths: Sequence[int] = (24, 48, 64, 128),
    lr: float = 3e-3,
    threads: int | None = 2,
    log: Callable[[str], None] | None = None,
) -> Judge:
    """Render ``n_train`` scenes (half ``random_scene``, half ``scene_for(sample_spec)``, half
    of them refined) up front with numpy, then train a :class:`TinyDetector` on them for
    ``steps`` AdamW steps (one-cycle schedule) with :func:`augment`. The defaults are the full
    scale (~2 min on 2 idle cores); ``n_train=600, steps=150, batch_size=32,
    widths=(16, 32, 32, 64)`` is a toy scale (~15 s of CPU) that finds objects and colours but
    not yet shapes. ``threads``: torch threads to use (None leaves the setting alone)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    torch.manual_seed(seed)
    images, truth, _ = render_set(n_train, seed)
    t_render = time.time() - t0
    images_t, truth_t = torch.from_numpy(images), torch.from_numpy(truth)
    model = TinyDetector(widths)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=0.15, final_div_factor=100
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    perm, pos = torch.randperm(n_train, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n_train:
            perm, pos = torch.randperm(n_train, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x, t = augment(images_t[idx].float() / 255.0, truth_t[idx], gen)
        loss = detector_loss(model(x), _targets(t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    info = {
        "n_train": n_train,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "render_s": round(t_render, 1),
        "train_s": round(time.time() - t0 - t_render, 1),
    }
    return Judge(model, info=info)


# --------------------------------------------------------------------------- held-out report


def _match(truth, dets, max_px: float) -> list[tuple[int, int]]:
    """Greedy nearest pairs (truth index, detection index) within ``max_px``."""
    pairs = sorted(
        ((o.y - d.y) ** 2 + (o.x - d.x) ** 2, i, j)
        for i, o in enumerate(truth)
        for j, d in enumerate(dets)
    )
    used_t, used_d, out = set(), set(), []
    for d2, i, j in pairs:
        if d2 <= max_px**2 and i not in used_t and j not in used_d:
            used_t.add(i)
            used_d.add(j)
            out.append((i, j))
    return out


def _different_spec(spec: Spec, rng: np.random.Generator, judge: Judge) -> tuple[Spec, Scene]:
    """A spec of the same category whose scene truly does not meet ``spec``."""
    for _ in range(100):
        other = sample_spec(rng, spec.category)
        if other == spec:
            continue
        scene = scene_for(other, rng)
        if not judge.check(spec, scene.objects):
            return other, scene
    raise RuntimeError(f"no negative found for {spec}")


def _as_float(images: np.ndarray, gen: torch.Generator | None) -> torch.Tensor:
    """uint8 ``(N, 3, 64, 64)`` -> float in [0, 1], through :func:`augment` (no flip) when
    ``gen`` is given."""
    x = torch.from_numpy(images).float() / 255.0
    return x if gen is None else augment(x, torch.zeros(len(x), 1, 5), gen, flip=False)[0]


def evaluate_judge(judge: Judge, n: int = 1200, seed: int = 12345, match_px: float = 3.0) -> dict:
    """Held-out accuracy on new renders (a seed the training never used), in three kinds of
    ``n // 2`` images each: ``plain``, ``refined`` (every scene with detail) and
    ``augmented`` (half refined, passed through :func:`augment` without the flip: noise, blur,
    colour and brightness jitter); each kind half random scenes, half spec scenes.

    Per attribute: ``count`` (images whose number of detections is exact), ``shape`` and
    ``colour`` (of the truth objects matched to a detection, the share with the right
    attribute), ``position`` (truth objects with a detection within ``match_px`` px) and
    ``all_correct`` (images where every object is found with the right attributes and nothing
    else). Per prompt: ``accept``, the share of ``n // 2`` renders of ``scene_for(spec)`` that
    :meth:`Judge.check` accepts, and ``reject``, the share of as many renders of a different
    spec of the same category (one whose truth fails ``spec``) that it rejects, overall and per
    category. The top level pools the three kinds; each kind is also given on its own."""
    rng = np.random.default_rng(seed)
    tally: dict[str, dict[str, list]] = {}
    kinds = (("plain", 0.0, False), ("refined", 1.0, False), ("augmented", 0.5, True))
    for k, (kind, frac, aug) in enumerate(kinds):
        gen = torch.Generator().manual_seed(seed + k) if aug else None
        images, _, scenes = render_set(n // 2, seed + 1 + k, detail_frac=frac)
        dets = judge.detect(_as_float(images, gen))
        t = tally.setdefault(kind, {a: [] for a in ("count", "shape", "colour", "position", "all")})
        for s, d in zip(scenes, dets):
            pairs = _match(s.objects, d, match_px)
            t["count"].append(len(d) == len(s.objects))
            t["position"].extend([True] * len(pairs) + [False] * (len(s.objects) - len(pairs)))
            good = 0
            for i, j in pairs:
                t["shape"].append(s.objects[i].shape == d[j].shape)
                t["colour"].append(s.objects[i].colour == d[j].colour)
                good += s.objects[i].shape == d[j].shape and s.objects[i].colour == d[j].colour
            t["all"].append(good == len(s.objects) == len(d))
        # prompts: renders of the spec, and of a different spec of the same category
        specs = [sample_spec(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(n // 2)]
        detail = [sample_detail(rng) if rng.random() < frac else None for _ in specs]
        pos = [scene_for(sp, rng, dt) for sp, dt in zip(specs, detail)]
        neg = []
        for sp, dt in zip(specs, detail):
            _, sc = _different_spec(sp, rng, judge)
            neg.append(Scene(sc.objects, sc.background, dt))
        pos_img = np.stack([to_uint8(render(s, rng)).transpose(2, 0, 1) for s in pos])
        neg_img = np.stack([to_uint8(render(s, rng)).transpose(2, 0, 1) for s in neg])
        t["accept"] = [
            judge.check(sp, d) for sp, d in zip(specs, judge.detect(_as_float(pos_img, gen)))
        ]
        t["reject"] = [
            not judge.check(sp, d) for sp, d in zip(specs, judge.detect(_as_float(neg_img, gen)))
        ]
        t["cat"] = [sp.category for sp in specs]

    def summarise(ts: list[dict]) -> dict:
        out = {}
        for a in ("count", "shape", "colour", "position", "all", "accept", "reject"):
            out["all_correct" if a == "all" else a] = round(
                float(np.mean([v for t in ts for v in t[a]])), 4
            )
        cats = [c for t in ts for c in t["cat"]]
        for a in ("accept", "reject"):
            vals = [v for t in ts for v in t[a]]
            out[f"{a}_by_category"] = {
                c: round(float(np.mean([v for v, cc in zip(vals, cats) if cc == c])), 4)
                for c in CATEGORIES
            }
        return out

    report = summarise(list(tally.values()))
    for kind, t in tally.items():
        report[kind] = summarise([t])
    report["n"] = 3 * (n // 2)
    return report


def _main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train the world's judge, save it, report held-out accuracy."
    )
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=1200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    t0 = time.time()
    judge = train_judge(
        a.n_train, a.steps, a.seed, threads=a.threads, log=lambda m: print(m, flush=True)
    )
    judge.save(a.out)
    t1 = time.time()
    report = evaluate_judge(Judge.load(a.out), n=a.n_eval, seed=a.seed + 10_000)
    report["train_s"], report["eval_s"] = round(t1 - t0, 1), round(time.time() - t1, 1)
    report["params"] = sum(p.numel() for p in judge.model.parameters())
    report["weights_bytes"] = (Path(a.out) / WEIGHTS).stat().st_size
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    _main()
