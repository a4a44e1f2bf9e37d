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
