"""SFT step time, throughput and peak memory: alignkit ``train_sft`` vs TRL 1.16 ``SFTTrainer`` vs a plain loop.

    python benchmarks/sft_vs_trl.py [--steps 3] [--runs 2] [--threads 1] [--data fastchat]
                                    [--trl-padding-free] [--profile] [--variants alignkit,trl,plain,trl_gc]

Needs the bench extra (trl, accelerate), e.g. ``/work/venvs/dev/bin/python benchmarks/sft_vs_trl.py``. The
default run takes ~4 min on a quiet 2-core machine (~8 min under heavy load); ``--trl-padding-free --profile``
adds ~2-4 min.

Workload (identical for every variant): Llama-shaped model from ``LlamaConfig`` (hidden 256, 4 layers, 4 heads,
intermediate 1024 = 4x hidden, vocab 32,000, untied head, ~20.6M parameters), random init with seed 0; fp32 on
CPU; sdpa attention; no activation checkpointing; AdamW lr 2e-5, grad-norm clip 1.0. Tokenizer: Llama 2 (32,000
tokens) from the conformance kit with a ChatML template carrying ``{% generation %}`` markers; alignkit detects it
as its ``chatml`` format, TRL uses the markers for ``assistant_only_loss``. Before running, the script checks token
by token that alignkit's tokenization equals HF's ``apply_chat_template(return_assistant_tokens_mask=True)``
(input ids and trained tokens). Data: 8 multi-turn conversations per optimizer step (``fastchat``: the first 8 of
fastchat_dummy_conversation, 1-3 turns, 872 tokens, 391 trained; ``alpaca3`` / ``dolly3`` chain three consecutive
single-turn rows into one 3-turn conversation: ~6x more tokens, too slow for TRL within 10 minutes). Every step
trains on exactly these 8 conversations (alignkit: the 8 rows, one packed bin per epoch, one epoch per step; TRL:
the 8 rows repeated, sequential sampler, batch size 8; plain: the same 8 each step), and the per-step trained-token
counts are asserted equal across variants.

Variants:
* ``alignkit``: ``train_sft`` with packing (one padding-free row per step), log-probs only at trained positions
  through the chunked LM head.
* ``trl``: ``SFTTrainer``, ``assistant_only_loss=True``, TRL's defaults for padding (``packing=False``,
  ``padding_free=False``: right-padded batches of 8); ``gradient_checkpointing=False`` and ``bf16=False`` set
  explicitly (TRL's SFTConfig defaults both to True); optimizer = transformers' default ``adamw_torch_fused``. TRL
  1.16 has its own chunked ("fused") LM head; on CPU it scores every position (padding and prompt included) and
  also computes entropy and top-1 for its metrics. ``--trl-padding-free`` adds ``trl_pf`` (``padding_free=True``);
  ``trl_gc`` (``--variants``) is TRL with its default gradient checkpointing on.
* ``plain``: HF ``model(input_ids, attention_mask, labels)`` (full logits) on right-padded batches,
  ``torch.optim.AdamW`` with default arguments, clip 1.0.

Timing: the time between the ends of consecutive optimizer steps (callbacks), i.e. collation, forward, backward,
clipping and the optimizer; the first step is a warm-up and is dropped; alignkit runs one extra step that is
dropped too, because ``train_sft`` writes its final checkpoint inside that interval. Each variant runs ``--runs``
times in fresh subprocesses, interleaved; the table shows medians over all timed steps. Two clocks: wall time and
the process's CPU time (all threads). The machine's 2 cores are shared with other jobs (load average 6-14 while
this was written), so wall time swings 2-4x within minutes, between variants run back to back; CPU time of a
one-thread process hardly moves, so ratios are best read from it. ``--threads 1`` (default) because with torch's
default of 2 OpenMP threads on an oversubscribed machine every parallel op waits at a barrier for the descheduled
thread (~15 ms per op seen in the profiler): steps became 2-3x slower for all variants and the timing measured the
scheduler. ``--threads 0`` keeps torch's default. Throughput is trained (assistant) tokens per second.

Memory: each run is its own subprocess. After imports, tokenizer, data and model exist, the kernel's RSS
high-water mark is reset (``echo 5 > /proc/self/clear_refs`` resets VmHWM) and the peak reported is
``VmHWM - VmRSS_at_reset`` read at the end of the last timed step: everything training needs on top of the
model weights (tokenization, trainer set-up, gradients, AdamW state, activations, LM-head tiles). This is more
robust than ``ru_maxrss`` minus a baseline, whose high-water mark can be set by imports or model construction
before the baseline and then hides the training peak; VmHWM is exact (kernel-maintained, no sampling) and, unlike
tracemalloc, sees torch's allocations. Without clear_refs it falls back to ``ru_maxrss`` (an upper bound).
Gradients + AdamW state are ~250 MB in every variant, a floor under every ratio.

Last measured (2 CPU cores shared with other jobs, load average ~13, --threads 1, torch 2.13 CPU, transformers
5.24, trl 1.16; ``--trl-padding-free --profile``):

    variant    wall s/step  CPU s/step  trained tok/s (CPU)  peak MB
    alignkit          4.46        1.18                  332      553
    trl              13.89        3.99                   98     1856
    plain             7.57        2.15                  182      936
    trl_pf           10.84        2.67                  147     1252
    (trl_gc, separate run: CPU 4.2 s/step, peak 1739 MB)

    alignkit/trl:    throughput 3.39x (CPU), 3.11x (wall)  goal >= 6x MISSED;  peak memory 0.30x  goal <= 0.4x met
    alignkit/plain:  throughput 1.83x (CPU), 1.70x (wall)  goal >= 2x MISSED;  peak memory 0.59x
    alignkit/trl_pf: throughput 2.26x (CPU), 2.43x (wall);                      peak memory 0.44x

  A quiet-machine run earlier (wall, load ~3 during the first round) gave alignkit 1.0-1.1 s, trl 3.7-4.3 s,
  plain 1.8-2.1 s, trl_pf 2.5 s per step: the same ratios.

  alignkit step profile (CPU s): backbone fwd 0.21 (17%), LM head fwd 0.15 (12%), LM head bwd 0.37 (28%),
  backbone bwd 0.41 (31%), clip + AdamW 0.19 (14%), collation 0.001. AdamW from ``make_optimizer`` (for-loop
  implementation) 0.16 s vs 0.024 s with ``fused=True``. Chunked head fwd+bwd 0.45 s = full logits for the same
  391 tokens 0.45 s. Backbone fwd+bwd on the 872-token packed row 0.52 s vs one document at a time 0.53 s; on
  3488 tokens in one packed row 4.6 s vs 2.1 s one document at a time (sdpa with a block-diagonal mask computes the
  whole (sum L)^2 attention on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    ALIGNKIT_CPU_ARGS,
    CHATML_GEN,
    TRL_CPU_ARGS,
    PeakRSS,
    bench_model,
    clock,
    llama2_tokenizer,
    load_jsonl,
    median_time,
    pooled_medians,
    print_columns,
    print_profile,
    profile_step,
    run_child,
    run_variants,
    step_result,
    step_times,
    trl_step_timer,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
N_CONV = 8  # conversations per optimizer step
MAX_LENGTH = 2048
LR = 2e-5


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up (runs inside each child)
# ---------------------------------------------------------------------------------------------------------------


def conversations(name: str) -> list[dict]:
    """The 8 conversations every step trains on (deterministic: the first ones of the set)."""

    def read(ds: str) -> list[dict]:
        return load_jsonl(DATA / ds / f"{ds}.jsonl")

    if name == "fastchat":
        rows = read("fastchat_dummy_conversation")
        return [{"messages": r["messages"]} for r in rows[:N_CONV]]
    src = {"alpaca3": "alpaca_cleaned_1000", "dolly3": "dolly_subset"}[name]
    rows = read(src)
    out = []
    for i in range(N_CONV):  # three consecutive single-turn rows -> one 3-turn conversation
        msgs = [m for r in rows[3 * i : 3 * i + 3] for m in r["messages"] if m["role"] in ("user", "assistant")]
        out.append({"messages": msgs})
    return out


def tokenizer():  # noqa: ANN201
    return llama2_tokenizer(CHATML_GEN)


def hf_encode(tok, rows: list[dict]) -> list[dict]:  # noqa: ANN001
    """HF's own tokenization with assistant masks (what TRL does): input_ids + labels (-100 off-assistant)."""
    out = tok.apply_chat_template(
        [r["messages"] for r in rows], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return [
        {"input_ids": list(ids), "labels": [t if m else -100 for t, m in zip(ids, mask)]}
        for ids, mask in zip(out["input_ids"], out["assistant_masks"])
    ]


def trained_per_step(encoded: list[dict]) -> int:
    """Trained targets of one step: labels at t >= 1 (position 0 is never predicted)."""
    return sum(sum(1 for x in e["labels"][1:] if x != -100) for e in encoded)


# ---------------------------------------------------------------------------------------------------------------
# Variants (each returns {"wall": [...], "cpu": [...] per timed step, "trained": [...] per step, "peak_mb"})
# ---------------------------------------------------------------------------------------------------------------


def run_alignkit(rows, tok, mdl, steps: int, warmup: int, mem: PeakRSS) -> dict:  # noqa: ANN001
    from alignkit.loops.sft import SFTConfig, train_sft

    total = warmup + steps + 1  # the last step's interval holds the final checkpoint write: dropped
    marks, trained, peak = [], [], {}

    def cb(step: int, record: dict) -> None:
        marks.append(clock())
        trained.append(int(record["num_trained_tokens"]))
        if step == warmup + steps:
            peak["mb"] = mem.peak_mb()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(
            output_dir=tmp,
            train_on="assistant",
            max_length=MAX_LENGTH,
            packing=True,
            batch_size=N_CONV,  # pack_tokens = 8 * 2048 >= the 8 conversations: one bin = one step
            epochs=float(total),
            lr=LR,
            **ALIGNKIT_CPU_ARGS,
        )
        mem.reset()
        marks.append(clock())
        summary = train_sft(cfg, model=mdl, tokenizer=tok, train_data=rows, callbacks=[cb])
    assert summary["steps"] == total, f"expected {total} steps (one per epoch), got {summary['steps']}"
    # alignkit counts labels != -100 before packing; position 0 of a document is never trained by the template
    return step_result(marks, warmup, steps, peak["mb"], trained=trained)


def run_trl(  # noqa: ANN001
    rows, tok, mdl, steps: int, warmup: int, mem: PeakRSS, padding_free: bool, checkpointing: bool
) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    total = warmup + steps
    marks, trained, peak = [], [], {}
    timer = trl_step_timer(marks, mem, total, peak)

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
            if model.training:
                trained.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=N_CONV,
            max_steps=total,
            learning_rate=LR,
            assistant_only_loss=True,
            packing=False,
            padding_free=padding_free,
            max_length=None if padding_free else MAX_LENGTH,  # TRL refuses max_length with padding_free, no packing
            gradient_checkpointing=checkpointing,
            **TRL_CPU_ARGS,
        )
        mem.reset()
        trainer = CountingSFTTrainer(
            model=mdl, args=args, train_dataset=datasets.Dataset.from_list(rows * total), processing_class=tok
        )
        trainer.add_callback(timer)
        trainer.train()
    return step_result(marks, warmup, steps, peak["mb"], trained=trained)


