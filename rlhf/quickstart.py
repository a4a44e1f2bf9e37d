"""``rlhf quickstart``: the paper's pipeline in the miniature world, on a CPU, no downloads.

Pick-High-mini triplets from the shipped world (I1/I2 sampled from its pretrained SD3 and
ranked by its judge, I3 rendered from the refined prompt, teacher ICT labels) -> ICT and HP
trained from the world's pretrained CLIP as Ray Train jobs (2 workers, gloo) -> registered in
the embedded MLflow -> preference-accuracy table beside the CLIP score -> DRaFT-K fine-tuning
of the world SD3 against the trained ICT (in a reward server) and HP (in the workers) with 2
generator workers under DeepSpeed (``configs/world.yaml``), GenEval-mini at every evaluation
-> the policy registered in MLflow -> a summary with a before/after grid.

Like the CLI, it sits on top of the layers (``rewards`` <- ``rlhf`` <- ``actors``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from rlhf.config import load_config
from rlhf.reward_run_config import RewardTrainConfig

log = logging.getLogger(__name__)
WORLD = {"backbone": "world"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FINETUNE_CONFIG = CONFIGS / "world.yaml"
# Numbers of Pick-High-mini triplets (prompts; ties are dropped) for train and held-out.
TRIPLETS = {False: (600, 150), True: (120, 60)}


def reward_config(
    kind: str, out: Path, data_dir: Path, fast: bool, overrides: list[str] = ()
) -> RewardTrainConfig:
    """``configs/reward_world_<kind>.yaml`` on the Pick-High-mini files in ``data_dir``, Ray
    Train's runs in ``out/ray_runs``; ``fast``: one epoch at a global batch of 16 (its ~60
    triplets must fill a few batches), evaluated every 2 steps."""
    extra = ["optim.epochs=1", "optim.batch_size=8", "eval_every=2"] if fast else []
    return load_config(
        RewardTrainConfig,
        CONFIGS / f"reward_world_{kind}.yaml",
        [
            f"name=quickstart-{kind}-{uuid.uuid4().hex[:6]}",
            f"data.train={data_dir / 'train.parquet'}",
            f"data.eval={data_dir / 'eval.parquet'}",
            f"output_dir={out / 'ray_runs'}",
            *extra,
            *overrides,
        ],
    )


def _banner(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def make_triplets(data_dir: Path, fast: bool) -> dict:
    """Pick-High-mini from the shipped world into ``data_dir`` (kept between runs)."""
    from rewards import world
    from rlhf.world.triplets import build_triplets

    stats_file = data_dir / "stats.json"
    n_train, n_eval = TRIPLETS[fast]
    key = {"prompts": [n_train, n_eval], "world": world_id(world.ASSETS)}
    stats = cached_triplets(stats_file, key)
    if stats is not None:
        return stats
    stats = {**build_triplets(world.ASSETS, data_dir, n_train, n_eval), **key}
    stats_file.write_text(json.dumps(stats, indent=2))
    return stats


def world_id(root: Path) -> str:
    """The sha256 of a built world's manifest: it changes whenever any of its files does."""
    from rewards.checkpoints import file_sha256

    return file_sha256(root / "manifest.json")


def cached_triplets(stats_file: Path, key: dict) -> dict | None:
    """The stats of triplets already in ``stats_file``'s folder when they were made with
    ``key`` (the prompt counts and the world they were sampled from), else None."""
    if not stats_file.is_file():
        return None
    stats = json.loads(stats_file.read_text())
    return stats if all(stats.get(k) == v for k, v in key.items()) else None


