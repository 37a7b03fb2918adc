"""DPO step time and peak memory: alignkit ``train_dpo`` (precomputed reference) vs TRL 1.16 ``DPOTrainer``.

    python benchmarks/dpo_vs_trl.py [--steps 2] [--warmup 1] [--runs 2] [--threads 1] [--max-length 256]
                                    [--data hh|llamafactory] [--variants alignkit,trl_ref,trl_pre] [--profile]

Needs the bench extra (trl, accelerate), e.g. ``/work/venvs/dev/bin/python benchmarks/dpo_vs_trl.py``. The default
run takes ~11 min of wall time with the machine's load average at ~12 (2.5 min of CPU time), ~4-5 min on a quiet
2-core machine. ``--variants alignkit,alignkit_pack --profile`` takes ~4-6 min.

Workload (identical for every variant): the Llama-shaped model of ``sft_vs_trl.py`` (``LlamaConfig`` hidden 256,
4 layers, 4 heads, intermediate 1024, vocab 32,000, untied head, ~20.6M parameters), random init with seed 0; fp32
on CPU; sdpa attention; no activation checkpointing; sigmoid DPO, beta 0.1, lr 1e-6 constant, grad-norm clip 1.0.
Tokenizer: Llama 2 (32,000 tokens) from the conformance kit with the real Llama-2-chat template, which alignkit
detects as its ``llama-2`` format. Data: 8 conversational pairs per optimizer step from ``hh_rlhf_harmless``
(multi-turn prompts, one assistant answer each): the first 8 rows, in file order, whose prompt+chosen and
prompt+rejected both fit in ``--max-length`` tokens (so neither side truncates) and on which alignkit's token split
equals TRL's. Before running, the script tokenizes every candidate row both ways (TRL: its own ``tokenize_fn`` logic,
prompt with generation prompt vs prompt+completion, common prefix) and compares input ids and scored positions token
by token; rows 2, 4-9, 11 qualify at 256 tokens (2,062 tokens, 3,344 padded, 728 completion tokens scored). Every
step trains on exactly these 8 pairs (alignkit: one epoch of 8 = one step; TRL: the 8 rows, sequential sampler,
batch size 8, ``max_length`` 256 ``keep_start``). The scored completion tokens and real tokens per step are asserted
equal in every variant, and so are the per-step losses (to 1e-4: 0.69315, 0.68420, 0.67538 in all), which checks
that the same tokens, reference and update rule are used.

Variants:
* ``alignkit``: ``train_dpo`` with ``reference="precomputed"``: one no-grad pass of the initial policy before step
  1 (an empty cache directory per run, so the pass runs; it is in the dropped warm-up interval), then a table
  lookup; no reference model exists during training. Padded batches (the loop's default ``packing=False``), one
  forward of the 16 sequences, log-probs only at completion positions through the chunked LM head. Optimizer:
  ``make_optimizer`` (fused AdamW). ``alignkit_pack`` (``--variants``) is the same with ``packing=True``.
* ``trl_ref``: ``DPOTrainer`` with a reference model: a deep copy of the policy made after the memory baseline
  (TRL's default, ``ref_model=None``, reloads the policy from its hub path, which a model built from a config
  lacks), so it counts in the peak as TRL's own copy would.
* ``trl_pre``: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (``precompute_ref_batch_size=8``): TRL's own
  reference pass in ``__init__``, no reference model during training.
  Both TRL variants: ``gradient_checkpointing=False`` and ``bf16=False`` set explicitly (TRL's DPOConfig defaults
  both to True), optimizer = transformers' default ``adamw_torch_fused``. TRL 1.16's fused LM head scores only
  completion positions on Triton devices, but on CPU it scores every position of the padded batch in one 32,768-token
  tile (full ``[3328, 32000]`` fp32 logits) and also computes entropy, mean logit and top-1 for its metrics.

Timing and memory as in ``sft_vs_trl.py``: the time between the ends of consecutive optimizer steps (callbacks); the
first step is a warm-up and is dropped (it also holds alignkit's tokenization and reference pass); alignkit runs one
extra step that is dropped too (``train_dpo`` writes its final checkpoint inside it). Each variant runs ``--runs``
times in fresh subprocesses, interleaved; medians over all timed steps; wall time and the process's CPU time (ratios
are best read from CPU time on this shared, loaded machine); ``--threads 1`` by default. Peak memory: VmHWM reset
(``/proc/self/clear_refs``) after imports, tokenizer, data and policy exist, read at the end of the last timed step:
everything training needs on top of the policy weights (tokenization, reference pass or reference model, gradients,
AdamW state ~250 MB, activations, LM-head tiles). ``startup+warm-up`` in the per-run lines is the wall time from the
baseline to the end of the first step.

Last measured (2 CPU cores shared with other jobs, load average 11-13, --threads 1, torch 2.13 CPU, transformers
5.24, trl 1.16; default run, then ``--variants alignkit,alignkit_pack --profile`` separately):

    variant        wall s/step   CPU s/step   steps/s (CPU)   peak MB
    alignkit              7.33         2.13           0.469       957
    trl_ref              30.18        11.43           0.088      4165
    trl_pre              38.49         9.69           0.103      4044
    (separate run: alignkit 2.41 CPU s/step, 911 MB; alignkit_pack 2.07 CPU s/step, 796 MB)

    alignkit/trl_ref: steps/s 5.36x (CPU), 4.11x (wall)  goal >= 4x met;  peak memory 0.23x  goal <= 0.5x met
    alignkit/trl_pre: steps/s 4.54x (CPU), 5.25x (wall)  goal >= 4x met;  peak memory 0.24x  goal <= 0.5x met

  alignkit CPU s/step varied 2.0-2.7 between runs (cache contention), TRL 8.9-12.5; wall time swings ~2x with load.

  alignkit step profile (CPU s): backbone fwd 0.56 (25%), LM head fwd 0.23 (10%), LM head bwd 0.53 (23%), backbone
  bwd 0.91 (40%), clip + fused AdamW 0.03, collate + loss 0.003. Same batch: backbone fwd+bwd 1.38 s on the 3,344
  padded positions vs 1.07 s packed (2,500 positions; 2,062 real tokens); LM head fwd+bwd 0.65 s chunked on the 728
  completion tokens vs 4.44 s with full logits and entropy on all 3,328 padded positions, as TRL does on CPU. So
  TRL's CPU step is mostly its head (~4.4 s of ~10), plus ~1.7 s for the reference forward in ``trl_ref``; its peak
  is the full-vocabulary logits tile (3,328 x 32,000 fp32 = 426 MB per copy, several copies live). alignkit's own
  largest costs are the backbone on padding (38% of padded positions are pad; ``packing=True`` saves ~15% CPU and
  ~120 MB) and the head backward, which recomputes each logits tile (2.3x the head forward). On a GPU, TRL's head
  scores only completion positions, so the ratios there would be smaller than these CPU ones.

  ``--data llamafactory`` (rows 10, 11, 21, 23, 43, 44, 69, 75: longer answers, 1,201 of 2,315 tokens scored, 4,064
  padded positions; one run, 2 timed steps): alignkit 3.05 CPU s/step, 1089 MB; alignkit_pack 2.33 s, 839 MB;
  trl_pre 11.08 s, 4923 MB. Padded alignkit MISSES the speed goal there (3.63x, memory 0.22x); packed meets it
  (4.74x, 0.17x). Profile (CPU s): backbone fwd+bwd 1.87 padded vs 1.27 packed (43% of padded positions are pad),
  LM head fwd 0.35 + bwd 0.91 on 1,201 tokens. The bottleneck is the backbone's work on padding: ``packing=True``
  removes it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import (  # noqa: E402
    ALIGNKIT_CPU_ARGS,
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

DATA = ROOT.parent / "shared" / "data"
TEMPLATE = ROOT.parent / "shared" / "conformance" / "templates" / "llama-2-chat.jinja"
DATASETS = {"hh": "hh_rlhf_harmless", "llamafactory": "llamafactory_dpo_en"}
N_PAIRS = 8  # preference pairs per optimizer step
LR = 1e-6
BETA = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up (runs inside each child)
# ---------------------------------------------------------------------------------------------------------------


def tokenizer():  # noqa: ANN201
    """Llama 2 tokenizer (32,000 tokens) with the real Llama-2-chat template (alignkit detects it as 'llama-2')."""
    return llama2_tokenizer(TEMPLATE.read_text())


def read_rows(data: str) -> list[dict]:
    ds = DATASETS[data]
    return load_jsonl(DATA / ds / f"{ds}.jsonl")


def trl_split(tok, row: dict) -> tuple[list[int], list[int], int]:  # noqa: ANN001
    """TRL 1.16's own tokenization of a conversational pair (``DPOTrainer._prepare_dataset.tokenize_fn``):
    (prompt+chosen ids, prompt+rejected ids, prompt length = where the completions start)."""
    from trl.trainer.dpo_trainer import _tokenize, common_prefix_length

    p = _tokenize(tok, row["prompt"], add_generation_prompt=True)["input_ids"]
    pc = _tokenize(tok, row["prompt"] + row["chosen"])["input_ids"]
    pr = _tokenize(tok, row["prompt"] + row["rejected"])["input_ids"]
    return pc, pr, min(common_prefix_length(p, pc), common_prefix_length(p, pr))


def select_pairs(data: str, max_length: int) -> tuple[list[int], dict]:
    """The first N_PAIRS rows (file order) whose prompt+chosen and prompt+rejected both fit in `max_length` tokens
    and on which alignkit's token split equals TRL's, token by token (input ids and scored positions). Returns
    (row indices, stats). Rows skipped for a differing split are counted (TRL keeps a lone '▁' token at the start
    of a completion that begins with a digit or spaces; alignkit counts it as prompt: ~0.4% of hh rows)."""
    from alignkit.data.preference import tokenize_pairs
    from alignkit.data.tokenize import resolve_format

    tok, rows = tokenizer(), read_rows(data)
    fmt = resolve_format(tok, None).name
    assert fmt == "llama-2", f"alignkit detected {fmt!r}, expected 'llama-2'"
    chosen, too_long, differ = [], 0, 0
    stats = {"tokens": 0, "scored": 0, "padded": 0}
    for i, row in enumerate(rows):
        pc, pr, plen = trl_split(tok, row)
        if max(len(pc), len(pr)) > max_length:
            too_long += 1
            continue
        ours, report = tokenize_pairs(tok, [row], max_length=max_length)
        assert len(ours) == 1 and sum(report.truncated.values()) == 0, report
        o = ours[0]
        same = True
        for ids, key in ((pc, "chosen"), (pr, "rejected")):
            theirs = [int(t >= max(plen, 1)) for t in range(len(ids))]  # TRL scores completion tokens at t >= 1
            mine = [int(x != -100) for x in o[f"{key}_labels"]]
            same &= ids == o[f"{key}_input_ids"] and theirs == mine
        if not same:
            differ += 1
            continue
        chosen.append(i)
        stats["tokens"] += len(pc) + len(pr)
        stats["scored"] += len(pc) + len(pr) - 2 * plen
        stats["padded"] = max(stats["padded"], len(pc), len(pr))
        if len(chosen) == N_PAIRS:
            break
    assert len(chosen) == N_PAIRS, f"only {len(chosen)} usable rows in {data}"
    stats["padded"] *= 2 * N_PAIRS  # TRL pads the 2P sequences of a batch to the longest
    return chosen, {**stats, "too_long": too_long, "differ": differ, "format": fmt}


# ---------------------------------------------------------------------------------------------------------------
# Variants (each returns {"wall", "cpu": [...] per timed step, "scored", "tokens", "loss": [...] per step, ...})
# ---------------------------------------------------------------------------------------------------------------


def _result(marks, warmup: int, steps: int, peak_mb: float, scored, tokens, losses, startup_wall: float) -> dict:  # noqa: ANN001
    """A variant's result: `step_result` of the timed steps, the losses of every step (warm-up included, to compare
    variants) and the wall time from the memory baseline to the end of the first step."""
    res = step_result(marks, warmup, steps, peak_mb, scored=scored, tokens=tokens)
    return {**res, "loss": losses[: warmup + steps], "startup_wall": startup_wall}


def run_alignkit(rows, tok, mdl, steps: int, warmup: int, mem: PeakRSS, max_length: int, packing: bool) -> dict:  # noqa: ANN001
    import alignkit.loops.dpo as dpo_loop
    from alignkit.loops.dpo import DPOConfig, train_dpo

    total = warmup + steps + 1  # the last step's interval holds the final checkpoint write: dropped
    marks, scored, tokens, losses, peak = [], [], [], [], {}
    pending: list[int] = []  # completion tokens of every collated batch since the last step ended
    collate = dpo_loop.collate_pairs

    def counting_collate(*a, **kw):  # noqa: ANN002, ANN003, ANN202  (instrumentation only: counts scored tokens)
        b = collate(*a, **kw)
        pending.append(int(b["lengths"].sum()))
        return b

    def cb(step: int, record: dict) -> None:
        marks.append(clock())
        scored.append(sum(pending))  # step 1 also holds the reference pass's batches (a warm-up step: dropped)
        pending.clear()
        tokens.append(int(record["num_tokens"]))
        losses.append(float(record["loss"]))
        if step == warmup + steps:
            peak["mb"] = mem.peak_mb()

    dpo_loop.collate_pairs = counting_collate
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(
            output_dir=f"{tmp}/run",
            max_length=max_length,
            packing=packing,
            batch_size=N_PAIRS,
            epochs=float(total),  # one epoch of the 8 pairs = one step
            lr=LR,
            beta=BETA,
            loss_type=["sigmoid"],
            reference="precomputed",
            reference_cache_dir=f"{tmp}/cache",  # empty: the reference pass runs (before step 1, not timed)
            **ALIGNKIT_CPU_ARGS,
        )
        mem.reset()
        marks.append(clock())
        summary = train_dpo(cfg, model=mdl, tokenizer=tok, train_data=rows, callbacks=[cb])
    dpo_loop.collate_pairs = collate
    assert summary["steps"] == total, f"expected {total} steps (one per epoch), got {summary['steps']}"
    ref = summary["reference"]
    assert ref["kind"] == "precomputed" and not ref["cache_hit"] and ref["forward_passes"] >= 1, ref
    return _result(marks, warmup, steps, peak["mb"], scored, tokens, losses, startup_wall=marks[1][0] - marks[0][0])


def run_trl(rows, tok, mdl, steps: int, warmup: int, mem: PeakRSS, max_length: int, precompute: bool) -> dict:  # noqa: ANN001
    import datasets
    from trl import DPOConfig, DPOTrainer

    total = warmup + steps
    marks, scored, tokens, losses, peak = [], [], [], [], {}
    timer = trl_step_timer(marks, mem, total, peak)

    class CountingDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                scored.append(int(inputs["completion_mask"][:, 1:].sum()))
                tokens.append(int(inputs["attention_mask"].sum()))
                losses.append(float(loss.detach()))
            return loss

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=N_PAIRS,
            max_steps=total,
            learning_rate=LR,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=max_length,
            truncation_mode="keep_start",
            precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=N_PAIRS,
            gradient_checkpointing=False,  # TRL's DPOConfig defaults to True
            **TRL_CPU_ARGS,  # bf16=False among them (TRL's DPOConfig defaults to True)
        )
        mem.reset()
        t0 = clock()
        # TRL's default reference (ref_model=None without precompute) reloads the policy from its hub path, which a
        # model built from a config lacks; a copy made here is the same thing and counts in the peak as it would.
        ref = None if precompute else copy.deepcopy(mdl)
        trainer = CountingDPOTrainer(
            model=mdl,
            ref_model=ref,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),  # 8 rows, sequential: every step = the same 8 pairs
            processing_class=tok,
        )
        assert (trainer.ref_model is None) == precompute
        trainer.add_callback(timer)
        trainer.train()
    return _result(marks, warmup, steps, peak["mb"], scored, tokens, losses, startup_wall=marks[1][0] - t0[0])


VARIANTS = {
    "alignkit": lambda *a, max_length: run_alignkit(*a, max_length=max_length, packing=False),
    "alignkit_pack": lambda *a, max_length: run_alignkit(*a, max_length=max_length, packing=True),
    "trl_ref": lambda *a, max_length: run_trl(*a, max_length=max_length, precompute=False),
    "trl_pre": lambda *a, max_length: run_trl(*a, max_length=max_length, precompute=True),
}


def child(variant: str, data: str, rows_idx: list[int], steps: int, warmup: int, threads: int, max_length: int) -> dict:
    import os

    import torch

    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference pass progress bar
    if threads > 0:
        torch.set_num_threads(threads)
    # import everything a variant needs before the memory baseline, so imports do not count as training memory
    if variant.startswith("alignkit"):
        import alignkit.loops.dpo  # noqa: F401
    else:
        import datasets  # noqa: F401
        from trl import DPOTrainer  # noqa: F401

    torch.manual_seed(0)
    all_rows = read_rows(data)
    rows = [all_rows[i] for i in rows_idx]
    tok, mdl = tokenizer(), bench_model()
    mem = PeakRSS()
    res = VARIANTS[variant](rows, tok, mdl, steps, warmup, mem, max_length=max_length)
    res["method"] = mem.method
    return res


# ---------------------------------------------------------------------------------------------------------------
# Profile of one alignkit step (the operations of train_dpo's inner loop, timed piece by piece)
# ---------------------------------------------------------------------------------------------------------------


def profile_alignkit(data: str, rows_idx: list[int], reps: int, threads: int, max_length: int) -> dict:
    """CPU seconds of the parts of one alignkit DPO step (what `train_dpo` does per micro-batch, written out), then
    the same batch through TRL's CPU head (every padded position scored, full logits) and packed instead of padded."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from alignkit.data.preference import collate_pairs, tokenize_pairs
    from alignkit.logprobs import chunked_token_logps
    from alignkit.loops.common import make_optimizer
    from alignkit.losses.preference import dpo_loss
    from alignkit.ops import segment_sum, split_pairs
    from alignkit.scoring import SequenceScorer

    all_rows = read_rows(data)
    tok, mdl = tokenizer(), bench_model()
    pairs, _ = tokenize_pairs(tok, [all_rows[i] for i in rows_idx], max_length=max_length)
    pad = tok.pad_token_id
    ref = SequenceScorer()(mdl, collate_pairs(pairs, pad_token_id=pad))  # the precomputed values, [2P]
    mdl.train()
    opt = make_optimizer(mdl, LR)
    backbone, head = mdl.get_decoder(), mdl.get_output_embeddings()
    last: dict = {}  # the last step's labels and scored-position mask, for the alternatives below

    def forward(lap):  # noqa: ANN001, ANN202
        b = collate_pairs(pairs, pad_token_id=pad)
        lap("collate (padded)")
        kw = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
        hidden = backbone(**kw, use_cache=False).last_hidden_state
        lap("backbone forward")
        labels = b["labels"]
        sel = labels[:, 1:] != -100
        logps = chunked_token_logps(hidden[:, :-1][sel], head.weight, labels[:, 1:][sel])["logps"]
        lap("LM head forward (chunked, completion tokens only)")
        seq = b["sequence_ids"][:, 1:][sel]
        pc, pr = split_pairs(segment_sum(logps, seq, b["n_sequences"]))
        rc, rr = split_pairs(ref)
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, normalizer=float(len(pairs)))
        lap("sequence sums + dpo_loss")
        last.update(labels=labels, sel=sel)
        return hidden, loss

    parts = profile_step(forward, mdl, opt, reps)
    labels, sel = last["labels"], last["sel"]

    alt: dict[str, float] = {}
    n_scored, n_padded = int(sel.sum()), int(labels[:, 1:].numel())
    w = head.weight.detach().clone().requires_grad_()

    def head_fb(n: int, full: bool):  # noqa: ANN202
        h = torch.randn(n, w.shape[1], requires_grad=True)
        tgt = torch.randint(0, w.shape[0], (n,))

        def run() -> None:
            if full:  # TRL 1.16 on CPU: [N, V] logits of every position, log-probs and entropy for its metrics
                z = h @ w.T
                lp = torch.log_softmax(z, -1)
                ent = -(lp.exp() * lp).sum(-1)
                (lp.gather(1, tgt[:, None]).sum() + 0 * ent.sum()).backward()
            else:
                chunked_token_logps(h, w, tgt)["logps"].sum().backward()
            h.grad = w.grad = None

        return run

    alt[f"LM head fwd+bwd, chunked, {n_scored} completion tokens"] = median_time(head_fb(n_scored, False), reps)
    alt[f"LM head fwd+bwd, full logits, all {n_padded} padded positions"] = median_time(head_fb(n_padded, True), 1)

    def backbone_fb(packing: bool):  # noqa: ANN202
        pb = collate_pairs(pairs, pad_token_id=pad, packing=packing, capacity=max_length)
        pkw = {k: pb[k] for k in ("input_ids", "attention_mask", "position_ids")}

        def run() -> None:
            backbone(**pkw, use_cache=False).last_hidden_state.sum().backward()
            mdl.zero_grad(set_to_none=True)

        return run, int(pb["input_ids"].numel())

    for packing in (False, True):
        run, n = backbone_fb(packing)
        alt[f"backbone fwd+bwd, {'packed' if packing else 'padded'} ({n} positions)"] = median_time(run, reps)
    return {"parts": parts, "alternatives": alt}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="fresh subprocesses per variant, interleaved")
    ap.add_argument("--data", choices=tuple(DATASETS), default="hh")
    ap.add_argument("--max-length", type=int, default=256, help="max tokens per sequence (prompt + completion)")
    ap.add_argument("--variants", default="alignkit,trl_ref,trl_pre")
    ap.add_argument("--profile", action="store_true", help="time the parts of an alignkit step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child process (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()

    rows_idx = [int(x) for x in a.rows.split(",") if x]
    if a.child == "profile":
        print(json.dumps(profile_alignkit(a.data, rows_idx, a.steps, a.threads, a.max_length)))
        return
    if a.child:
        print(json.dumps(child(a.child, a.data, rows_idx, a.steps, a.warmup, a.threads, a.max_length)))
        return

    rows_idx, st = select_pairs(a.data, a.max_length)
    print(
        f"workload: {N_PAIRS} pairs/step from {DATASETS[a.data]} rows {rows_idx} (first rows with both sequences "
        f"<= {a.max_length} tokens: {st['too_long']} longer skipped, {st['differ']} skipped for a TRL/alignkit "
        f"token-split difference); {st['tokens']} tokens ({st['padded']} padded), {st['scored']} scored; "
        f"alignkit format {st['format']!r}, token split == TRL's on every selected pair; "
        f"{a.warmup} warm-up + {a.steps} timed steps x {a.runs} runs per variant",
        flush=True,
    )
    variants = [v for v in a.variants.split(",") if v]
    common = ["--data", a.data, "--rows", ",".join(map(str, rows_idx)), "--max-length", str(a.max_length)]
    common += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]

    def describe(res: dict) -> str:
        return (
            f"{step_times(res)}  startup+warm-up {res['startup_wall']:.1f} s  "
            f"loss/step {[round(x, 5) for x in res['loss']]}"
        )

    t_start = time.perf_counter()
    results = run_variants(__file__, variants, a.runs, common, describe, width=13)

    table = {}
    for v, runs in results.items():
        assert {c for r in runs for c in r["scored"]} == {st["scored"]}, f"{v}: scored tokens {runs[0]['scored']}"
        assert {c for r in runs for c in r["tokens"]} == {st["tokens"]}, f"{v}: real tokens {runs[0]['tokens']}"
        table[v] = pooled_medians(runs, ("wall", "cpu"))
        table[v]["peak"] = statistics.median(r["peak_mb"] for r in runs)
    # same model, data, reference and update rule: the per-step losses must agree across variants
    first = results[variants[0]][0]["loss"]
    for v, runs in results.items():
        for r in runs:
            diff = max(abs(x - y) for x, y in zip(first, r["loss"]))
            assert diff < 1e-4, f"{v}: losses {r['loss']} differ from {variants[0]}'s {first} by {diff:.2e}"
    wall = time.perf_counter() - t_start
    print(
        f"\nscored (completion) tokens per step: {st['scored']}, real tokens {st['tokens']}, in every variant "
        f"(asserted); per-step losses agree across variants to < 1e-4 (asserted); benchmark wall time {wall:.0f} s"
    )
    head = ("wall s/step", "steps/s wall", "CPU s/step", "steps/s CPU", "peak MB")
    cells = {
        v: [f"{x['wall']:.2f}", f"{1 / x['wall']:.3f}", f"{x['cpu']:.2f}", f"{1 / x['cpu']:.3f}", f"{x['peak']:.0f}"]
        for v, x in table.items()
    }
    print_columns(head, cells, 13, 12)
    for ak in (v for v in table if v.startswith("alignkit")):
        for ref in (v for v in table if v.startswith("trl")):
            thr = {k: table[ref][k] / table[ak][k] for k in ("wall", "cpu")}  # steps/s ratio = inverse time ratio
            memr = table[ak]["peak"] / table[ref]["peak"]
            print(
                f"{ak}/{ref}: steps/s {thr['cpu']:.2f}x (CPU time), {thr['wall']:.2f}x (wall) "
                f"(goal >= 4x: {'met' if min(thr.values()) >= 4 else 'MISSED'}); peak memory {memr:.2f}x "
                f"(goal <= 0.5x: {'met' if memr <= 0.5 else 'MISSED'})"
            )

    if a.profile:
        p = run_child(__file__, ["--child", "profile", *common])
        print_profile(p, f"\nalignkit step profile (CPU s, median of {a.steps}):", "for comparison, same batch:", 58)


if __name__ == "__main__":
    main()
