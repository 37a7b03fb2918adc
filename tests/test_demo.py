"""Learning test: the embedded demo's tiny model reaches >= 90% held-out exact match on addition."""

from __future__ import annotations

import json

from alignkit.demo import DemoConfig, run_demo


def test_demo_learns_addition(tmp_path):
    result = run_demo(DemoConfig(output_dir=str(tmp_path), progress=False))
    assert result["exact_match_before"] < 0.05
    assert result["exact_match_after"] >= 0.90, result
    assert (tmp_path / "curves.png").stat().st_size > 1000
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {"step", "loss", "lr", "grad_norm", "num_tokens", "num_trained_tokens", "step_time_s"}
    assert keys <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"] / 5
