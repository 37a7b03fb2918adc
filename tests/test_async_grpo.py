"""Async GRPO (alignkit.rollout.async_rollout): rollout worker processes, staleness, faults, learning."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError, build_config
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.loops.grpo import GRPOConfig, train_grpo
from alignkit.metrics import read_metrics
from alignkit.rollout.async_rollout import RolloutWorkerError
from tests.rl_support import PROMPT_ROWS, even_first, tiny_policy

TOK = byte_tokenizer()
ROWS = PROMPT_ROWS


def _model():
    return tiny_policy(TOK)


def _cfg(out: Path, steps: int, **kw) -> GRPOConfig:
    base = dict(output_dir=str(out), group_size=4, prompts_per_step=4, max_new_tokens=4, max_steps=steps, lr=3e-2,
                micro_batch_size=16, progress=False, log_completions_every=1, log_completions_n=16)  # fmt: skip
    return build_config(GRPOConfig, {**base, **kw})


def _rollout_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("alignkit-rollout")]


def _completions(run: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ln in (run / "completions.jsonl").read_text().splitlines():
        r = json.loads(ln)
        out.setdefault(r["step"], []).append(r["completion"])
    return out


def test_staleness_zero_is_the_synchronous_run(tmp_path):
    """max_staleness=0: each round is generated in the worker with the weights of the step before it, so the
    samples are the synchronous run's, token for token, and so are the per-step losses and the final weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker runs one thread: the same kernels, the same numbers
    try:
        sync = _model()
        train_grpo(_cfg(tmp_path / "sync", 4), model=sync, tokenizer=TOK, train_data=ROWS, reward_funcs=[even_first])
    finally:
        torch.set_num_threads(threads)
    asyn = _model()
    out = train_grpo(_cfg(tmp_path / "async", 4, async_rollout=True, max_staleness=0, worker_threads=1), model=asyn,
                     tokenizer=TOK, train_data=ROWS, reward_funcs=[even_first])  # fmt: skip
    assert _completions(tmp_path / "sync") == _completions(tmp_path / "async")  # every sample of every step
    a, s = read_metrics(tmp_path / "async"), read_metrics(tmp_path / "sync")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in s], rel=1e-6, abs=1e-9)
    assert [r["reward"] for r in a] == [r["reward"] for r in s]
    for p, q in zip(sync.parameters(), asyn.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(r["async/staleness"] == 0 and r["async/dropped_rounds"] == 0 for r in a)
    assert [e["generated"] for e in out["async_rounds"]] == [0, 1, 2, 3]
    assert _rollout_children() == []  # the workers are gone


def test_a_slow_trainer_drops_stale_rounds_by_the_rule(tmp_path):
    """Workers run ahead (queue_size=4) while the trainer sleeps each step: rounds more than max_staleness=1
    versions old when their turn comes are dropped, counted and generated again; none is trained on."""
    slow = [lambda step, rec: time.sleep(0.4)]
    out = train_grpo(_cfg(tmp_path / "run", 6, async_rollout=True, max_staleness=1, queue_size=4), model=_model(),
                     tokenizer=TOK, train_data=ROWS, reward_funcs=[even_first], callbacks=slow)  # fmt: skip
    events = out["async_rounds"]
    used = [e for e in events if not e["dropped"]]
    dropped = [e for e in events if e["dropped"]]
    assert [e["round"] for e in used] == list(range(6))  # every round trained on once, in order
    assert all(e["consumed"] - e["generated"] <= 1 for e in used)  # none beyond max_staleness
    assert all(e["consumed"] - e["generated"] > 1 for e in dropped) and dropped  # and the rule made drops
    recs = read_metrics(tmp_path / "run")
    assert recs[-1]["async/dropped_rounds"] == len(dropped)
    assert recs[-1]["async/dropped_samples"] == len(dropped) * 4 * 4
    assert max(r["async/staleness"] for r in recs) <= 1
    # the depth asked for ahead came down after the drops: no further round is asked too far ahead
    assert recs[0]["async/depth"] == 4 and recs[-1]["async/depth"] <= 2


def test_resume_starts_new_workers_from_the_checkpoint(tmp_path):
    """A resumed async run drops no saved queue (there is none): new workers start from the resumed weights, so
    its first round is sampled at the checkpoint's version."""
    run = tmp_path / "run"
    train_grpo(_cfg(run, 2, async_rollout=True), model=_model(), tokenizer=TOK, train_data=ROWS,
               reward_funcs=[even_first])  # fmt: skip
    out = train_grpo(_cfg(run, 4, async_rollout=True, resume=True, allow_config_change=["max_steps"]), model=_model(),
                     tokenizer=TOK, train_data=ROWS, reward_funcs=[even_first])  # fmt: skip
    assert out["async_rounds"][0] == {"round": 2, "generated": 2, "consumed": 2, "dropped": False}
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert _rollout_children() == []


def test_a_killed_worker_is_restarted(tmp_path):
    killed = []

    def kill(step, rec):
        if step == 2 and not killed:
            [worker] = _rollout_children()
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(worker.pid)

    cfg = _cfg(tmp_path / "run", 5, async_rollout=True, max_staleness=1)
    t0 = time.monotonic()
    train_grpo(cfg, model=_model(), tokenizer=TOK, train_data=ROWS, reward_funcs=[even_first], callbacks=[kill])
    recs = read_metrics(tmp_path / "run")
    assert killed and recs[-1]["async/worker_restarts"] == 1 and len(recs) == 5
    assert time.monotonic() - t0 < 120
    assert _rollout_children() == []


def test_a_worker_that_keeps_dying_stops_the_run_naming_it(tmp_path):
    def kill(step, rec):
        for worker in _rollout_children():
            os.kill(worker.pid, signal.SIGKILL)

    cfg = _cfg(tmp_path / "run", 5, async_rollout=True, max_staleness=0, max_worker_restarts=0)
    with pytest.raises(RolloutWorkerError, match=r"rollout worker 0 \(pid \d+\) exited with code -9"):
        train_grpo(cfg, model=_model(), tokenizer=TOK, train_data=ROWS, reward_funcs=[even_first], callbacks=[kill])
    assert _rollout_children() == []


def test_a_killed_trainer_leaves_no_worker(tmp_path):
    """SIGKILL the trainer (no cleanup runs in it): its worker notices its parent is gone and exits."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(f"""
        import multiprocessing, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests.rl_support import even_first
        from tests.test_async_grpo import ROWS, TOK, _cfg, _model
        from alignkit.loops.grpo import train_grpo

        def report(step, rec):
            if step == 1:
                print("WORKERS", *[p.pid for p in multiprocessing.active_children()], flush=True)
                time.sleep(600)

        if __name__ == "__main__":
            train_grpo(_cfg({str(tmp_path / "run")!r}, 5, async_rollout=True), model=_model(), tokenizer=TOK,
                       train_data=ROWS, reward_funcs=[even_first], callbacks=[report])
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("WORKERS"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the trainer ended before reporting its workers"
            assert time.monotonic() < deadline
        pids = [int(x) for x in line.split()[1:]]
        assert pids
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
            assert time.monotonic() < deadline, "a rollout worker outlived its trainer"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"


def test_async_settings_are_checked():
    with pytest.raises(ConfigError, match="backend"):
        build_config(GRPOConfig, {"async_rollout": True, "backend": "vllm_colocate"})
    with pytest.raises(ConfigError, match="lora_r"):
        build_config(GRPOConfig, {"async_rollout": True, "lora_r": 8})
    with pytest.raises(ValueError, match="module-level"):
        train_grpo(_cfg(Path("/tmp/unused-async"), 1, async_rollout=True, overwrite=True), model=_model(),
                   tokenizer=TOK, train_data=ROWS, reward_funcs=[lambda p, c, ids, **k: [0.0] * len(c)])  # fmt: skip
    assert _rollout_children() == []


@pytest.mark.slow
def test_async_grpo_learns_the_demo_task_like_sync(demo_run, tmp_path):
    """The demo's GRPO stage run async (max_staleness=1) from the same SFT model: its held-out sampled reward
    rises like the synchronous stage's (the demo fixture's own GRPO stage)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.demo import FORMAT, DemoConfig, make_rows
    from alignkit.loops.grpo import evaluate_rewards

    res = demo_run["result"]
    if "grpo_reward_after" not in res:
        pytest.skip("the demo fixture ran without its GRPO stage")
    demo = DemoConfig()
    model = AutoModelForCausalLM.from_pretrained(demo_run["checkpoint"])
    tok = AutoTokenizer.from_pretrained(demo_run["checkpoint"])
    eval_rows = make_rows(demo.eval_size, demo.digits, seed=demo.seed + 1)
    train_rows = make_rows(demo.train_size, demo.digits, seed=demo.seed, exclude={tuple(r["pair"]) for r in eval_rows})

    def prompts(rows):
        return [{"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in rows]

    cfg = GRPOConfig(output_dir=str(tmp_path / "grpo"), chat_format=FORMAT, rewards=["math_answer"], group_size=8,
                     prompts_per_step=16, max_new_tokens=8, temperature=demo.grpo_temperature, micro_batch_size=128,
                     max_steps=demo.grpo_steps, lr=demo.grpo_lr, seed=demo.seed, progress=False, async_rollout=True,
                     max_staleness=1)  # fmt: skip
    out = train_grpo(cfg, model=model, tokenizer=tok, train_data=prompts(train_rows))
    kw = dict(n=4, temperature=demo.grpo_temperature, max_new_tokens=8, chat_format=FORMAT, seed=demo.seed)
    after = evaluate_rewards(model, tok, prompts(eval_rows), ["math_answer"], **kw)["reward"]
    # 800 scored samples: the mean's std is about 0.016; the synchronous stage rose by well over 0.1
    assert after > res["grpo_reward_after"] - 0.05, (after, res)
    assert any(e["consumed"] > e["generated"] for e in out["async_rounds"])  # it did run one step off
