"""The benchmark suite runs end to end in its short mode (the full mode is run by hand; its
figures are in BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def test_bench_entry_point_short_mode(tmp_path):
    env_out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--out", str(env_out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in env_out.glob("*.json")}
    assert set(results) == {"reward_server", "draft_k", "loop"}
    loop = results["loop"]["results"]
    assert loop["plain"]["ratio_vs_plain"] == 1.0
    assert loop["1w_colocated"]["step_s"]["n"] >= 2 and loop["1w_colocated"]["ratio_vs_plain"] > 0


def test_bench_rejects_an_unknown_suite():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown suite" in proc.stderr
