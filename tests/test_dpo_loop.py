"""The DPO loop: exact normalisers under accumulation/packing, loss options, CLI, exact resume, and learning."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit import demo
from alignkit.checkpoint import latest_checkpoint
from alignkit.cli import main as cli_main
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.loops.dpo import DPOConfig, train_dpo
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.templates import get_format
from tests.conftest import A, loop_config, preference_rows, reproducible_env

TOK = byte_tokenizer()
CONFIG = tiny_llama_config(len(TOK), hidden=16, layers=1, heads=2, kv_heads=2)
ROWS = preference_rows(16)


def _cfg(tmp_path: Path, name: str, **kw) -> DPOConfig:
    return loop_config(DPOConfig, tmp_path, name, **kw)


def _run(tmp_path: Path, name: str, **kw):
    model = build_tiny_model(CONFIG, seed=0)
    train_dpo(_cfg(tmp_path, name, **kw), model=model, tokenizer=TOK, train_data=ROWS)
    return model, read_metrics(tmp_path / name)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "packing": True},
        {"ld_alpha": 0.3, "wpo": True},
        {"loss": "cpo", "loss_type": ["simpo"]},
        {"loss": "orpo"},
    ],
)
def test_accumulated_micro_batches_equal_one_batch(tmp_path, options):
    """Step normalisers are global (pairs, chosen tokens): 2 micro-batches of 4 == 1 batch of 8, exactly."""
    m1, r1 = _run(tmp_path, "one", batch_size=8, grad_accum=1, **options)
    m2, r2 = _run(tmp_path, "two", batch_size=4, grad_accum=2, **options)
    for a, b in zip(r1, r2):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=2e-6)
        assert a["num_pairs"] == b["num_pairs"] == 8
    for (k, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=k)


def test_first_step_and_metrics(tmp_path):
    """Policy == reference at step 1: sigmoid DPO is exactly log 2 with zero rewards; metrics are logged."""
    _, recs = _run(tmp_path, "m", max_steps=3)
    first = recs[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/margins"]) < 1e-5
    keys = {"step", "loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins"}
    keys |= {"rewards/accuracies", "logps/chosen", "logps/rejected", "num_pairs", "num_tokens", "step_time_s"}
    assert keys <= set(first) and "n_pairs" not in first  # one name per quantity
    assert recs[-1]["rewards/margins"] > first["rewards/margins"]  # lr 1e-2 on 16 pairs: margins open at once
    # IPO at step 1: (0 − 1/(2β))² with β = 0.1 is 25
    _, ipo = _run(tmp_path, "ipo", max_steps=1, loss_type=["ipo"])
    assert ipo[0]["loss"] == pytest.approx(25.0, abs=1e-3)


def test_reference_choices_agree_at_the_start(tmp_path):
    """precomputed, an explicit model copy and TR-DPO all start from the same reference: same first two steps
    (TR-DPO syncing every step then departs at step 3)."""
    _, pre = _run(tmp_path, "pre", max_steps=3)
    _, mod = _run(tmp_path, "mod", max_steps=3, reference="model")
    _, tr = _run(tmp_path, "tr", max_steps=3, reference="tr_dpo", tr_dpo_sync_steps=1, tr_dpo_alpha=0.5)
    for a, b in zip(pre, mod):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert tr[0]["loss"] == pytest.approx(pre[0]["loss"], abs=1e-5)
    assert tr[1]["loss"] != pytest.approx(pre[1]["loss"], abs=1e-4)  # the reference moved toward the policy


def test_bad_config_is_refused(tmp_path):
    model = build_tiny_model(CONFIG, seed=0)
    with pytest.raises(ValueError, match="reference"):
        train_dpo(_cfg(tmp_path, "x", reference="nope"), model=model, tokenizer=TOK, train_data=ROWS)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        train_dpo(_cfg(tmp_path, "y", loss_type=["sigmoidd"]), model=model, tokenizer=TOK, train_data=ROWS)


def test_cli_runs_dpo_from_files(tmp_path):
    model_dir = tmp_path / "model"
    build_tiny_model(CONFIG, seed=0).save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    args = [f"model={model_dir}", f"dataset={data}", f"output_dir={out}", "chat_format=chatml", "batch_size=8"]
    args += ["max_steps=2", "loss_type=sigmoid,sft", "progress=false", f"reference_cache_dir={tmp_path / 'c'}"]
    assert cli_main(["dpo", *args]) == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2] and "loss/sft" in recs[0]
    assert (out / "checkpoint-2" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL
# ---------------------------------------------------------------------------------------------------------

SCRIPT = r"""
import os, signal, sys
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.loops.dpo import DPOConfig, train_dpo
from alignkit.models import build_tiny_model, tiny_llama_config

