"""DRaFT-K step time and peak memory against K, with and without gradient checkpointing.

One DRaFT-K step on the tiny SD3 (shipped configs, random weights, LoRA rank 4) on the CPU:
4-step flow-matching Euler sampling with gradient through the last K steps and the VAE
decode, a tiny ICT-HP reward (scores + image gradient), backward, AdamW step
(:class:`rlhf.engine.PlainEngine`, one process). K in 1, 2, 4 (4 = full backprop), gradient
checkpointing (transformer blocks + VAE decoder) on and off.

Each (K, checkpointing) cell runs in a fresh subprocess, so that memory is not shared between
cells: one untimed warm-up step, then ``repeats`` timed steps (min/median/max).

Memory is the **peak RSS increase** of that process: ``ru_maxrss`` (resource.getrusage, the
process's high-water mark) after the steps minus the RSS (/proc/self/statm) just before the
warm-up step, i.e. after the models, the reward and the optimiser were built. tracemalloc is
not used: it does not see torch's CPU tensor allocations.

    python -m bench.draft_k [--short] [--out FILE.json] [--size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from bench.common import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/ runs from here
KS = (1, 2, 4)
STEPS = 4
BATCH = 2


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_cell(k: int, checkpointing: bool, size: int, repeats: int, threads: int) -> dict:
    """One cell, in this process (the parent calls it through a subprocess)."""
    import torch

    torch.set_num_threads(threads)
    from rewards.registry import build_reward
    from rlhf.config import load_config
    from rlhf.draft import draft_step
    from rlhf.engine import PlainEngine
    from rlhf.generator import load_generator
    from rlhf.run_config import RunConfig

    # The quickstart's tiny policy (4 steps, LoRA rank 4), at this cell's K and size.
    policy = load_config(
        RunConfig,
        os.path.join(ROOT, "configs", "quickstart.yaml"),
        [
            f"policy.generator.gradient_checkpointing={str(checkpointing).lower()}",
            f"policy.sampler.height={size}",
            f"policy.sampler.width={size}",
            f"policy.draft.k={k}",
            "policy.engine.lr=1e-3",
        ],
    ).policy
    assert policy.sampler.steps == STEPS
    gen = load_generator(policy.generator, policy.finetune, "cpu")
    torch.manual_seed(0)
    reward = build_reward({"name": "ict_hp", "options": {"backbone": "tiny"}}).eval()
    reward.requires_grad_(False)
    engine = PlainEngine(gen.transformer, policy.engine)
    sampler, draft = policy.sampler, policy.draft
    prompts = ["a red cube on a table", "an astronaut riding a horse"][:BATCH]

    base = _rss_mib()
    times = []
    for step in range(repeats + 1):
        seeds = [2 * step, 2 * step + 1]
        t0 = time.perf_counter()
        draft_step(engine, gen, {"reward": (1.0, reward)}, prompts, seeds, sampler, draft, step)
        if step:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
    return {
        "k": k,
        "checkpointing": checkpointing,
        "step_s": stats(times),
        "peak_rss_increase_mib": _maxrss_mib() - base,
        "rss_before_mib": base,
        "trainable_params": sum(p.numel() for p in engine.params),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.draft_k", description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="3 timed steps per cell (default 10)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--cell", nargs=2, metavar=("K", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.short else 10)

    if args.cell:  # child: one cell, JSON on the last stdout line
        k, ckpt = int(args.cell[0]), args.cell[1] == "1"
        print(json.dumps(run_cell(k, ckpt, args.size, repeats, args.threads)))
        return {}

    cells = []
    # The short mode checks it runs: K = 1 with checkpointing, K = 2 without.
    grid = [(1, True), (2, False)] if args.short else [(k, c) for k in KS for c in (True, False)]
    for k, ckpt in grid:
        cmd = [sys.executable, "-m", "bench.draft_k", "--cell", str(k), "1" if ckpt else "0"]
        cmd += ["--size", str(args.size), "--threads", str(args.threads)]
        cmd += ["--repeats", str(repeats)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"cell K={k} checkpointing={ckpt} failed")
        cell = json.loads(proc.stdout.strip().splitlines()[-1])
        cells.append(cell)
        s = cell["step_s"]
        print(
            f"K={k} checkpointing={'on ' if ckpt else 'off'} "
            f"step {s['median']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f}, n={s['n']})"
            f"  peak RSS +{cell['peak_rss_increase_mib']:.1f} MiB",
            flush=True,
        )
    import torch

    result = {
        "benchmark": "draft_k",
        "command": "python -m bench.draft_k "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "model": "tiny SD3 (rlhf/model_configs/tiny_sd3), LoRA rank 4 on the joint attention",
            "sampling_steps": STEPS,
            "batch": BATCH,
            "image_size": args.size,
            "reward": "tiny ICT-HP (random open_clip towers)",
            "optimizer": "PlainEngine (torch AdamW), one process",
            "threads": args.threads,
            "repeats": repeats,
            "memory": "peak RSS increase: ru_maxrss after the steps minus RSS before the "
            "warm-up step, fresh process per cell",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "cells": cells,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
