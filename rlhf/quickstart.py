"""``rlhf quickstart``: the whole pipeline on tiny models, on a CPU, with no downloads.

Synthetic triplets -> tiny ICT and HP trained as Ray Train jobs (2 workers, gloo) ->
registered in the embedded MLflow -> preference-accuracy table against the untrained models
-> DRaFT-K fine-tuning of the tiny SD3 against the trained ICT (in a reward server) and HP
(in the workers) with 2 generator workers under DeepSpeed (``configs/quickstart.yaml``) ->
the policy registered in MLflow -> a summary.

Like the CLI, it sits on top of the layers (``rewards`` <- ``rlhf`` <- ``actors``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from rewards.training import (
    CheckpointConfig,
    DataConfig,
    LabelConfig,
    MlflowConfig,
    OptimConfig,
    RewardTrainConfig,
    ScalingConfig,
)

log = logging.getLogger(__name__)
TINY = {"backbone": "tiny"}
FINETUNE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def reward_configs(out: Path, fast: bool) -> dict[str, RewardTrainConfig]:
    """The tiny ICT and HP jobs the quickstart runs (also used by tests and benchmarks)."""
    n_train = 512 if fast else 2048
    data = DataConfig(
        train="synthetic",
        eval="synthetic",
        image_size=64,
        synthetic_train=n_train,
        synthetic_eval=128 if fast else 400,
        cache_dir=str(out / "data"),
    )
    tag = uuid.uuid4().hex[:6]
    common = dict(
        data=data,
        labels=LabelConfig(source="rule"),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=1),
        checkpoint=CheckpointConfig(keep=2, storage_path=str(out / "ray_runs")),
        eval_every=8 if fast else 32,
    )
    return {
        kind: RewardTrainConfig(
            name=f"quickstart-{kind}-{tag}",
            kind=kind,
            model={"options": TINY},
            optim=OptimConfig(lr=1e-3, batch_size=32, epochs=1 if fast else 3, warmup_steps=4),
            mlflow=MlflowConfig(experiment="quickstart", register_as=f"quickstart-{kind}"),
            **common,
        ).validate()
        for kind in ("ict", "hp")
    }


def _banner(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run_quickstart(out: Path, fast: bool = False) -> dict:
    import torch

    from rewards.evaluate import format_table, preference_accuracy, score_triplets, write_json
    from rewards.registry import build_reward
    from rewards.training import make_dataset, make_eval_loader
    from rlhf.train_reward import run_job

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    timings: dict[str, float] = {}
    cfgs = reward_configs(out, fast)

    _banner("1/5 synthetic triplets")
    t = time.perf_counter()
    eval_ds = make_dataset(cfgs["ict"].data, "eval")
    train_ds = make_dataset(cfgs["ict"].data, "train")
    timings["data"] = time.perf_counter() - t
    print(f"{len(train_ds)} train / {len(eval_ds)} held-out triplets in {out / 'data'}")

    trained = {}
    for i, kind in enumerate(("ict", "hp"), start=2):
        _banner(f"{i}/5 train tiny {kind.upper()} (Ray Train, 2 workers)")
        t = time.perf_counter()
        trained[kind] = run_job(cfgs[kind])
        timings[f"train_{kind}"] = time.perf_counter() - t
        s = trained[kind]
        print(f"registered {s['model_uri']} (run {s['run_id']}, best step {s['best_step']})")

    _banner("4/5 preference accuracy on held-out synthetic triplets")
    t = time.perf_counter()
    loader = make_eval_loader(eval_ds, 64)
    ict_uri, hp_uri = trained["ict"]["model_uri"], trained["hp"]["model_uri"]
    rows = {
        "CLIP score (untrained tiny CLIP)": {"name": "clip", "options": TINY},
        "HP untrained": {"name": "hp", "options": TINY},
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
    timings["evaluate"] = time.perf_counter() - t
    table = format_table(results)
    print(table)

    _banner("5/5 DRaFT-K: tiny SD3, 2 generator workers (DeepSpeed ZeRO-2), trained ICT + HP")
    t = time.perf_counter()
    finetune = run_finetune(out, ict_uri, hp_uri, fast)
    timings["finetune"] = time.perf_counter() - t

    summary = {
        "rewards": trained,
        "accuracy": results,
        "finetune": finetune,
        "timings_s": timings,
    }
    write_json(summary, out / "summary.json")
    _banner("summary")
    from actors.coordinator import summary_lines

    print(table)
    print("\n".join(summary_lines(finetune)))
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
    return summary


def run_finetune(out: Path, ict_uri: str, hp_uri: str, fast: bool) -> dict:
    """``configs/quickstart.yaml`` with the freshly trained rewards swapped in."""
    from actors.coordinator import Coordinator
    from actors.run_config import RunConfig
    from rlhf.config import load_config

    overrides = [
        f"output_dir={out / 'runs'}",
        "rewards=["
        f"{{name: ict, checkpoint: '{ict_uri}', placement: server}}, "
        f"{{name: hp, checkpoint: '{hp_uri}', placement: colocated}}]",
    ]
    if fast:
        overrides += ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3"]
    cfg = load_config(RunConfig, FINETUNE_CONFIG, overrides)
    return Coordinator(cfg).run()
