"""The judge's detector: a small fully-convolutional one-stage network (YOLO-style, torch
only), its training data from the world's renders with the renderer's truth as labels, its grid
targets, augmentation and loss.

* input: ``(B, 3, 64, 64)`` RGB in [0, 1];
* output: an 8 x 8 grid (stride 8); per cell an objectness logit, shape logits (4), colour
  logits (6) and the object's centre as an offset from the cell's corner, in cells.

An object is assigned to the cell holding its centre and, when its centre lies within
``BORDER`` px of a cell edge, to the neighbouring cell(s) across that edge too (as YOLOv5 does),
so an object on a cell boundary is found by either cell. :mod:`rewards.world.judge` decodes the
grid into detections.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .scenes import (
    COLOURS,
    SHAPES,
    SIZE,
    Scene,
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

__all__ = ["TinyDetector", "augment", "detector_loss", "render_set"]


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