def before_after_grid(samples: Path, out: Path) -> Path | None:
    """The step-0 and the last evaluation grids side by side (same prompts and seeds)."""
    import numpy as np
    from PIL import Image

    steps = sorted(samples.glob("step_*.png"))
    if len(steps) < 2:
        return None
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (steps[0], steps[-1]))
    gap = np.full((a.shape[0], 8, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([a, gap, b], axis=1)).save(out)
    return out


def run_quickstart(out: Path, fast: bool = False) -> dict:
    import torch

    from rewards.evaluate import format_table, write_json
    from rewards.training import make_dataset

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    timings: dict[str, float] = {}
    data_dir = out / "data"

    _banner("1/5 Pick-High-mini triplets from the world's pretrained SD3, CLIP and judge")
    t = time.perf_counter()
    stats = make_triplets(data_dir, fast)
    cfgs = {kind: reward_config(kind, out, data_dir, fast) for kind in ("ict", "hp")}
    eval_ds = make_dataset(cfgs["ict"].data, "eval")
    timings["data"] = time.perf_counter() - t
    print(
        f"{stats['train']['triplets']} train / {stats['eval']['triplets']} held-out triplets "
        f"in {data_dir} ({stats['train']['ties_dropped']} + {stats['eval']['ties_dropped']} "
        "prompts dropped: the judge saw no winner)"
    )

    trained = train_rewards(cfgs, timings)
    ict_uri, hp_uri = trained["ict"]["model_uri"], trained["hp"]["model_uri"]

    _banner("4/5 preference accuracy on held-out Pick-High-mini triplets")
    t = time.perf_counter()
    results = accuracy_table(eval_ds, ict_uri, hp_uri)
    timings["evaluate"] = time.perf_counter() - t
    table = format_table(results)
    print(table)

    _banner("5/5 DRaFT-K: the world SD3, 2 generator workers (DeepSpeed ZeRO-2), ICT + HP")
    t = time.perf_counter()
    finetune = run_finetune(out, ict_uri, hp_uri, fast)
    timings["finetune"] = time.perf_counter() - t
    grid = before_after_grid(Path(finetune["samples"]), out / "before_after.png")
    before, after = finetune.get("reward_before") or {}, finetune.get("reward_after") or {}
    summary = {
        "triplets": stats,
        "rewards": trained,
        "accuracy": results,
        "finetune": finetune,
        "geneval_mini": {
            "before": before.get("eval/reward/geneval_mini"),
            "after": after.get("eval/reward/geneval_mini"),
        },
        "jpeg_ratio": {
            "before": before.get("eval/jpeg_ratio"),
            "after": after.get("eval/jpeg_ratio"),
        },
        "before_after_grid": str(grid) if grid else None,
        "timings_s": timings,
    }
    write_json(summary, out / "summary.json")
    print_summary(summary, table, out)
    return summary


def train_rewards(cfgs: dict[str, RewardTrainConfig], timings: dict[str, float]) -> dict:
    """Phases 2 and 3: ICT, then HP, as Ray Train jobs; their summaries by kind."""
    from rlhf.train_reward import run_job

    trained = {}
    for i, kind in enumerate(("ict", "hp"), start=2):
        _banner(f"{i}/5 train {kind.upper()} from the world CLIP (Ray Train, 2 workers)")
        t = time.perf_counter()
        trained[kind] = run_job(cfgs[kind])
        timings[f"train_{kind}"] = time.perf_counter() - t
        s = trained[kind]
        print(f"registered {s['model_uri']} (run {s['run_id']}, best step {s['best_step']})")
    return trained


def accuracy_table(eval_ds, ict_uri: str, hp_uri: str) -> dict[str, dict]:
    """Phase 4: the paper's preference accuracy on ``eval_ds`` of the world CLIP's score and of
    the trained ICT, HP and ICT-HP, by row label."""
    import torch

    from rewards.evaluate import preference_accuracy, score_triplets
    from rewards.registry import build_reward
    from rewards.training import make_eval_loader

    loader = make_eval_loader(eval_ds, 64)
    rows = {
        "CLIP score (world CLIP)": {"name": "clip", "options": WORLD},
        "ICT (trained)": {"name": "ict", "checkpoint": ict_uri},
        "HP (trained)": {"name": "hp", "checkpoint": hp_uri},
        "ICT-HP (trained)": {
            "name": "ict_hp",
            "options": {"ict": {"checkpoint": ict_uri}, "hp": {"checkpoint": hp_uri}},
        },
    }
    results = {}
    for label, spec in rows.items():
        torch.manual_seed(0)
        results[label] = preference_accuracy(score_triplets(build_reward(spec), loader))
    return results


def print_summary(summary: dict, table: str, out: Path) -> None:
    """The closing lines: the accuracy table, the fine-tuning run's summary, GenEval-mini and
    JPEG ratio before -> after, the grid, the phases' seconds, the MLflow runs."""
    from rlhf.run_records import summary_lines

    _banner("summary")
    finetune, trained = summary["finetune"], summary["rewards"]
    print(table)
    print("\n".join(summary_lines(finetune)))
    for name, key in (
        ("GenEval-mini mean", "geneval_mini"),
        ("JPEG compression ratio", "jpeg_ratio"),
    ):
        d = summary[key]
        if d["before"] is not None and d["after"] is not None:
            print(f"  {name:<28} {d['before']:8.4f} -> {d['after']:8.4f}")
    if summary["before_after_grid"]:
        print(f"  before | after grid: {summary['before_after_grid']}")
    timings = summary["timings_s"]
    print("phase seconds: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    print(
        f"MLflow runs: ICT {trained['ict']['run_id']}, HP {trained['hp']['run_id']}, "
        f"policy {finetune['run_id']}"
    )
    uri = finetune["tracking_uri"]
    print(
        f"browse: {uri}"
        if "://" in uri and not uri.startswith("sqlite:")
        else f"browse: `mlflow ui --backend-store-uri {uri}`"
    )
    print(f"results: {out / 'summary.json'}")


def run_finetune(out: Path, ict_uri: str, hp_uri: str, fast: bool) -> dict:
    """``configs/world.yaml`` with the freshly trained rewards swapped in."""
    from actors.finetune_run import FinetuneRun
    from rlhf.config import load_config
    from rlhf.run_config import RunConfig

    overrides = [
        f"output_dir={out / 'runs'}",
        "rewards=["
        f"{{name: ict, checkpoint: '{ict_uri}', placement: server}}, "
        f"{{name: hp, checkpoint: '{hp_uri}', placement: colocated}}]",
    ]
    if fast:
        overrides += ["train.max_steps=6", "train.eval_every=3", "checkpoint.every=3"]
    cfg = load_config(RunConfig, FINETUNE_CONFIG, overrides)
    return FinetuneRun(cfg).run()
