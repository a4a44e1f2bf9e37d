"""The full stack on one GPU: ``rlhf finetune`` as a Ray Train job with SD3.5-shaped random
weights (Medium at 512 px, Large at 1024 px), bf16, NCCL, xformers (SDPA where it is not
installed), one generator worker under DeepSpeed ZeRO-2 on a share of the GPU, ICT and HP on
ViT-H-14-shaped backbones in reward servers on a quarter GPU each; a few steps, a checkpoint,
Ctrl-C, and a resume that logs every step once.

Each run writes what it measured (images/s, step and reward time, peak GPU memory of the
worker, checkpoint size) as JSON into ``$RLHF_GPU_REPORT`` when that is set:

    RLHF_GPU_REPORT=/tmp/gpu pytest -m gpu tests/gpu/test_stack_gpu.py -s

``RLHF_GPU_TRANSPORT=cuda_ipc`` sends the reward traffic by CUDA IPC instead of the object store.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
STEPS = 4
# How reward traffic travels (reward_server.transport): object_store, or cuda_ipc (same GPU).
TRANSPORT = os.environ.get("RLHF_GPU_TRANSPORT", "object_store")


def _config(tmp_path: Path, model: str, size: int, shape: str) -> Path:
    backbone = {"kind": "open_clip", "model": "ViT-H-14"}  # random weights, the paper's shape
    doc = {
        "name": f"gpu-{shape}",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "policy": {
            "generator": {
                "model": model,
                "load_t5": False,
                "dtype": "auto",
                "attention": "auto",
                "gradient_checkpointing": True,
                "vae_gradient_checkpointing": True,
            },
            "finetune": {"mode": "lora", "rank": 16, "alpha": 16.0},
            "sampler": {
                "steps": 4,
                "guidance_scale": 0.0,
                "height": size,
                "width": size,
                "max_sequence_length": 256,
            },
            "draft": {"k": 1},
            "engine": {"lr": 1e-4, "zero_stage": 2, "grad_clip": 1.0},
        },
        "rewards": [
            {"name": n, "weight": 1.0, "placement": "server", "options": {"backbone": backbone}}
            for n in ("ict", "hp")
        ],
        "eval_rewards": [],
        "prompts": {
            "train": "synthetic",
            "eval": "synthetic",
            "synthetic_train": 64,
            "synthetic_eval": 2,
        },
        "scaling": {
            "num_workers": 1,
            "use_gpu": True,
            "cpus_per_worker": 4,
            "gpus_per_worker": 0.5,
            "max_failures": 0,
        },
        "reward_server": {
            "resources": {"num_cpus": 4, "num_gpus": 0.25},
            "max_batch_size": 8,
            "transport": TRANSPORT,
        },
        "train": {"max_steps": STEPS, "batch_size": 1, "eval_every": 2, "max_bad_steps": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "mlflow": {
            "experiment": f"gpu-{shape}",
            "register_as": None,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("shape,size", [("medium", 512), ("large", 1024)])
def test_finetune_on_one_gpu_checkpoint_ctrl_c_and_resume(
    ray_gpu, tmp_path, monkeypatch, shape, size
):
    from mlflow import MlflowClient

    from actors.finetune_run import FinetuneRun
    from bench.sd35_shapes import save_folder
    from rlhf.config import load_config
    from rlhf.run_config import RunConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where a resume looks the run up
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    model = save_folder(shape, str(tmp_path / f"sd35-{shape}"), "cuda")
    build_s = time.perf_counter() - t0
    cfg = load_config(RunConfig, _config(tmp_path, model, size, shape), [])

    def interrupt_after_3(co, step, m):  # in the coordinator actor: Ctrl-C's path
        if step == 3:
            co.interrupt()

    t0 = time.perf_counter()
    job = FinetuneRun(cfg, progress=True, on_step=interrupt_after_3)
    with pytest.raises(KeyboardInterrupt):
        job.run()
    first_s = time.perf_counter() - t0
    run_id = job.run_id
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    ckpts = sorted((Path(job.run_dir) / "checkpoints").iterdir())
    assert ckpts, "no checkpoint before the interrupt"
    ckpt_bytes = sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file())

    t0 = time.perf_counter()
    summary = FinetuneRun(None, resume_run_id=run_id, progress=True).run()
    resume_s = time.perf_counter() - t0
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    hist = {
        k: client.get_metric_history(run_id, f"train/{k}")
        for k in ("loss", "time_s", "reward_s", "images_per_s", "gpu_peak_gib", "grad_norm")
    }
    assert sorted(m.step for m in hist["loss"]) == list(range(1, STEPS + 1))  # each step once
    for k, ms in hist.items():
        assert ms and all(torch.isfinite(torch.tensor(m.value)) for m in ms), k
    later = [m for m in hist["time_s"] if m.step > 1]  # step 1 includes the warm-up
    report = {
        "shape": shape,
        "size": size,
        "device": torch.cuda.get_device_name(),
        "attention": "xformers" if _has_xformers() else "sdpa",
        "transport": TRANSPORT,
        "folder_build_s": build_s,
        "first_run_s": first_s,
        "resume_run_s": resume_s,
        "step_s": [m.value for m in sorted(later, key=lambda m: m.step)],
        "reward_s": [m.value for m in sorted(hist["reward_s"], key=lambda m: m.step)],
        "images_per_s": [m.value for m in sorted(hist["images_per_s"], key=lambda m: m.step)],
        "worker_peak_gib": max(m.value for m in hist["gpu_peak_gib"]),
        "checkpoint_mib": ckpt_bytes / 2**20,
    }
    print(json.dumps(report, indent=2))
    out = os.environ.get("RLHF_GPU_REPORT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"stack_{shape}_{size}_{TRANSPORT}.json").write_text(
            json.dumps(report, indent=2)
        )
    # A LoRA run's checkpoint holds the adapters and their optimiser state, not the base.
    assert ckpt_bytes < 2**30


def _has_xformers() -> bool:
    from rlhf.generator import xformers_unusable

    return xformers_unusable() is None
