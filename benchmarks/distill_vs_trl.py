"""Distillation step time and peak memory: alignkit ``train_distill`` vs TRL 1.16 ``DistillationTrainer``.

    python benchmarks/distill_vs_trl.py [--steps 3] [--warmup 1] [--runs 2] [--threads 1] [--beta 0.5]
                                        [--variants alignkit,trl] [--on-policy]

Needs trl 1.16 and accelerate beside alignkit, e.g. ``/work/venv-bench/bin/python benchmarks/distill_vs_trl.py``.
The default run takes ~3-5 min on the shared 2-core machine.

Workload (identical for every variant): student = the Llama-shaped model of ``sft_vs_trl.py`` (hidden 256, 4 layers,
4 heads, MLP 1024, vocab 32,000, untied head, ~20.6M parameters, seed 0); teacher = a wider, deeper Llama (hidden
512, 6 layers, 8 heads, MLP 2048, vocab 32,000, untied, ~58M parameters, seed 1), frozen; fp32 on CPU, sdpa
attention, no activation checkpointing; generalized JSD with ``--beta`` (0.5: JSD), temperature 1, AdamW lr 1e-5
constant, grad-norm clip 1.0. Tokenizer: Llama 2 (32,000 tokens, conformance kit) with a ChatML template (alignkit
detects its ``chatml`` format). Data: the first 8 rows of ``alpaca_cleaned_1000`` whose answer is at most 160
tokens (prompt = the user turn with the generation prompt, completion = the assistant turn and its end marker);
every optimizer step trains on exactly these 8 sequences (one micro-batch of 8), and the completion tokens per step
are asserted equal in every variant.

Variants:
* ``alignkit``: ``train_distill`` with ``lmbda=0`` (the dataset's completions; generation does not enter the step):
  student and teacher backbones on the padded batch, then ``chunked_generalized_jsd_loss`` on the completion
  positions only (token x vocab tiles from both hidden states and heads, exact backward, no ``[N,V]`` logits).
* ``trl``: ``DistillationTrainer`` (always on-policy in 1.16) with its generation replaced by the same dataset
  completions (``_generate_single_turn`` returns them for the prompt ids it is given, which checks that TRL's prompt
  tokens equal alignkit's), so it runs exactly its own scoring and loss: both backbones over the left-padded prompt
  + right-padded completion batch, then its chunked divergence kernel (``trl.kernels.chunked_divergence``), which on
  CPU projects every completion slot (padding included). ``gradient_checkpointing=False`` and ``bf16=False`` are set
  explicitly (TRL's defaults are True), optimizer = transformers' default ``adamw_torch_fused``, no shuffling.
* ``--on-policy`` adds ``alignkit_gen`` (``lmbda=1``, the HF backend, 64 new tokens) and ``trl_gen`` (TRL's own
  ``generate``, ``max_completion_length=64``): generation included. A random student rarely samples an end token,
  so both generate ~64 tokens per completion; the counts are printed, not asserted.

Timing and memory as in ``sft_vs_trl.py``: the time between the ends of consecutive optimizer steps (callbacks); the
first step is a warm-up and is dropped; alignkit runs one extra step that is dropped too (its final checkpoint is
written inside it). Each variant runs ``--runs`` times in fresh subprocesses, interleaved; medians over all timed
steps; wall time beside the process's CPU time (ratios are best read from CPU time on this shared, loaded machine);
``--threads 1`` by default. Peak memory: the kernel's RSS high-water mark reset (``/proc/self/clear_refs``) once
imports, tokenizer, data, student and teacher exist, read at the end of the last timed step: everything training
needs on top of the two models' weights (gradients and AdamW state of the student, ~250 MB in every variant,
activations of both forwards, the loss's tiles or logits).

Last measured (2 CPU cores shared with other jobs, a pytest run beside it, --threads 1, torch 2.13 CPU, transformers
5.25, trl 1.16; default run, beta 0.5, 271 s):

    variant       wall s/step   CPU s/step  tok/s (CPU)      peak MB    compl tok
    alignkit             6.83         3.90          152          772          595
    trl                 19.93        13.29           45         2766          595

    alignkit/trl: throughput 3.40x (CPU time), 2.92x (wall) (goal >= 2x: met); peak memory 0.28x (goal <= 0.5x: met)

  Where alignkit's step goes (CPU s, one profile): student forward 0.26, teacher forward 1.1, loss forward 1.3 and
  backward 1.35 (vocab tiles of 4096: with one 32k-wide tile the loss took 2.2 + 1.8 s and ~1 GB of transient
  tiles), student backbone backward 0.4. Packing the 8 sequences into 4 rows instead of padding them to 8 x 398
  halves both backbones' cost (1201 real tokens of 3184 padded slots).
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
    TRL_CPU_ARGS,
    PeakRSS,
    bench_model,
    clock,
    llama2_tokenizer,
    load_jsonl,
    pooled_medians,
    print_columns,
    run_variants,
    step_result,
    step_times,
    trl_step_timer,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
N_ROWS = 8  # sequences per optimizer step
MAX_ANSWER_TOKENS = 160
GEN_TOKENS = 64  # --on-policy variants
LR = 1e-5
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up (inside each child)
# ---------------------------------------------------------------------------------------------------------------


def tokenizer():  # noqa: ANN201
    return llama2_tokenizer(CHATML)


def teacher_model():  # noqa: ANN201
    sys.path.insert(0, str(ROOT))
    from alignkit.models import build_tiny_model, tiny_llama_config

    cfg = tiny_llama_config(32000, hidden=512, layers=6, heads=8, kv_heads=8, intermediate=2048, max_positions=2048)
    return build_tiny_model(cfg, seed=1, attn_implementation="sdpa")


def rows_and_items(tok, beta: float, lmbda: float):  # noqa: ANN001, ANN201
    """The 8 rows (prompt as messages, completion as messages) and alignkit's DistillItems of them."""
    sys.path.insert(0, str(ROOT))
    from alignkit.loops.distill import DistillConfig, distill_items

    rows = []
    for r in load_jsonl(DATA / "alpaca_cleaned_1000" / "alpaca_cleaned_1000.jsonl"):
        user, answer = r["messages"][0], r["messages"][-1]
        if len(tok(answer["content"], add_special_tokens=False)["input_ids"]) <= MAX_ANSWER_TOKENS:
            rows.append({"prompt": [user], "completion": [answer]})
        if len(rows) == N_ROWS:
            break
    cfg = DistillConfig(output_dir="unused", lmbda=lmbda, beta=beta, max_length=None, max_prompt_length=None)
    return rows, distill_items(rows, tok, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Variants (inside each child): each returns step_result(...)
# ---------------------------------------------------------------------------------------------------------------


def run_alignkit(rows, tok, student, teacher, a, mem: PeakRSS, on_policy: bool) -> dict:  # noqa: ANN001
    from alignkit.loops.distill import DistillConfig, train_distill

    total = a.warmup + a.steps + 1  # the last step's interval holds the final checkpoint write: dropped
    marks, completion, peak = [], [], {}

    def cb(step: int, record: dict) -> None:
        marks.append(clock())
        completion.append(int(record["num_completion_tokens"]))
        if step == a.warmup + a.steps:
            peak["mb"] = mem.peak_mb()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DistillConfig(
            output_dir=tmp, lmbda=1.0 if on_policy else 0.0, beta=a.beta, temperature=1.0, batch_size=N_ROWS,
            micro_batch_size=N_ROWS, max_steps=total, lr=LR, max_length=None, max_prompt_length=None,
            max_new_tokens=GEN_TOKENS, **ALIGNKIT_CPU_ARGS,
        )  # fmt: skip
        mem.reset()
        marks.append(clock())
        train_distill(cfg, model=student, tokenizer=tok, teacher=teacher, teacher_tokenizer=tok, train_data=rows,
                      callbacks=[cb])  # fmt: skip
    return step_result(marks, a.warmup, a.steps, peak["mb"], completion=completion)


def run_trl(rows, items, tok, student, teacher, a, mem: PeakRSS, on_policy: bool) -> dict:  # noqa: ANN001
    import datasets
    from trl import DistillationConfig, DistillationTrainer

    total = a.warmup + a.steps
    marks, completion, peak = [], [], {}
    timer = trl_step_timer(marks, mem, total, peak)
    by_prompt = {tuple(it.prompt_ids): it.completion_ids for it in items}

    class DatasetCompletions(DistillationTrainer):
        """The dataset's completions in place of sampled ones (the rest of TRL's step untouched)."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):  # noqa: ANN001, ANN202
            missing = [p for p in prompt_ids if tuple(p) not in by_prompt]
            assert not missing, "TRL's prompt tokens differ from alignkit's"
            return [list(by_prompt[tuple(p)]) for p in prompt_ids]

    class Counting(DatasetCompletions if not on_policy else DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
            if model.training:
                completion.append(int(inputs["completion_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trl_args = {k: v for k, v in TRL_CPU_ARGS.items() if k != "train_sampling_strategy"}
    with tempfile.TemporaryDirectory() as tmp:
        args = DistillationConfig(
            output_dir=tmp, per_device_train_batch_size=N_ROWS, max_steps=total, learning_rate=LR, beta=a.beta,
            temperature=1.0, max_completion_length=GEN_TOKENS, gradient_checkpointing=False, shuffle_dataset=False,
            **trl_args,
        )  # fmt: skip
        mem.reset()
        trainer = Counting(
            model=student, teacher_model=teacher, args=args, processing_class=tok,
            train_dataset=datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows] * total),
        )  # fmt: skip
        trainer.add_callback(timer)
        trainer.train()
    return step_result(marks, a.warmup, a.steps, peak["mb"], completion=completion)


def child(variant: str, a: argparse.Namespace) -> dict:
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT))
    # import what a variant needs before the memory baseline, so imports do not count as training memory
    import alignkit.loops.distill  # noqa: F401

    if variant.startswith("trl"):
        import trl  # noqa: F401
        from trl import DistillationTrainer  # noqa: F401

    torch.manual_seed(0)
    tok = tokenizer()
    rows, items = rows_and_items(tok, a.beta, 0.0)
    student, teacher = bench_model(), teacher_model()
    mem = PeakRSS()
    on_policy = variant.endswith("_gen")
    if variant.startswith("alignkit"):
        res = run_alignkit(rows, tok, student, teacher, a, mem, on_policy)
    elif variant.startswith("trl"):
        res = run_trl(rows, items, tok, student, teacher, a, mem, on_policy)
    else:
        raise ValueError(variant)
    res["method"] = mem.method
    return res


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="fresh subprocesses per variant, interleaved")
    ap.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (0 forward KL, 1 reverse KL)")
    ap.add_argument("--variants", default="alignkit,trl")
    ap.add_argument("--on-policy", action="store_true", help="also alignkit_gen / trl_gen (generation included)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child process (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        print(json.dumps(child(a.child, a)))
        return

    sys.path.insert(0, str(ROOT))
    tok = tokenizer()
    rows, items = rows_and_items(tok, a.beta, 0.0)
    n_prompt = sum(len(it.prompt_ids) for it in items)
    n_completion = sum(len(it.completion_ids) for it in items)
    variants = [v for v in a.variants.split(",") if v]
    if a.on_policy:
        variants += [v for v in ("alignkit_gen", "trl_gen") if v not in variants]
    print(
        f"workload: {N_ROWS} alpaca rows/step, {n_prompt} prompt + {n_completion} completion tokens; beta {a.beta}; "
        f"{a.warmup} warm-up + {a.steps} timed steps x {a.runs} runs per variant"
    )
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads), "--beta", str(a.beta)]
    t_start = time.perf_counter()
    results = run_variants(__file__, variants, a.runs, common, step_times, width=12)

    rows_out = {}
    for v, runs in results.items():
        counts = sorted({c for r in runs for c in r["completion"]})
        if not v.endswith("_gen"):
            assert counts == [n_completion], f"{v}: completion tokens per step {counts} != {n_completion}"
        rows_out[v] = pooled_medians(runs, ("wall", "cpu"))
        rows_out[v]["peak"] = statistics.median(r["peak_mb"] for r in runs)
        rows_out[v]["tokens"] = statistics.median(c for r in runs for c in r["completion"])
    wall = time.perf_counter() - t_start
    print(f"\ncompletion tokens per step: {n_completion} in the offline variants (asserted); wall time {wall:.0f} s")
    head = ("wall s/step", "CPU s/step", "tok/s (CPU)", "peak MB", "compl tok")
    cells = {
        v: [f"{x['wall']:.2f}", f"{x['cpu']:.2f}", f"{x['tokens'] / x['cpu']:.0f}", f"{x['peak']:.0f}"]
        + [f"{x['tokens']:.0f}"]
        for v, x in rows_out.items()
    }
    print_columns(head, cells, 12, 12)
    for ours, ref, goal in (("alignkit", "trl", True), ("alignkit_gen", "trl_gen", False)):
        if ours not in rows_out or ref not in rows_out:
            continue
        x, y = rows_out[ours], rows_out[ref]
        # throughput per completion token (the on-policy variants may generate different lengths)
        thr = {k: (x["tokens"] / x[k]) / (y["tokens"] / y[k]) for k in ("wall", "cpu")}
        memr = x["peak"] / y["peak"]
        tgoal = f" (goal >= 2x: {'met' if min(thr.values()) >= 2 else 'MISSED'})" if goal else ""
        mgoal = f" (goal <= 0.5x: {'met' if memr <= 0.5 else 'MISSED'})" if goal else ""
        print(f"{ours}/{ref}: throughput {thr['cpu']:.2f}x (CPU time), {thr['wall']:.2f}x (wall){tgoal}; "
              f"peak memory {memr:.2f}x{mgoal}")  # fmt: skip


if __name__ == "__main__":
    main()
