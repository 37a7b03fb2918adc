"""The GPU benchmark (``benchmarks/gpu_throughput.py``, run by ``benchmarks/gpu_check.sh`` on a GPU machine) on the
CPU with tiny shapes: every loop runs on both sides (alignkit and TRL 1.16) and the ratios are printed, so the
script a GPU session will run once has run end to end. In the TRL stage (it needs trl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_throughput_runs_every_loop_on_both_sides_on_the_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "benchmarks/gpu_throughput.py", "--shape", "tiny", "--device", "cpu", "--steps", "3",
           "--timeout", "240"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("SUMMARY "))[8:])
    assert {(r["loop"], r["impl"]) for r in summary} == {
        (x, y) for x in ("sft", "dpo", "grpo") for y in ("alignkit", "trl")
    }
    for r in summary:
        assert r["throughput"] > 0 and r["timed_steps"] >= 1, r
    by = {(r["loop"], r["impl"]): r for r in summary}
    assert by["dpo", "alignkit"]["per_step"] == by["dpo", "trl"]["per_step"] == 8  # the same pairs per step
    assert by["grpo", "alignkit"]["per_step"] == by["grpo", "trl"]["per_step"] == 64  # the same completions
    for loop in ("sft", "dpo", "grpo"):
        assert f"{loop}: alignkit " in p.stdout and "x TRL's throughput" in p.stdout