def run_plain(rows, tok, mdl, steps: int, warmup: int, mem: PeakRSS) -> dict:  # noqa: ANN001
    import torch

    encoded = hf_encode(tok, rows)
    pad = tok.pad_token_id

    def collate(batch: list[dict]) -> dict:
        T = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    mem.reset()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(mdl.parameters(), lr=LR, weight_decay=0.0)
    mdl.train()
    marks, trained, peak = [clock()], [], 0.0
    for step in range(warmup + steps):
        batch = collate(encoded)
        trained.append(int((batch["labels"][:, 1:] != -100).sum()))
        loss = mdl(**batch, use_cache=False).loss  # mean over trained tokens (HF shifts labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mdl.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(clock())
        if step == warmup + steps - 1:
            peak = mem.peak_mb()
    return step_result(marks, warmup, steps, peak, trained=trained)


def child(variant: str, data: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(ROOT))
    # import everything a variant needs before the memory baseline, so imports do not count as training memory
    if variant == "alignkit":
        import alignkit.loops.sft  # noqa: F401
    if variant.startswith("trl"):
        import trl  # noqa: F401
        from trl import SFTTrainer  # noqa: F401

    torch.manual_seed(0)
    tok, rows = tokenizer(), conversations(data)
    mdl = bench_model()
    mem = PeakRSS()
    if variant == "alignkit":
        res = run_alignkit(rows, tok, mdl, steps, warmup, mem)
    elif variant in ("trl", "trl_pf", "trl_gc"):
        res = run_trl(rows, tok, mdl, steps, warmup, mem, variant == "trl_pf", checkpointing=variant == "trl_gc")
    elif variant == "plain":
        res = run_plain(rows, tok, mdl, steps, warmup, mem)
    else:
        raise ValueError(variant)
    res["method"] = mem.method
    return res


