"""Preference accuracy of tiny ICT and HP trained in-process (no Ray) on synthetic triplets.

The same data and schedules as the quickstart's reward jobs (``rlhf.quickstart.reward_configs``),
trained with :func:`rewards.training.run_training` in this process, then scored on the
held-out synthetic split beside the untrained tiny CLIP score and the untrained HP model.

    python -m bench.reward_accuracy [--short] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit


def run(short: bool = False) -> dict:
    from rewards.evaluate import format_table, preference_accuracy, score_triplets
    from rewards.registry import build_reward
    from rewards.training import (
        Objective,
        build_model,
        make_dataset,
        make_eval_loader,
        run_training,
    )
    from rlhf.quickstart import TINY, reward_configs

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        cfgs = reward_configs(Path(d), fast=short)
        eval_ds = make_dataset(cfgs["ict"].data, "eval")
        train_ds = make_dataset(cfgs["ict"].data, "train")
        loader = make_eval_loader(eval_ds, 64)
        trained, timings = {}, {}
        for kind in ("ict", "hp"):
            cfg = cfgs[kind]
            torch.manual_seed(cfg.seed)
            model, teacher, ict = build_model(cfg)
            t = time.perf_counter()
            run_training(cfg, model, Objective(cfg, model, teacher, ict), train_ds, None)
            timings[f"train_{kind}_s"] = time.perf_counter() - t
            trained[kind] = model.eval()
        rows = {}
        for label, model in (
            ("CLIP score (untrained tiny CLIP)", build_reward({"name": "clip", "options": TINY})),
            ("HP untrained", build_reward({"name": "hp", "options": TINY})),
            ("ICT (trained in-process)", trained["ict"]),
            ("HP (trained in-process)", trained["hp"]),
        ):
            torch.manual_seed(0)
            rows[label] = preference_accuracy(score_triplets(model, loader))
    print(format_table(rows))
    return {
        "suite": "reward_accuracy",
        "short": short,
        "train_triplets": len(train_ds),
        "eval_triplets": len(eval_ds),
        "accuracy": rows,
        "timings": timings,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="the quickstart's --fast sizes")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.short), a.out)


if __name__ == "__main__":
    sys.exit(main())
