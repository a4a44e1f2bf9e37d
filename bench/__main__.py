"""The benchmark suite's one entry point.

    python -m bench                 # every suite in its short mode (what CI runs): it runs
    python -m bench --full          # every suite as measured in BENCHMARKS.md
    python -m bench loop reward_server --full --out results/

Each suite runs its sides in one process, one after the other, on the same tiny models,
batch and seeds, and writes ``<out>/<suite>.json`` with min/median/max and ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

# suite -> (module, extra arguments in full mode); every module takes --short and --out.
SUITES = {
    "reward_train": ("bench.reward_train", []),
    "reward_accuracy": ("bench.reward_accuracy", []),
    "reward_server": ("bench.reward_server", []),
    "draft_k": ("bench.draft_k", []),
    "loop": ("bench.loop", ["--repeats", "2"]),
}
# Not in the default list: world_finetune needs the rewards that reward_accuracy --save wrote.
SHORT_DEFAULT = ("reward_server", "draft_k", "loop")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="*", help=f"any of {list(SUITES)} (default: all)")
    p.add_argument("--full", action="store_true", help="the full sizes (minutes per suite)")
    p.add_argument("--out", default="bench_results", help="folder for the JSON results")
    a = p.parse_args(argv)
    unknown = [s for s in a.suites if s not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    names = a.suites or (list(SUITES) if a.full else list(SHORT_DEFAULT))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        module, full_args = SUITES[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"{name}: not available ({e})", file=sys.stderr)
            return 2
        t = time.perf_counter()
        path = out / f"{name}.json"
        mod.main([*(full_args if a.full else ["--short"]), "--out", str(path)])
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # each suite starts its own Ray, sized for it
        if not path.is_file():
            print(f"{name}: wrote no {path}", file=sys.stderr)
            return 1
        json.loads(path.read_text())  # valid JSON, or this raises
        print(f"== {name}: {time.perf_counter() - t:.0f}s -> {out / (name + '.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
