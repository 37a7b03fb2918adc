"""`alignkit sweep`: which overrides are swept, grid and random trials, and a 2x2 grid on a tiny SFT task that is
killed after its first trial, resumed (the finished trial skipped), and summarised in a table and one plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.loops.sft import SFTConfig
from alignkit.sweep import split_sweep_overrides, trials


def test_which_overrides_are_swept():
    fixed, swept = split_sweep_overrides(SFTConfig, ["lr=1e-5,3e-5", "lora_targets=q_proj,v_proj", "max_steps=4"])
    assert swept == {"lr": ["1e-5", "3e-5"]} and fixed == ["lora_targets=q_proj,v_proj", "max_steps=4"]


def test_grid_and_random_trials():
    grid = trials({"parameters": {"lr": [1, 2], "beta": [0.1, 0.2, 0.3]}})
    assert len(grid) == 6 and {"lr": 2, "beta": 0.3} in grid
    spec = {"method": "random", "n": 50, "seed": 3, "parameters": {"lr": {"min": 1e-6, "max": 1e-3, "log": True},
                                                                   "loss": ["nll", "dft"]}}  # fmt: skip
    draws = trials(spec)
    assert draws == trials(spec) and len(draws) == 50  # seeded
    assert all(1e-6 <= d["lr"] <= 1e-3 for d in draws) and {d["loss"] for d in draws} == {"nll", "dft"}
    assert sum(d["lr"] < 10**-4.5 for d in draws) > 10  # log-uniform: the lower decades are drawn too
    with pytest.raises(ValueError, match="grid, random or tpe"):
        trials({"method": "bayes", "parameters": {"lr": [1]}})


def _setup(tmp_path: Path) -> list[str]:
    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.demo import make_rows
    from alignkit.models import build_tiny_model, tiny_llama_config

    tok = byte_tokenizer()
    model = build_tiny_model(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"messages": r["messages"]} for r in make_rows(64, 2, 0)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [f"model={tmp_path / 'm'}", f"dataset={tmp_path / 'd.jsonl'}", "chat_format=chatml", "max_steps=3"]
    return ["sweep", "sft", "--out", str(tmp_path / "sweep"), *data, "packing=false", "lr=1e-3,3e-3", "batch_size=4,8"]


def test_grid_sweep_resumes_after_a_kill_and_summarises(tmp_path):
    argv = [sys.executable, "-m", "alignkit", *_setup(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sweep"
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ((out / "trial-0" / "final_model").exists() and (out / "trial-1").exists()):
            assert first.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and its running trial
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    trial0 = (out / "trial-0" / "metrics.jsonl").read_text()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial-0 {'lr': '1e-3', 'batch_size': '4'}: finished before, skipped" in again.stderr
    assert (out / "trial-0" / "metrics.jsonl").read_text() == trial0  # not run again
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["lr"], r["batch_size"]) for r in rows] == [("1e-3", "4"), ("1e-3", "8"), ("3e-3", "4"), ("3e-3", "8")]
    assert all(r["state"] == "finished" and r["steps"] == 3 and r["final_loss"] > 0 for r in rows)
    assert all(r["best_loss"] <= r["final_loss"] for r in rows)
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| trial | lr | batch_size | state | steps | final_loss | best_loss") and len(table) == 6
    assert (out / "comparison.png").stat().st_size > 1000
    assert again.stdout.startswith("| trial | lr |")  # the table is printed


def test_a_bad_trial_value_is_refused_before_any_trial_runs(tmp_path, capsys):
    from alignkit.cli import main

    argv = _setup(tmp_path)
    assert main([*argv[:-1], "schedule=cosine,exp"]) == 2
    assert "schedule" in capsys.readouterr().err and not (tmp_path / "sweep" / "trial-0").exists()


def test_tpe_sweep_asks_from_results_and_resumes(tmp_path):
    """Optuna TPE: 4 trials (2 random, then 2 from the TPE model of the results), told their final loss; a rerun
    with a larger n replays the 4 (skipped, told again) and asks only the 5th."""
    pytest.importorskip("optuna", reason="the sweeps extra (pip install 'alignkit[sweeps]')")
    import yaml

    argv = _setup(tmp_path)[:-2]  # no grid overrides: the sweep file holds the parameters
    spec = {"method": "tpe", "n": 4, "startup": 2, "seed": 1,
            "parameters": {"lr": {"min": 1e-4, "max": 1e-2, "log": True}, "batch_size": [4, 8]}}  # fmt: skip
    (tmp_path / "tpe.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "alignkit", *argv, "--sweep", str(tmp_path / "tpe.yaml")]
    first = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "sweep"
    rows = json.loads((out / "summary.json").read_text())
    assert len(rows) == 4 and all(r["state"] == "finished" for r in rows)
    assert all(1e-4 <= r["lr"] <= 1e-2 and r["batch_size"] in (4, 8) for r in rows)
    assert all(r["objective_loss"] == r["final_loss"] for r in rows)  # what the sampler was told
    assert len({r["lr"] for r in rows}) == 4  # four different points
    spec["n"] = 5
    (tmp_path / "tpe.yaml").write_text(yaml.safe_dump(spec))
    again = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished before, skipped") == 4
    rows2 = json.loads((out / "summary.json").read_text())
    assert [r["lr"] for r in rows2[:4]] == [r["lr"] for r in rows] and len(rows2) == 5
    assert rows2[4]["state"] == "finished"