run_dir, kill_at, resume, reference = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
tok = byte_tokenizer()
model = build_tiny_model(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2), seed=0)
U = lambda s: {"role": "user", "content": s}
A = lambda s: {"role": "assistant", "content": s}
rows = [{"prompt": [U(f"{a}+{b}")], "chosen": [A(str(a + b))], "rejected": [A(str(a + b + 1))]}
        for a in range(6) for b in range(5)]

def kill(step, record):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash

cfg = DPOConfig(output_dir=run_dir, chat_format="chatml", max_steps=12, epochs=4, save_every=4, batch_size=4,
                grad_accum=2, lr=3e-3, warmup_steps=2, schedule="cosine", weight_decay=0.01, progress=False,
                resume=resume, reference=reference, tr_dpo_sync_steps=3,
                reference_cache_dir=os.path.join(run_dir, "..", "cache"))
train_dpo(cfg, model=model, tokenizer=tok, train_data=rows, callbacks=[kill])
"""


def _script(run_dir: Path, kill_at: int, resume: bool, reference: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", SCRIPT, str(run_dir), str(kill_at), "1" if resume else "0", reference]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=reproducible_env())


@pytest.mark.parametrize("reference", ["precomputed", "tr_dpo"])
def test_sigkill_then_resume_is_exact(tmp_path, reference):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _script(straight, -1, False, reference).returncode == 0
    assert _script(crashed, 7, False, reference).returncode == -9, "the process should have died by SIGKILL"
    assert (crashed / "latest").read_text().strip() == "checkpoint-4"
    resumed = _script(crashed, -1, True, reference)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if reference == "precomputed":  # the resumed run reuses the cached table: no reference pass
        assert "'cache_hit': True" in resumed.stdout and "'forward_passes': 0" in resumed.stdout

    def losses(d: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(d)}

    a, b = losses(straight), losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa = load_file(straight / "checkpoint-12" / "model.safetensors")
    wb = load_file(crashed / "checkpoint-12" / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    w8 = load_file(crashed / "checkpoint-8" / "model.safetensors")
    assert any(not torch.equal(w8[k], wb[k]) for k in wb)  # training moved the weights: not vacuous


# ---------------------------------------------------------------------------------------------------------
# Learning: DPO on the demo task widens margins and raises held-out exact match
# ---------------------------------------------------------------------------------------------------------


def off_by_one_digit(answer: int, rng: random.Random) -> str:
    """A wrong answer one digit away from the right one (no leading zero)."""
    s = str(answer)
    pos = rng.randrange(len(s))
    for new in rng.sample([(int(s[pos]) + 1) % 10, (int(s[pos]) - 1) % 10], 2):
        t = s[:pos] + str(new) + s[pos + 1 :]
        if len(t) == 1 or t[0] != "0":
            return t
    return str(answer + 1)


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], batch_size: int = 200) -> list[str]:
    """Greedy answers to each row's prompt, decoded as `alignkit.demo.exact_match` decodes them."""
    fmt, end = get_format(demo.FORMAT), tokenizer.convert_tokens_to_ids("<|im_end|>")
    was_training = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(rows), batch_size):
        enc = [
            tokenizer(fmt.render(r["messages"][:1], add_generation_prompt=True).text, add_special_tokens=False)[
                "input_ids"
            ]
            for r in rows[i : i + batch_size]
        ]
        width, pad = max(map(len, enc)), tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=end, pad_token_id=pad
        )
        for seq in gen[:, width:].tolist():
            out.append(tokenizer.decode(seq[: seq.index(end)] if end in seq else seq))
    model.train(was_training)
    return out


