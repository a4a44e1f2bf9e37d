"""Pick-High in miniature: triplets in the Pick-High columns, made the way the paper made them.

Per easy prompt (GenEval's categories in turn):

- I1, I2 (``easy_image_0``, ``easy_image_1``): two samples of the *base world generator* for
  the easy prompt; the judge picks the winner, as Pick-a-Pic's people did. The judge's graded
  score (:func:`graded`) ranks them; prompts whose two samples tie are dropped and counted
  (Pick-a-Pic keeps only pairs with a winner).
- I3 (``refine_image``): the refined prompt rendered by the world itself, the "stronger model".
- E1, E2, R1, R2: the paper's ICT labels from the world CLIP as teacher
  (:func:`rewards.labels.teacher_labels`), with ``theta`` set to the median teacher cosine of
  renders with their own easy prompt (a matching image scores C = 1 half the time).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards.world import scenes as S

log = logging.getLogger(__name__)

LABELS = ("E1", "E2", "R1", "R2")


def graded(judge, spec: S.Spec, dets) -> float:
    """How much of ``spec`` the detections meet: 1 when :meth:`Judge.check` passes, else the
    fraction of the prompt's parts present (objects of the named shapes and colours, the
    count's closeness), so a near miss beats a blank."""
    if judge.check(spec, dets):
        return 1.0

    def n_of(shape, colour=None):
        return sum(1 for d in dets if d.shape == shape and colour in (None, d.colour))

    if spec.category == "counting":
        return 0.5 / (1 + abs(n_of(spec.shapes[0]) - spec.count))
    present = [n_of(s, c) > 0 for s, c in zip(spec.shapes, spec.colours)]
    return 0.5 * float(np.mean(present))


def _png(img: torch.Tensor | np.ndarray) -> bytes:
    a = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else img
    buf = io.BytesIO()
    Image.fromarray(S.to_uint8(a)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@torch.no_grad()
def make_triplets(world_dir: Path, n_prompts: int, seed: int, recipe) -> tuple[list[dict], dict]:
    """Rows with the Pick-High columns and labels, and stats (ties dropped, theta)."""
    from rewards.labels import teacher_labels
    from rewards.registry import build_reward
    from rewards.world.judge import Judge
    from rlhf.world.sampling import load_world_generator, sample_world

    judge = Judge.load(world_dir / "judge")
    rng = np.random.default_rng((seed, 31))
    specs = [S.sample_spec(rng, S.CATEGORIES[i % len(S.CATEGORIES)]) for i in range(n_prompts)]
    easy = [s.prompt() for s in specs]
    gen = load_world_generator(world_dir / "sd3")
    a = sample_world(world_dir / "sd3", easy, recipe, seed=seed * 1_000_003, gen=gen)
    b = sample_world(world_dir / "sd3", easy, recipe, seed=seed * 1_000_003 + 500_000, gen=gen)
    da, db = judge.detect(a), judge.detect(b)
    details = [S.sample_detail(rng) for _ in specs]
    refined = [S.refine_prompt(p, d) for p, d in zip(easy, details)]
    i3 = [S.render(S.scene_for(s, rng, d), rng) for s, d in zip(specs, details)]
    teacher = build_reward(
        {"name": "clip", "options": {"backbone": world_backbone(world_dir)}}
    ).eval()
    own = teacher(torch.from_numpy(np.stack(i3)).permute(0, 3, 1, 2), easy)
    theta = float(own.median())
    rows, ties = [], 0
    for k, spec in enumerate(specs):
        ga, gb = graded(judge, spec, da[k]), graded(judge, spec, db[k])
        if ga == gb:
            ties += 1
            continue
        lo, hi = (a[k], b[k]) if ga < gb else (b[k], a[k])
        rows.append(
            {
                "easy_prompt": easy[k],
                "refine_prompt": refined[k],
                "_images": torch.stack([lo, hi, torch.from_numpy(i3[k]).permute(2, 0, 1)]),
                "category": spec.category,
            }
        )
    if rows:
        imgs = torch.stack([r["_images"] for r in rows])
        labels = teacher_labels(
            teacher,
            imgs,
            [r["easy_prompt"] for r in rows],
            [r["refine_prompt"] for r in rows],
            theta,
        )
        for r, lab in zip(rows, labels.tolist()):
            im = r.pop("_images")
            r.update(easy_image_0=_png(im[0]), easy_image_1=_png(im[1]), refine_image=_png(im[2]))
            r.update(dict(zip(LABELS, lab)))
    stats = {"prompts": n_prompts, "triplets": len(rows), "ties_dropped": ties, "theta": theta}
    return rows, stats


def world_backbone(world_dir: str | Path) -> dict:
    """The backbone spec of the CLIP of a world built in ``world_dir``."""
    clip = Path(world_dir) / "clip"
    return {
        "kind": "open_clip",
        "model": str(clip / "open_clip_config.json"),
        "pretrained": str(clip / "open_clip.safetensors"),
        "extra": {"tokenizer": str(clip / "tokenizer")},
    }


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """Atomic Parquet write: prompts and category as strings, images as PNG bytes, labels as
    floats."""
    import pyarrow as pa

    from rewards.data import write_table_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {
        "easy_prompt": pa.string(),
        "refine_prompt": pa.string(),
        "easy_image_0": pa.binary(),
        "easy_image_1": pa.binary(),
        "refine_image": pa.binary(),
        **{k: pa.float32() for k in LABELS},
        "category": pa.string(),
    }
    table = pa.table({c: [r[c] for r in rows] for c in cols}, schema=pa.schema(list(cols.items())))
    return write_table_atomic(table, path)


def build_triplets(
    world_dir: str | Path, out: str | Path, n_train: int, n_eval: int, seed: int = 0, recipe=None
) -> dict:
    """``out/train.parquet`` and ``out/eval.parquet`` (different prompts and seeds); returns
    their stats."""
    from rlhf.world.build import Recipe

    world_dir, out = Path(world_dir), Path(out)
    recipe = recipe or Recipe()
    stats = {}
    for split, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 1)):
        if n == 0:
            continue
        rows, st = make_triplets(world_dir, n, s, recipe)
        write_parquet(rows, out / f"{split}.parquet")
        stats[split] = st
        log.info("pick-high-mini %s: %s", split, st)
    return stats
