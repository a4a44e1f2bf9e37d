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


def world_main(run, doc: str, argv=None, samples_help: str = "held-out prompts", **options) -> int:
    """The command line of a world probe ``run(world, prompts, **options)``: ``--world DIR``
    (default: the shipped world), ``--prompts N`` (default 240; ``samples_help`` says what they
    count), ``--out FILE.json``, and per keyword ``name=(type, default, help)`` an option
    ``--name`` handed to ``run`` by that name."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--world", default=None, help="a built world (default: the shipped one)")
    p.add_argument("--prompts", type=int, default=240, help=f"{samples_help} (default: 240)")
    for name, (kind, default, help_) in options.items():
        p.add_argument(f"--{name}", type=kind, default=default, help=help_)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    return emit(run(a.world, a.prompts, **{k: getattr(a, k) for k in options}), a.out)
