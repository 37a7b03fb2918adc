"""The distillation loop (``alignkit.loops.distill``): learning, vocabularies, completion sources, a vLLM-server
teacher (a fake in-process server), exact resume, and two ranks equal to one process.

Learning: a teacher trained on the demo task (as ``alignkit.demo`` does) is distilled on-policy (``lmbda=1``) into a
fresh, smaller student; it must reach >= 90% held-out exact match. SFT of the same student on the same rows with the
same step budget, schedule and rows per step is measured beside it (both evaluated every 10 steps) and the two step
counts are reported; on this task distillation is not faster in steps than SFT: at the best learning rate of each
they tie (recorded, not asserted)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.demo import exact_match, make_rows
from alignkit.loops.distill import DistillConfig, check_same_tokenizer, distill_items, step_source, train_distill
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.losses.distill import generalized_jsd_loss
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.rollout import HFGenerator

ROOT = Path(__file__).resolve().parents[1]
TOK = byte_tokenizer()
END = TOK.convert_tokens_to_ids("<|im_end|>")


def tiny(hidden: int = 32, layers: int = 2, seed: int = 0, vocab: int | None = None) -> torch.nn.Module:
    cfg = tiny_llama_config(vocab or len(TOK), hidden=hidden, layers=layers, heads=4, kv_heads=4)
    cfg.eos_token_id, cfg.pad_token_id = END, TOK.pad_token_id
    return build_tiny_model(cfg, seed=seed)


def chat_rows(n: int, digits: int = 2, seed: int = 0) -> list[dict]:
    return [{"messages": r["messages"]} for r in make_rows(n, digits, seed=seed)]


def config(tmp_path: Path, name: str, **kw) -> DistillConfig:
    base = dict(output_dir=str(tmp_path / name), chat_format="chatml", batch_size=8, micro_batch_size=4,
                max_new_tokens=6, max_steps=3, lr=1e-2, progress=False, keep_last=5)  # fmt: skip
    return DistillConfig(**{**base, **kw})


def records(cfg: DistillConfig, **kw) -> list[dict]:
    out: list[dict] = []
    train_distill(cfg, tokenizer=TOK, callbacks=[lambda s, r: out.append(dict(r))], **kw)
    return out


# ---------------------------------------------------------------------------------------------------------------
# learning: on-policy distillation vs SFT
# ---------------------------------------------------------------------------------------------------------------

BUDGET, EVERY, THRESHOLD = 300, 10, 0.9
# the best of lr 1e-3 / 1.5e-3 / 2e-3 / 3e-3 / 6e-3 for both (measured: 90 steps each at 1.5e-3)
SCHEDULE = dict(lr=1.5e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.05, weight_decay=0.01, max_steps=BUDGET)


class Reached(Exception):
    """Raised by the evaluation callback once the threshold is met (the rest of the budget is not needed)."""


def evaluator(model: torch.nn.Module, eval_rows: list[dict], curve: list[tuple[int, float]]):  # noqa: ANN201
    def cb(step: int, record: dict) -> None:
        if step % EVERY == 0:
            curve.append((step, exact_match(model, TOK, eval_rows)))
            if curve[-1][1] >= THRESHOLD:
                raise Reached

    return cb


@pytest.fixture(scope="module")
def demo_task(tmp_path_factory) -> dict:
    """The demo's split (800 training problems, 200 held out) and a teacher SFT'd on it the way the demo does
    (hidden 128, 4 layers; 250 steps instead of 400)."""
    out = tmp_path_factory.mktemp("teacher")
    eval_rows = make_rows(200, 3, seed=1)
    held = {tuple(r["pair"]) for r in eval_rows}
    train = [{"messages": r["messages"]} for r in make_rows(800, 3, seed=0, exclude=held)]
    teacher = tiny(hidden=128, layers=4)
    cfg = SFTConfig(output_dir=str(out), chat_format="chatml", packing=True, pack_tokens=64 * 24, max_length=128,
                    epochs=100, max_steps=250, lr=2e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.05,
                    weight_decay=0.01, adam_beta2=0.95, progress=False, log_every=1000, keep_last=1)  # fmt: skip
    train_sft(cfg, model=teacher, tokenizer=TOK, train_data=train)
    return {"teacher": teacher, "train": train, "eval": eval_rows, "acc": exact_match(teacher, TOK, eval_rows)}


def test_on_policy_distillation_reaches_90_percent(demo_task, tmp_path):
    """Distillation must reach the threshold within the budget; SFT of the same student shape on the same rows is run
    beside it and both step counts are printed (and written to ``comparison.json``). On this task distillation is
    not faster in steps than SFT (both reach 90% at about step 90 at their best settings), so that is recorded, not
    asserted."""
    assert demo_task["acc"] >= 0.95, demo_task["acc"]
    curves: dict[str, list[tuple[int, float]]] = {"distill": [], "sft": []}
    student = tiny(hidden=128, layers=2)  # half the teacher's depth, fresh weights
    # temperature 0.5 (sampling and both distributions): of 0.3 / 0.5 / 1.0 the fastest (T=1 needs ~2x the steps)
    cfg = config(tmp_path, "distill", lmbda=1.0, beta=0.0, temperature=0.5, batch_size=64, micro_batch_size=64,
                 max_new_tokens=5, log_every=1000, keep_last=1, **SCHEDULE)  # fmt: skip
    on_distill = evaluator(student, demo_task["eval"], curves["distill"])
    with pytest.raises(Reached):
        train_distill(cfg, model=student, tokenizer=TOK, teacher=demo_task["teacher"], teacher_tokenizer=TOK,
                      train_data=demo_task["train"], callbacks=[on_distill])  # fmt: skip
    # SFT: a fresh student of the same shape, the same rows, rows per step (64, no packing), budget and schedule
    student = tiny(hidden=128, layers=2)
    sft = SFTConfig(output_dir=str(tmp_path / "sft"), chat_format="chatml", packing=False, batch_size=64, epochs=100,
                    max_length=128, progress=False, log_every=1000, keep_last=1, **SCHEDULE)  # fmt: skip
    try:
        train_sft(sft, model=student, tokenizer=TOK, train_data=demo_task["train"],
                  callbacks=[evaluator(student, demo_task["eval"], curves["sft"])])  # fmt: skip
    except Reached:
        pass
    first = {k: next((s for s, a in c if a >= THRESHOLD), None) for k, c in curves.items()}
    result = {"teacher_exact_match": demo_task["acc"], "steps_to_90": first, "curves": curves}
    (tmp_path / "comparison.json").write_text(json.dumps(result))
    print(f"\n[distill vs sft] {json.dumps(result)}")
    assert first["distill"] is not None, curves
    assert curves["distill"][-1][1] >= THRESHOLD


# ---------------------------------------------------------------------------------------------------------------
# vocabularies and tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_different_tokenizers_are_refused(tmp_path):
    other = byte_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(TOK, other)
    check_same_tokenizer(TOK, byte_tokenizer())  # the same tokenizer passes
    with pytest.raises(ValueError, match="tokenizers differ.*cross-tokenizer"):
        train_distill(config(tmp_path, "tok"), model=tiny(), tokenizer=TOK, teacher=tiny(seed=1),
                      teacher_tokenizer=other, train_data=chat_rows(16))  # fmt: skip


def padded(model: torch.nn.Module, width: int) -> torch.nn.Module:
    """``model`` with embedding and head padded to ``width`` rows (random extra rows, as a padded checkpoint)."""
    m = copy.deepcopy(model)
    m.resize_token_embeddings(width, mean_resizing=False)
    with torch.no_grad():
        m.get_output_embeddings().weight[len(TOK) :].normal_(0, 5.0)  # loud rows: they must not enter the loss
    return m


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_padded_teacher_head_gives_the_same_loss(tmp_path, beta):
    teacher = tiny(hidden=48, seed=3)
    runs = {}
    for name, t in (("plain", teacher), ("padded", padded(teacher, 320))):
        assert t.get_output_embeddings().weight.shape[0] == (len(TOK) if name == "plain" else 320)
        runs[name] = records(config(tmp_path, f"{name}-{beta}", lmbda=0.0, beta=beta, max_steps=2), model=tiny(),
                             teacher=t, teacher_tokenizer=TOK, train_data=chat_rows(16))  # fmt: skip
    for a, b in zip(runs["plain"], runs["padded"]):
        for k in ("loss", "distill/divergence_mean", "distill/teacher_entropy", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    # and a padded student against an unpadded teacher
    out = records(config(tmp_path, f"student-{beta}", lmbda=0.0, beta=beta, max_steps=1), model=padded(tiny(), 300),
                  teacher=teacher, teacher_tokenizer=TOK, train_data=chat_rows(16))  # fmt: skip
    assert abs(out[0]["loss"] - runs["plain"][0]["loss"]) <= 1e-5 * max(1.0, runs["plain"][0]["loss"])


# ---------------------------------------------------------------------------------------------------------------
# completion sources
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lmbda", "seq_kd"), [(0.0, False), (0.0, True), (1.0, False)])
def test_each_source_trains_and_lowers_the_loss(tmp_path, lmbda, seq_kd):
    cfg = config(tmp_path, f"src-{lmbda}-{seq_kd}", lmbda=lmbda, seq_kd=seq_kd, max_steps=12, batch_size=8,
                 lr=1e-2, temperature=0.7, beta=0.5)  # fmt: skip
    rows = chat_rows(8)  # every step sees the same 8 prompts: the loss must go down
    out = records(cfg, model=tiny(), teacher=tiny(hidden=48, seed=5), teacher_tokenizer=TOK, train_data=rows)
    assert [r["step"] for r in out] == list(range(1, 13))
    want = "student" if lmbda == 1 else "teacher" if seq_kd else "dataset"
    assert {step_source(cfg, s) for s in range(12)} == {want}
    assert all(r["on_policy"] == float(lmbda == 1) and r["teacher_generated"] == float(seq_kd) for r in out)
    assert all(r["gen_time_s"] > 0 for r in out) == (want != "dataset")
    for k in ("distill/divergence_mean", "distill/student_entropy", "distill/top1_agreement", "tokens_per_s"):
        assert k in out[-1]
    if want == "dataset":  # the dataset's completions: the answer digits and the end token
        assert all(r["num_completion_tokens"] == sum(len(x["messages"][1]["content"]) + 1 for x in rows) for r in out)
    first, last = out[0]["loss"], sum(r["loss"] for r in out[-3:]) / 3
    assert last < 0.7 * first, (first, [round(r["loss"], 4) for r in out])


def test_lmbda_mixes_sources_by_step_and_refuses_prompt_only_rows(tmp_path):
    cfg = config(tmp_path, "mix", lmbda=0.3)
    draws = [step_source(cfg, s) for s in range(2000)]
    assert 0.25 < draws.count("student") / 2000 < 0.35 and set(draws) == {"student", "dataset"}
    assert draws == [step_source(config(tmp_path, "mix2", lmbda=0.3), s) for s in range(2000)]  # a function of seed
    prompts = [{"prompt": [{"role": "user", "content": f"2*{i}"}]} for i in range(8)]
    with pytest.raises(ValueError, match="no completion"):
        train_distill(cfg, model=tiny(), tokenizer=TOK, teacher=tiny(seed=1), train_data=prompts)
    out = records(config(tmp_path, "prompts", lmbda=1.0, max_steps=1), model=tiny(), teacher=tiny(seed=1),
                  train_data=prompts)  # fmt: skip
    assert out[0]["on_policy"] == 1.0


def test_config_refusals(tmp_path):
    from alignkit.config import ConfigError

    for kw, key in ((dict(lmbda=1.5), "lmbda"), (dict(beta=-0.1), "beta"), (dict(micro_batch_size=0), "micro_batch"),
                    (dict(teacher_model="a", teacher_server="http://x"), "teacher_server"),
                    (dict(teacher_server="http://x", temperature=0.7), "temperature")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            config(tmp_path, "bad", **kw)


# ---------------------------------------------------------------------------------------------------------------
# a vLLM-server teacher: a fake /v1/completions backed by a local model
# ---------------------------------------------------------------------------------------------------------------


class FakeVLLM:
    """``/v1/models`` and ``/v1/completions`` as vLLM's OpenAI-compatible server answers them: ``prompt_logprobs=k``
    (the top-k of each position plus the scored token, keyed by token id, with ranks) and sampling (``n``,
    ``seed``, ``return_token_ids``) from ``model``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.requests = model.eval(), []
        gen = HFGenerator(model, TOK.pad_token_id)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:  # noqa: ANN002
                pass

            def reply(self, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self.reply({"data": [{"id": "teacher"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                seq = body["prompt"][0]
                if body.get("prompt_logprobs") is not None:
                    self.reply({"choices": [{"index": 0, "prompt_logprobs": outer.prompt_logprobs(seq, body)}]})
                    return
                out = gen.generate([seq], n=body["n"], max_new_tokens=body["max_tokens"],
                                   temperature=body["temperature"], stop_token_ids=body["stop_token_ids"],
                                   seed=body.get("seed"))  # fmt: skip
                triples = zip(out.completion_ids, out.logprobs, out.finished)
                choices = [
                    {
                        "index": j,
                        "token_ids": c,
                        "logprobs": {"token_logprobs": lp},
                        "finish_reason": "stop" if f else "length",
                    }
                    for j, (c, lp, f) in enumerate(triples)
                ]
                self.reply({"choices": choices})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @torch.no_grad()
    def prompt_logprobs(self, seq: list[int], body: dict) -> list:
        logps = torch.log_softmax(self.model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        out: list = [None]
        for t in range(1, len(seq)):
            lp = logps[t - 1]
            order = lp.argsort(descending=True)
            rank = {int(i): r + 1 for r, i in enumerate(order.tolist())}
            keep = [int(i) for i in order[: body["prompt_logprobs"]]] + [seq[t]]
            out.append({str(i): {"logprob": float(lp[i]), "rank": rank[i], "decoded_token": ""} for i in keep})
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server():
    teacher = tiny(hidden=48, seed=7)
    server = FakeVLLM(teacher)
    yield teacher, server
    server.close()


def test_server_teacher_top_k(tmp_path, fake_server):
    teacher, server = fake_server
    rows = chat_rows(8)
    common = dict(lmbda=0.0, beta=0.0, max_steps=2)
    local = records(config(tmp_path, "local", **common), model=tiny(), teacher=teacher, teacher_tokenizer=TOK,
                    train_data=rows)  # fmt: skip
    # top-k over the whole vocabulary (+ a ~0 tail bucket): the local teacher's full forward KL
    full = records(config(tmp_path, "server-full", teacher_server=server.url, loss_top_k=len(TOK), **common),
                   model=tiny(), train_data=rows)  # fmt: skip
    for a, b in zip(local, full):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, a["loss"]), (a["loss"], b["loss"])
    assert all(r["distill/teacher_topk_mass"] > 0.999 for r in full)
    body = next(r for r in server.requests if r.get("prompt_logprobs") is not None)
    assert body["prompt_logprobs"] == len(TOK) and body["max_tokens"] == 1 and body["model"] == "teacher"
    # a real top-k with the tail bucket, and seq_kd sampling from the server
    server.requests.clear()
    out = records(config(tmp_path, "server-k", teacher_server=server.url, loss_top_k=5, seq_kd=True, lmbda=0.0,
                         beta=0.5, max_steps=6, temperature=1.0), model=tiny(), train_data=rows)  # fmt: skip
    assert all(r["teacher_generated"] == 1.0 and 0 < r["distill/teacher_topk_mass"] < 1 for r in out)
    assert any("n" in r and r.get("seed") is not None for r in server.requests)  # seeded generation requests
    assert out[-1]["loss"] < out[0]["loss"]


def test_held_out_evaluation_is_the_divergence_on_eval_completions(tmp_path):
    """``eval_loss`` every ``eval_every`` steps and at the end: the training divergence (beta, temperature) per token
    of the held-out rows' completions, equal to the full-logits loss of the trained student against the teacher."""
    teacher, student = tiny(hidden=48, seed=9), tiny()
    held = chat_rows(6, seed=5)
    cfg = config(tmp_path, "eval", lmbda=0.0, beta=0.5, temperature=0.8, max_steps=5, eval_every=2)
    out = records(cfg, model=student, teacher=teacher, teacher_tokenizer=TOK, train_data=chat_rows(16),
                  eval_data=held)  # fmt: skip
    assert [r["step"] for r in out if "eval_loss" in r] == [2, 4, 5]
    assert out[-1]["eval_loss"] < out[1]["eval_loss"]  # the student moved toward the teacher
    items = distill_items(held, TOK, cfg)
    with torch.no_grad():
        s_logits, t_logits = [], []
        for it in items:
            seq = torch.tensor([it.prompt_ids + it.completion_ids])
            at = slice(len(it.prompt_ids) - 1, len(seq[0]) - 1)  # the positions that predict the completion
            s_logits.append(student(seq).logits[0, at])
            t_logits.append(teacher(seq).logits[0, at])
        s_all, t_all = torch.cat(s_logits)[None], torch.cat(t_logits)[None]
        n = s_all.shape[1]
        want, _ = generalized_jsd_loss(s_all, t_all, torch.ones(1, n, dtype=torch.bool), beta=0.5, temperature=0.8,
                                       normalizer=n)  # fmt: skip
    assert out[-1]["eval_loss"] == pytest.approx(float(want), rel=1e-4)
    with pytest.raises(ValueError, match="evaluation rows have no completion"):
        records(config(tmp_path, "bare", eval_every=1), model=tiny(), teacher=teacher, teacher_tokenizer=TOK,
                train_data=chat_rows(8), eval_data=[{"prompt": "1+1="}])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and exact resume
# ---------------------------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_resume_is_exact(tmp_path):
    teacher, rows = tiny(hidden=48, seed=9), chat_rows(24)
    kw = dict(lmbda=0.5, max_steps=8, save_every=2, temperature=0.8, lr=5e-3, warmup_steps=2, schedule="cosine")

    def run(name: str, crash_at: int | None = None, resume: bool = False) -> None:
        def crash(step: int, record: dict) -> None:
            if step == crash_at:
                raise Crash

        cfg = config(tmp_path, name, resume=resume, **kw)
        try:
            train_distill(cfg, model=tiny(), tokenizer=TOK, teacher=teacher, teacher_tokenizer=TOK, train_data=rows,
                          callbacks=[crash])  # fmt: skip
        except Crash:
            pass

    run("straight")
    run("crashed", crash_at=5)  # after checkpoint-4, inside the next interval
    assert (tmp_path / "crashed" / "latest").read_text().strip() == "checkpoint-4"
    run("crashed", resume=True)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "crashed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert {r["on_policy"] for r in a} == {0.0, 1.0}  # both sources occur in the run
    for x, y in zip(a, b):
        assert x["on_policy"] == y["on_policy"] and x["num_completion_tokens"] == y["num_completion_tokens"]
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
    wa, wb = (load_file(tmp_path / n / "checkpoint-8" / "model.safetensors") for n in ("straight", "crashed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w4 = load_file(tmp_path / "crashed" / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(w4[k], wb[k]) for k in wb)


# ---------------------------------------------------------------------------------------------------------------
# two ranks (gloo, DDP) through the CLI == one process
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_process(tmp_path, parallel):
    """Two gloo ranks through the CLI give one process's losses and weights; under FSDP2 the teacher is sharded
    like the student, and ``seq_kd`` steps generate with it (every rank decoding in lockstep)."""
    tiny().save_pretrained(tmp_path / "student")
    TOK.save_pretrained(tmp_path / "student")
    tiny(hidden=48, seed=11).save_pretrained(tmp_path / "teacher")
    TOK.save_pretrained(tmp_path / "teacher")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [f"model={tmp_path / 'student'}", f"teacher_model={tmp_path / 'teacher'}",
            f"dataset={tmp_path / 'rows.jsonl'}", "chat_format=chatml", "progress=false", "max_steps=3",
            "batch_size=4", "micro_batch_size=1", "lr=1e-3", "lmbda=0.5", "max_new_tokens=5", "seed=2",
            f"seq_kd={str(parallel == 'fsdp2').lower()}"]  # fmt: skip
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if n == 2 else []
        ranks = [f"parallel={parallel}"] if n == 2 else []
        p = subprocess.run([sys.executable, *launch, "-m", "alignkit", "distill", *args, *ranks, f"output_dir={out}"],
                           capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("teacher sharded with FSDP2 over 2 rank(s)" in p.stdout) == (n == 2 and parallel == "fsdp2")
        runs[n] = read_metrics(out)
    assert {r["on_policy"] for r in runs[1]} == {0.0, 1.0}
    if parallel == "fsdp2":
        assert all(r["teacher_generated"] == 1.0 - r["on_policy"] for r in runs[1])  # the others: the teacher's
    for x, y in zip(runs[1], runs[2], strict=True):
        assert x["num_completion_tokens"] == y["num_completion_tokens"] and x["on_policy"] == y["on_policy"]
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, x["loss"]), (x["step"], x["loss"], y["loss"])
    wa, wb = (load_file(tmp_path / f"run{n}" / "checkpoint-3" / "model.safetensors") for n in (1, 2))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
