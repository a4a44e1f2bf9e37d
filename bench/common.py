"""What every benchmark module shares: summary statistics and writing its result."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def stats(xs: list[float]) -> dict:
    """``min``, ``median``, ``max`` and ``n`` of a list of measurements."""
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def emit(result: dict, out: str | None) -> int:
    """Print ``result`` as JSON and also write it to ``out`` when given; exit status 0."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text)
    print(text)
    return 0


def world_main(run, doc: str, argv=None) -> int:
    """The command line of a world probe ``run(world, prompts)``: ``--world DIR`` (default:
    the shipped world), ``--prompts N`` held-out prompts (default 240), ``--out FILE.json``."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--world", default=None, help="a built world (default: the shipped one)")
    p.add_argument("--prompts", type=int, default=240, help="held-out prompts (default: 240)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.world, a.prompts), a.out)
