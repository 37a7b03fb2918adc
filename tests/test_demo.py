"""Learning test: the embedded demo's tiny model reaches >= 90% held-out exact match on addition."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.demo import DemoConfig, exact_match, make_rows


def test_demo_learns_addition(demo_run):
    result = demo_run["result"]
    assert result["exact_match_before"] < 0.05
    assert result["exact_match_after"] >= 0.90, result
    assert (demo_run["dir"] / "curves.png").stat().st_size > 1000
    records = [json.loads(x) for x in (demo_run["dir"] / "metrics.jsonl").read_text().splitlines()]
    keys = {"step", "loss", "lr", "grad_norm", "num_tokens", "num_trained_tokens", "step_time_s"}
    assert keys <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"] / 5


def test_checkpoint_is_a_plain_hf_folder(demo_run):
    """transformers loads the saved checkpoint on its own and it scores like the trained model."""
    ckpt = demo_run["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    cfg = DemoConfig()
    rows = make_rows(cfg.eval_size, cfg.digits, seed=cfg.seed + 1)
    assert abs(exact_match(model, tok, rows) - demo_run["result"]["exact_match_after"]) < 1e-9