# ---------------------------------------------------------------------------------------------------------------
# Profile of one alignkit step (same operations as train_sft's inner loop, timed piece by piece)
# ---------------------------------------------------------------------------------------------------------------


def profile_alignkit(data: str, reps: int, threads: int) -> dict:
    """Time the parts of one alignkit SFT step (the operations of train_sft's inner loop), then alternatives for
    the expensive parts on the same tensors. Returns {"parts": {name: s}, "alternatives": {name: s}, ...}."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from alignkit.data.collate import pack_collate, packed_forward_kwargs
    from alignkit.data.tokenize import tokenize_rows
    from alignkit.logprobs import chunked_token_logps
    from alignkit.loops.common import make_optimizer
    from alignkit.loops.sft import SFTConfig

    tok, rows = tokenizer(), conversations(data)
    mdl = bench_model()
    mdl.train()
    examples, _ = tokenize_rows(tok, rows, max_length=MAX_LENGTH)
    opt = make_optimizer(mdl, LR)
    chunk = SFTConfig.token_chunk
    backbone, head = mdl.get_decoder(), mdl.get_output_embeddings()
    last: dict = {}  # the last step's batch, labels and trained-position mask, for the alternatives below

    def forward(lap):  # noqa: ANN001, ANN202
        b = pack_collate(examples)
        kw = {**packed_forward_kwargs(b, "sdpa"), "use_cache": False}
        labels = b["labels"]
        lap("collate")
        hidden = backbone(**kw).last_hidden_state
        lap("backbone forward")
        sel = labels[:, 1:] != -100
        logps = chunked_token_logps(hidden[:, :-1][sel], head.weight, labels[:, 1:][sel], token_chunk=chunk)["logps"]
        loss = -logps.sum() / sel.sum()
        lap("LM head forward (chunked)")
        last.update(b=b, labels=labels, sel=sel)
        return hidden, loss

    parts = profile_step(forward, mdl, opt, reps)
    b, labels, sel = last["b"], last["labels"], last["sel"]

    # Alternatives for the expensive parts, on the same shapes.
    alt: dict[str, float] = {}
    for p in mdl.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    alt["AdamW step, make_optimizer (for-loop)"] = median_time(opt.step, reps)
    fused = torch.optim.AdamW(mdl.parameters(), lr=LR, fused=True)
    alt["AdamW step, fused=True"] = median_time(fused.step, reps)
    mdl.zero_grad(set_to_none=True)

    h = torch.randn(int(sel.sum()), head.weight.shape[1], requires_grad=True)
    w = head.weight.detach().clone().requires_grad_()
    tgt = labels[:, 1:][sel]

    def head_chunked() -> None:
        chunked_token_logps(h, w, tgt, token_chunk=chunk)["logps"].sum().backward()
        h.grad = w.grad = None

    def head_full() -> None:  # same tokens, logits kept for backward (no recomputation)
        torch.log_softmax(h @ w.T, dim=-1).gather(1, tgt[:, None]).sum().backward()
        h.grad = w.grad = None

    alt["LM head fwd+bwd, chunked (trained tokens)"] = median_time(head_chunked, reps)
    alt["LM head fwd+bwd, full logits (same tokens)"] = median_time(head_full, reps)

    def backbone_packed(k: int):  # noqa: ANN202
        pb = pack_collate(examples * k)
        pkw = {**packed_forward_kwargs(pb, "sdpa"), "use_cache": False}

        def run() -> None:
            backbone(**pkw).last_hidden_state.sum().backward()
            mdl.zero_grad(set_to_none=True)

        return run

    def backbone_per_doc(k: int):  # noqa: ANN202
        def run() -> None:
            for e in examples * k:
                backbone(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).last_hidden_state.sum().backward()
            mdl.zero_grad(set_to_none=True)

        return run

    n_tokens = int(b["input_ids"].numel())
    for k in (1, 4):  # x4: the same documents four times in one row, as a larger pack_tokens would give
        alt[f"backbone fwd+bwd, {k * n_tokens} tokens in one packed row"] = median_time(backbone_packed(k), 1)
        alt[f"backbone fwd+bwd, same {k * n_tokens} tokens one document at a time"] = median_time(
            backbone_per_doc(k), 1
        )
    return {
        "parts": parts,
        "alternatives": alt,
        "tokens": n_tokens,
        "trained": int(sel.sum()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def check_same_tokens(data: str) -> tuple[int, int]:
    """alignkit's tokenization == HF/TRL's (apply_chat_template + assistant masks), token by token."""
    sys.path.insert(0, str(ROOT))
    from alignkit.data.tokenize import resolve_format, tokenize_rows

    tok, rows = tokenizer(), conversations(data)
    ours, report = tokenize_rows(tok, rows, max_length=MAX_LENGTH)
    theirs = hf_encode(tok, rows)
    assert report.truncated == 0 and len(ours) == len(theirs) == N_CONV, report
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a["input_ids"] == b["input_ids"], f"conversation {i}: input ids differ"
        assert a["labels"] == b["labels"], f"conversation {i}: trained tokens differ"
    n_tok = sum(len(e["input_ids"]) for e in theirs)
    print(f"tokenization: alignkit format {resolve_format(tok, None).name!r} == HF assistant masks on all {N_CONV}")
    return n_tok, trained_per_step(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="fresh subprocesses per variant, interleaved")
    ap.add_argument("--data", choices=("alpaca3", "fastchat", "dolly3"), default="fastchat")
    ap.add_argument("--variants", default="alignkit,trl,plain")
    ap.add_argument("--trl-padding-free", action="store_true", help="also run TRL with padding_free=True")
    ap.add_argument("--profile", action="store_true", help="time the parts of an alignkit step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child process (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child == "profile":
        print(json.dumps(profile_alignkit(a.data, a.steps, a.threads)))
        return
    if a.child:
        print(json.dumps(child(a.child, a.data, a.steps, a.warmup, a.threads)))
        return

    n_tok, n_trained = check_same_tokens(a.data)
    variants = [v for v in a.variants.split(",") if v]
    if a.trl_padding_free and "trl_pf" not in variants:
        variants.append("trl_pf")
    print(
        f"workload: {N_CONV} conversations/step ({a.data}), {n_tok} tokens, {n_trained} trained; "
        f"{a.warmup} warm-up + {a.steps} timed steps x {a.runs} runs per variant"
    )
    common = ["--data", a.data, "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    t_start = time.perf_counter()
    results = run_variants(__file__, variants, a.runs, common, step_times, width=9)

    rows = {}
    for v, runs in results.items():
        counts = {c for r in runs for c in r["trained"]}
        assert counts == {n_trained}, f"{v}: trained tokens per step {sorted(counts)} != {n_trained}"
        rows[v] = pooled_medians(runs, ("wall", "cpu"))
        rows[v]["peak"] = statistics.median(r["peak_mb"] for r in runs)
    wall = time.perf_counter() - t_start
    print(f"\ntrained tokens per step: {n_trained} in every variant (asserted); benchmark wall time {wall:.0f} s")
    head = ("wall s/step", "tok/s (wall)", "CPU s/step", "tok/s (CPU)", "peak MB")
    cells = {
        v: [f"{x['wall']:.2f}", f"{n_trained / x['wall']:.0f}", f"{x['cpu']:.2f}", f"{n_trained / x['cpu']:.0f}"]
        + [f"{x['peak']:.0f}"]
        for v, x in rows.items()
    }
    print_columns(head, cells, 9, 12)
    if "alignkit" in rows:
        ak = rows["alignkit"]
        for ref, goal_t, goal_m in (
            ("trl", 6.0, 0.4),
            ("trl_pf", None, None),
            ("trl_gc", None, None),
            ("plain", 2.0, None),
        ):
            if ref not in rows:
                continue
            thr = {k: rows[ref][k] / ak[k] for k in ("wall", "cpu")}  # throughput ratio = inverse time ratio
            memr = ak["peak"] / rows[ref]["peak"]
            goal = f" (goal >= {goal_t}x: {'met' if min(thr.values()) >= goal_t else 'MISSED'})" if goal_t else ""
            mgoal = f" (goal <= {goal_m}x: {'met' if memr <= goal_m else 'MISSED'})" if goal_m else ""
            print(
                f"alignkit/{ref}: throughput {thr['cpu']:.2f}x (CPU time), {thr['wall']:.2f}x (wall){goal}; "
                f"peak memory {memr:.2f}x{mgoal}"
            )

    if a.profile:
        args = ["--child", "profile", "--data", a.data, "--steps", str(max(2, a.steps)), "--threads", str(a.threads)]
        p = run_child(__file__, args)
        title = f"\nalignkit step profile ({p['tokens']} tokens in one packed row, {p['trained']} trained):"
        print_profile(p, title, "alternatives, same shapes:", 62)


if __name__ == "__main__":
    main()
