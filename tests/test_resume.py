"""Exact resume: 20 steps straight == 10 steps, SIGKILL, resume to 20 (losses per step and final weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import reproducible_env

SCRIPT = r"""
import os, signal, sys
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.demo import make_rows
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.models import build_tiny_model, tiny_llama_config

run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
tok = byte_tokenizer()
model = build_tiny_model(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2), seed=0)
rows = [{"messages": r["messages"]} for r in make_rows(120, 2, seed=0)]

def kill(step, record):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash

cfg = SFTConfig(output_dir=run_dir, chat_format="chatml", max_steps=20, save_every=5, packing=True,
                pack_tokens=160, grad_accum=2, lr=3e-3, warmup_steps=3, progress=False, resume=resume,
                weight_decay=0.01, epochs=5)
train_sft(cfg, model=model, tokenizer=tok, train_data=rows, callbacks=[kill])
"""


def _run(run_dir: Path, kill_at: int, resume: bool) -> int:
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(run_dir), str(kill_at), "1" if resume else "0"],
        capture_output=True,
        text=True,
        timeout=600,
        env=reproducible_env(),
    )
    return p.returncode


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_sigkill_then_resume_is_exact(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _run(straight, kill_at=-1, resume=False) == 0
    rc = _run(crashed, kill_at=12, resume=False)
    assert rc == -9, "the process should have died by SIGKILL"
    assert (crashed / "latest").read_text().strip() == "checkpoint-10"
    assert max(_losses(crashed)) == 12  # steps 11-12 were logged, then lost with the crash
    assert _run(crashed, kill_at=-1, resume=True) == 0

    a, b = _losses(straight), _losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa = load_file(straight / "checkpoint-20" / "model.safetensors")
    wb = load_file(crashed / "checkpoint-20" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and training moved the weights at all (the comparison is not vacuous)
    w10 = load_file(crashed / "checkpoint-15" / "model.safetensors")
    assert any(not torch.equal(w10[k], wb[k]) for k in wb)
