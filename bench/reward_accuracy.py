"""The paper's preference-accuracy table in the miniature world (BENCHMARKS.md, table 1).

Pick-High-mini triplets from the shipped world (``rlhf.world.triplets``), then, trained in this
process (:func:`rewards.training.run_training`) from the world's pretrained CLIP: a pairwise
baseline on I2 > I1 alone (PickScore's recipe, ``kind: pickscore``), ICT, HP; and ICT-HP from
the two. Scored on the held-out split beside the world CLIP score.

    python -m bench.reward_accuracy [--short] [--out FILE.json] [--data DIR] [--save DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit

WORLD = {"backbone": "world"}


def run(
    short: bool = False, data: str | None = None, save: str | None = None, epochs: int | None = None
) -> dict:
    from rewards import world
    from rewards.evaluate import format_table, preference_accuracy, score_triplets
    from rewards.ict_hp import ICTHPReward
    from rewards.objective import Objective, build_model
    from rewards.registry import build_reward, save_reward
    from rewards.training import make_dataset, make_eval_loader, run_training
    from rlhf.quickstart import reward_config
    from rlhf.world.triplets import build_triplets

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        data_dir = Path(data or d)
        t = time.perf_counter()
        if not (data_dir / "eval.parquet").is_file():
            stats = build_triplets(world.ASSETS, data_dir, *((120, 60) if short else (1200, 300)))
        else:
            stats = {"cached": str(data_dir)}
        timings = {"triplets_s": time.perf_counter() - t}
        extra = [f"optim.epochs={epochs}"] if epochs else []
        cfgs = {
            kind: reward_config(kind, Path(d), data_dir, short, extra) for kind in ("ict", "hp")
        }
        # The pairwise baseline: the ICT's settings, trained on I2 > I1 alone.
        cfgs["pickscore"] = reward_config(
            "ict", Path(d), data_dir, short, [*extra, "kind=pickscore", "name=pickscore"]
        )
        eval_ds = make_dataset(cfgs["ict"].data, "eval")
        train_ds = make_dataset(cfgs["ict"].data, "train")
        loader = make_eval_loader(eval_ds, 64)
        trained = {}
        for kind in ("pickscore", "ict", "hp"):
            cfg = cfgs[kind]
            torch.manual_seed(cfg.seed)
            model, teacher, ict = build_model(cfg)
            t = time.perf_counter()
            run_training(cfg, model, Objective(cfg, model, teacher, ict), train_ds, None)
            timings[f"train_{kind}_s"] = time.perf_counter() - t
            trained[kind] = model.eval()
            if save:
                save_reward(trained[kind], Path(save) / kind)
        rows = {}
        for label, model in (
            ("CLIP score (world CLIP)", build_reward({"name": "clip", "options": WORLD})),
            ("Pairwise I2>I1 (PickScore recipe)", trained["pickscore"]),
            ("ICT", trained["ict"]),
            ("HP", trained["hp"]),
            ("ICT-HP", ICTHPReward(trained["ict"], trained["hp"])),
        ):
            torch.manual_seed(0)
            rows[label] = preference_accuracy(score_triplets(model, loader))
    print(format_table(rows))
    return {
        "suite": "reward_accuracy",
        "short": short,
        "triplets": stats,
        "train_triplets": len(train_ds),
        "eval_triplets": len(eval_ds),
        "epochs": cfgs["ict"].optim.epochs,
        "accuracy": rows,
        "timings": timings,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="the quickstart's --fast sizes")
    p.add_argument("--data", default=None, help="a folder with train/eval.parquet to reuse")
    p.add_argument("--save", default=None, help="save the trained rewards here (table 2 uses them)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per reward (default: 3)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.short, a.data, a.save, a.epochs), a.out)


if __name__ == "__main__":
    sys.exit(main())