def weak_demo(tmp_path_factory) -> dict:
    """The demo's SFT stopped early (`WEAK_STEPS` steps instead of the default): the full demo ends near 100%
    held-out exact match, which leaves nothing for preference training to show, while this start answers about
    70% of held-out problems. Built once per test session (cached under the session's base temp dir)."""
    out = tmp_path_factory.getbasetemp() / "weak_demo"
    if not (out / "demo_result.json").is_file():
        demo.run_demo(demo.DemoConfig(output_dir=str(out), steps=WEAK_STEPS, grpo_steps=0, progress=False))
    model = AutoModelForCausalLM.from_pretrained(latest_checkpoint(out))
    tok = AutoTokenizer.from_pretrained(latest_checkpoint(out))
    cfg = demo.DemoConfig()
    held_out = demo.make_rows(cfg.eval_size, cfg.digits, seed=cfg.seed + 1)
    train = demo.make_rows(cfg.train_size, cfg.digits, seed=cfg.seed, exclude={tuple(r["pair"]) for r in held_out})
    return {"model": model, "tokenizer": tok, "train": train, "held_out": held_out}


WEAK_STEPS = 140


def preference_pairs(rows: list[dict], answers: list[str], seed: int) -> list[dict]:
    """chosen = the right answer; rejected = the model's own greedy answer when it is wrong, else an answer one
    digit away from the right one."""
    rng = random.Random(seed)
    pairs = []
    for r, a in zip(rows, answers):
        right = r["messages"][1]["content"]
        wrong = a if a and a != right else off_by_one_digit(int(right), rng)
        pairs.append({"prompt": r["messages"][:1], "chosen": r["messages"][1:], "rejected": [A(wrong)]})
    return pairs


@pytest.fixture(scope="module")
def weak_start(tmp_path_factory) -> dict:
    return weak_demo(tmp_path_factory)


@pytest.mark.slow
def test_dpo_widens_margins_and_raises_held_out_exact_match(weak_start, tmp_path):
    """DPO with the NLL term on chosen answers (loss_type ["sigmoid", "sft"], TRL's rpo_alpha=1) from the weak
    demo start: reward margins on held-out pairs open up and held-out exact match rises.

    Pure sigmoid DPO widens the margins too, but in our runs on this task it lowered greedy accuracy: chosen and
    rejected answers differ in one digit, and DPO lowers the chosen log-prob along with the rejected one
    (likelihood displacement); the NLL term keeps the chosen answers likely.
    """
    model, tok = weak_start["model"], weak_start["tokenizer"]
    held_out, train = weak_start["held_out"], weak_start["train"]
    before = demo.exact_match(model, tok, held_out)
    # a start with room to improve and some skill to sharpen; if the demo recipe changes, retune WEAK_STEPS
    assert 0.3 <= before <= 0.92, f"weak demo start at {before:.1%} exact match: retune WEAK_STEPS"
    answers = greedy_answers(model, tok, train)
    pairs = preference_pairs(train, answers, seed=0)
    held_pairs = preference_pairs(held_out, greedy_answers(model, tok, held_out), seed=1)
    cfg = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        chat_format=demo.FORMAT,
        loss_type=["sigmoid", "sft"],
        beta=0.1,
        lr=1e-4,
        batch_size=32,
        max_steps=40,
        warmup_steps=5,
        schedule="constant",
        eval_every=40,
        reference_cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    train_dpo(cfg, model=model, tokenizer=tok, train_data=pairs, eval_data=held_pairs)
    recs = read_metrics(tmp_path / "dpo")
    after = demo.exact_match(model, tok, held_out)
    print(f"held-out exact match {before:.1%} -> {after:.1%}")
    assert after >= before + 0.05, (before, after)
    assert recs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    late = recs[-10:]
    assert sum(r["rewards/margins"] for r in late) / len(late) > 0.1
    assert recs[-1]["eval_rewards/margins"] > 0.1 and recs[-1]["eval_rewards/accuracies"] > 0.8
