"""Cheap image statistics that expose reward hacking: when the reward climbs while these
drift (images get brighter, oversaturated, noisier or flatter), the policy is gaming the
reward model rather than getting better."""

from __future__ import annotations

import io

import numpy as np
import torch


def image_stats(images: torch.Tensor) -> dict[str, float]:
    """Means over a batch ``(B, 3, H, W)`` in [0, 1]:

    - ``brightness``: Rec. 601 luma;
    - ``saturation``: HSV saturation ``(max - min) / max``;
    - ``edge_density``: fraction of pixels whose Sobel gradient magnitude of the luma exceeds 0.1;
    - ``jpeg_ratio``: JPEG (quality 75) size over raw RGB size: low = flat, high = noisy.
    """
    x = images.detach().float().clamp(0, 1).cpu()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    mx, mn = x.max(dim=1).values, x.min(dim=1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx))
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    padded = torch.nn.functional.pad(luma[:, None], (1, 1, 1, 1), mode="replicate")
    gx = torch.nn.functional.conv2d(padded, kx)
    gy = torch.nn.functional.conv2d(padded, kx.transpose(-1, -2))
    edges = ((gx**2 + gy**2).sqrt() > 0.1).float()
    return {
        "brightness": float(luma.mean()),
        "saturation": float(sat.mean()),
        "edge_density": float(edges.mean()),
        "jpeg_ratio": float(np.mean([_jpeg_ratio(im) for im in to_uint8(x)])),
    }


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, H, W, 3)`` uint8."""
    x = images.detach().float().clamp(0, 1).cpu()
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def _jpeg_ratio(im: np.ndarray) -> float:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=75)
    return buf.tell() / im.nbytes


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 -> one ``(rows·(H+2), cols·(W+2), 3)`` image: 2-pixel white
    gutters right of and below each image, white cells after the last."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    b = len(images)
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    cells = [np.pad(im, ((0, 2), (0, 2), (0, 0)), constant_values=255) for im in images]
    cells += [np.full_like(cells[0], 255)] * (rows * cols - b)
    return np.asarray(make_image_grid([Image.fromarray(c) for c in cells], rows, cols))
