"""VLM SFT step time and peak memory: alignkit ``train_sft`` vs TRL 1.16 ``SFTTrainer`` on the same tiny LLaVA.

    python benchmarks/vlm_sft_vs_trl.py [--steps 3] [--warmup 1] [--runs 2] [--threads 1]

Needs the bench extra (trl, accelerate) in the running venv.

Workload (identical for both): a LLaVA built from configs (CLIP vision tower: image 64 px, patch 8 -> 64 image
tokens per image, hidden 128, 2 layers; projector; Llama: hidden 256, 4 layers, 4 heads, MLP 1024; vocab = the
conformance kit's Llama 2 tokenizer + ``<image>`` = 32,001), random init with seed 0, fp32 on CPU, sdpa attention,
AdamW lr 2e-5, grad-norm clip 1.0, constant schedule. Data: the first 8 rows of ``shared/data/vlm_flags`` (one
flag image + a question, the country as the answer) with TRL's row format (``images`` + ``messages`` of content
parts), 8 rows per optimizer step. Chat template: LLaVA-1.5's official processor template (from the conformance
kit); alignkit renders it with its ``llava-1.5`` format, TRL through ``LlavaProcessor.apply_chat_template``.

Variants:
* ``alignkit``: ``train_sft`` (rows tokenized once, images expanded to 64 ``<image>`` tokens, assistant text
  trained; the 8 rows packed into one row of at most max_length with positions restarting per row; log-probs only
  at trained positions through the chunked LM head).
* ``trl``: ``SFTTrainer`` with ``processing_class=LlavaProcessor`` (its vision path:
  ``DataCollatorForVisionLanguageModeling``, right-padded batches of 8, image processing in the collator every
  step), ``gradient_checkpointing=False`` and ``bf16=False`` set explicitly, TRL's other defaults (it trains every
  non-pad token: TRL 1.16 has no assistant-only masking for images here).

Timing and memory as in ``sft_vs_trl.py``: the time between the ends of consecutive optimizer steps, the first
(warm-up) step dropped (alignkit also drops its last, which writes the final checkpoint); each variant ``--runs``
times in fresh subprocesses, interleaved; medians over all timed steps; wall and process CPU time (the machine is
shared, CPU time is the steadier clock). Peak memory: VmHWM above the RSS after model and data exist.
Throughput is rows (images) per second; the ratio line compares CPU time and wall time.

Last measured (2 shared CPU cores, --threads 1, torch 2.13 CPU, transformers 5.25, trl 1.16; ``--runs 3
--steps 3``, 88 s):

    variant     wall s/step rows/s (wall)    CPU s/step  rows/s (CPU)       peak MB
    alignkit           0.61          13.1          0.61          13.1           514
    trl                2.13           3.8          2.13           3.8          1150
    alignkit/trl: throughput 3.47x (CPU time), 3.47x (wall) (goal >= 2x: met); peak memory 0.45x (goal <= 0.6x: met)

  Where the difference comes from (not separately profiled here): TRL's collator runs the image processor and the
  processor's chat template on every batch and scores every position through full ``[B, T, V]`` logits; alignkit
  tokenizes once, decodes and processes the images per micro-batch, packs, and projects only trained positions
  through the chunked LM head.
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
    clock,
    llama2_tokenizer,
    load_jsonl,
    pooled_medians,
    print_columns,
    run_variants,
    shared_dir,
    step_result,
    step_times,
    trl_step_timer,
)

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 8
LR = 2e-5
MAX_LENGTH = 1024


def llava_template() -> str:
    return (shared_dir("conformance") / "conformance" / "vlm" / "templates" / "llava-1.5.jinja").read_text()


def rows() -> list[dict]:
    folder = shared_dir("data") / "data" / "vlm_flags"
    out = []
    for r in load_jsonl(folder / "vlm_flags.jsonl")[:N_ROWS]:
        out.append({"images": [str(folder / p) for p in r["images"]], "messages": r["messages"]})
    return out


def tokenizer():  # noqa: ANN201
    tok = llama2_tokenizer(llava_template())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def model(tok):  # noqa: ANN001, ANN201
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=128)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=2048,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    image = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", image_seq_length=64)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")


def processor(tok, mdl):  # noqa: ANN001, ANN201
    sys.path.insert(0, str(ROOT))
    from alignkit import vision

    vp = vision.VisionProcessor.for_model(mdl, tok)
    proc = vp.family.hf_processor(vp.image_processor, tok, mdl.config)
    proc.chat_template = llava_template()
    return proc


def run_alignkit(data, tok, mdl, steps: int, warmup: int, mem: PeakRSS) -> dict:  # noqa: ANN001
    from alignkit.loops.sft import SFTConfig, train_sft

    total = warmup + steps + 1  # the last step's interval holds the final checkpoint write: dropped
    marks, peak = [], {}

    def cb(step: int, record: dict) -> None:
        marks.append(clock())
        if step == warmup + steps:
            peak["mb"] = mem.peak_mb()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(output_dir=tmp, chat_format="llava-1.5", max_length=MAX_LENGTH, packing=True,
                        batch_size=N_ROWS, epochs=float(total), lr=LR, **ALIGNKIT_CPU_ARGS)  # fmt: skip
        mem.reset()
        marks.append(clock())
        summary = train_sft(cfg, model=mdl, tokenizer=tok, train_data=data, callbacks=[cb])
    assert summary["steps"] == total, summary
    return step_result(marks, warmup, steps, peak["mb"])


def run_trl(data, tok, mdl, steps: int, warmup: int, mem: PeakRSS) -> dict:  # noqa: ANN001
    import datasets
    from trl import SFTConfig, SFTTrainer

    total = warmup + steps
    marks, peak = [], {}
    timer = trl_step_timer(marks, mem, total, peak)
    proc = processor(tok, mdl)
    ds = datasets.Dataset.from_list(data * total).cast_column("images", datasets.Sequence(datasets.Image()))
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=N_ROWS, max_steps=total, learning_rate=LR,
                         max_length=MAX_LENGTH, gradient_checkpointing=False, **TRL_CPU_ARGS)  # fmt: skip
        mem.reset()
        trainer = SFTTrainer(model=mdl, args=args, train_dataset=ds, processing_class=proc)
        trainer.add_callback(timer)
        trainer.train()
    return step_result(marks, warmup, steps, peak["mb"])


def child(variant: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    if variant == "alignkit":
        import alignkit.loops.sft  # noqa: F401
    else:
        import trl  # noqa: F401
        from trl import SFTTrainer  # noqa: F401
    tok = tokenizer()
    data = rows()
    mdl = model(tok)
    mem = PeakRSS()
    res = (run_alignkit if variant == "alignkit" else run_trl)(data, tok, mdl, steps, warmup, mem)
    res["method"] = mem.method
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="fresh subprocesses per variant, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child process (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup, a.threads)))
        return
    print(f"workload: {N_ROWS} flag rows/step (1 image each, 64 image tokens), tiny LLaVA; "
          f"{a.warmup} warm-up + {a.steps} timed steps x {a.runs} runs per variant")  # fmt: skip
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    t0 = time.perf_counter()
    results = run_variants(__file__, ["alignkit", "trl"], a.runs, common, step_times, width=9)
    med = {v: {**pooled_medians(runs, ("wall", "cpu")), "peak": statistics.median(r["peak_mb"] for r in runs)}
           for v, runs in results.items()}  # fmt: skip
    print(f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s")
    cells = {v: [f"{x['wall']:.2f}", f"{N_ROWS / x['wall']:.1f}", f"{x['cpu']:.2f}", f"{N_ROWS / x['cpu']:.1f}",
                 f"{x['peak']:.0f}"] for v, x in med.items()}  # fmt: skip
    print_columns(("wall s/step", "rows/s (wall)", "CPU s/step", "rows/s (CPU)", "peak MB"), cells, 9, 13)
    ak, trl = med["alignkit"], med["trl"]
    thr = {k: trl[k] / ak[k] for k in ("wall", "cpu")}
    memr = ak["peak"] / trl["peak"]
    print(f"alignkit/trl: throughput {thr['cpu']:.2f}x (CPU time), {thr['wall']:.2f}x (wall) "
          f"(goal >= 2x: {'met' if min(thr.values()) >= 2 else 'MISSED'}); peak memory {memr:.2f}x "
          f"(goal <= 0.6x: {'met' if memr <= 0.6 else 'MISSED'})")  # fmt: skip


if __name__ == "__main__":
    main()
