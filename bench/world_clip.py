"""The world CLIP's image tower and training pairs against held-out caption choice
(BENCHMARKS.md, section 0).

Trains ``world-clip`` with the build's contrastive recipe (in-batch and ``--k`` hard negatives
per image) and reports :func:`rewards.world.clip.caption_choice_accuracy` every
``--eval-every`` steps. ``--twins``: each batch holds scenes beside a perturbed copy, rendered
and captioned (a minimal pair, both positives of their own image; ``--twin-first`` names the
perturbation tried first).

    python -m bench.world_clip --vision resnet --steps 2400 [--twins] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from bench.common import emit


def _pairs(n: int, seed: int, k: int, twin_first: str | None):
    """``2n`` images (scene ``i`` at ``2i``, its twin at ``2i + 1``), captions, negatives."""
    import numpy as np

    from rewards.world import clip as C
    from rewards.world import scenes as S

    images = np.empty((2 * n, S.SIZE, S.SIZE, 3), np.uint8)
    pos, neg = [], []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        scene = C.training_scene(rng)
        cap = C._caption(scene, (seed, i, 1))
        kinds = [str(x) for x in rng.permutation(C.PERTURBATIONS)]
        if twin_first:
            kinds = [twin_first] + [x for x in kinds if x != twin_first]
        twin = scene
        for kind in kinds:
            alt = C.perturb(scene, kind, rng)
            if alt is not None and C._caption(alt, (seed, i, 1)) != cap:
                twin = alt
                break
        noise = float(rng.uniform(0, 0.03))
        for j, sc in enumerate((scene, twin)):
            images[2 * i + j] = S.to_uint8(
                S.render(sc, np.random.default_rng((seed, i, 7)), noise=noise)
            )
            p = C._caption(sc, (seed, i, 1))
            alts = C.negatives(sc, (seed, i, 1), rng, k) if k else []
            pos.append(p)
            neg.append(alts + [p] * (k - len(alts)))
    return images, pos, neg


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from rewards.backbones import tokenize
    from rewards.world import clip as C
    from rewards.world.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    model = C.create_model(C.model_config(len(tok), "full", args.vision))
    images, pos, neg = _pairs(args.scenes, args.seed, args.k, args.twin_first)
    pos_ids = tokenize(tok, pos)
    neg_ids = tokenize(tok, [c for r in neg for c in r]).view(len(pos), args.k, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        model.train()
        if args.twins:
            half = torch.randint(0, args.scenes, (args.batch // 2,), generator=gen)
            idx = torch.stack([2 * half, 2 * half + 1], 1).flatten()
        else:
            idx = 2 * torch.randint(0, args.scenes, (args.batch,), generator=gen)
        img = F.normalize(model.encode_image(C.pixels(images[idx.numpy()])), dim=-1)
        ids = torch.cat([pos_ids[idx], neg_ids[idx].flatten(0, 1)]) if args.k else pos_ids[idx]
        txt = F.normalize(model.encode_text(ids), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(idx))
        loss = (
            F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(idx)].T, target)
        ) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            r = C.caption_choice_accuracy(model, tok, n=args.eval_n)
            r.update(step=step, loss=round(loss.item(), 4), seconds=round(time.time() - t0))
            print(r, file=sys.stderr, flush=True)
            curve.append(r)
    return {"args": vars(args), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from rewards.world import VISION_TOWERS

    ap.add_argument("--vision", choices=VISION_TOWERS, default="resnet")
    ap.add_argument("--scenes", type=int, default=10000, help="distinct scenes (default 10000)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=3, help="hard negatives per image")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--twins", action="store_true")
    ap.add_argument("--twin-first", choices=("colour", "shape", "relation", "texture"))
    ap.add_argument("--eval-every", type=int, default=800)
    ap.add_argument("--eval-n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    return emit(run(ap.parse_args(argv)), ap.parse_args(argv).out)


if __name__ == "__main__":
    raise SystemExit(main())
