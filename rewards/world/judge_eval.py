"""The judge's held-out report, :func:`evaluate_judge`: new renders scored per attribute and
per prompt (renders of a prompt accepted, renders of a different prompt rejected)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .detector import augment, render_set
from .scenes import CATEGORIES, Scene, Spec, render, sample_detail, sample_spec, scene_for, to_uint8

if TYPE_CHECKING:
    from .judge import Judge

__all__ = ["evaluate_judge"]


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
        tally[kind] = _tally_objects(scenes, judge.detect(_as_float(images, gen)), match_px)
        tally[kind].update(_tally_prompts(judge, n // 2, frac, rng, gen))
    report = _summarise(list(tally.values()))
    for kind, t in tally.items():
        report[kind] = _summarise([t])
    report["n"] = 3 * (n // 2)
    return report


def _tally_objects(scenes: list[Scene], dets: list, match_px: float) -> dict[str, list]:
    """Per image (``count``, ``all``) and per truth object (``shape``, ``colour``,
    ``position``): whether the detections ``dets`` of ``scenes`` got it right."""
    t: dict[str, list] = {a: [] for a in ("count", "shape", "colour", "position", "all")}
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
    return t


def _tally_prompts(
    judge: Judge, m: int, frac: float, rng: np.random.Generator, gen: torch.Generator | None
) -> dict[str, list]:
    """``m`` prompts, the categories in turn (``frac`` of them refined; ``gen``: augmented):
    whether renders of each are accepted (``accept``) and renders of a different spec of the
    same category rejected (``reject``), and each one's category (``cat``)."""
    specs = [sample_spec(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(m)]
    detail = [sample_detail(rng) if rng.random() < frac else None for _ in specs]
    pos = [scene_for(sp, rng, dt) for sp, dt in zip(specs, detail)]
    neg = []
    for sp, dt in zip(specs, detail):
        _, sc = _different_spec(sp, rng, judge)
        neg.append(Scene(sc.objects, sc.background, dt))
    pos_img = np.stack([to_uint8(render(s, rng)).transpose(2, 0, 1) for s in pos])
    neg_img = np.stack([to_uint8(render(s, rng)).transpose(2, 0, 1) for s in neg])
    accept = [judge.check(sp, d) for sp, d in zip(specs, judge.detect(_as_float(pos_img, gen)))]
    reject = [not judge.check(sp, d) for sp, d in zip(specs, judge.detect(_as_float(neg_img, gen)))]
    return {"accept": accept, "reject": reject, "cat": [sp.category for sp in specs]}


def _rate(values: list) -> float | None:
    """The share of true ``values``, to four places; None where there are none (a toy-scale
    judge can find no objects at all)."""
    return round(float(np.mean(values)), 4) if values else None


def _summarise(ts: list[dict]) -> dict:
    out = {}
    for a in ("count", "shape", "colour", "position", "all", "accept", "reject"):
        out["all_correct" if a == "all" else a] = _rate([v for t in ts for v in t[a]])
    cats = [c for t in ts for c in t["cat"]]
    for a in ("accept", "reject"):
        vals = [v for t in ts for v in t[a]]
        out[f"{a}_by_category"] = {
            c: _rate([v for v, cc in zip(vals, cats) if cc == c]) for c in CATEGORIES
        }
    return out
