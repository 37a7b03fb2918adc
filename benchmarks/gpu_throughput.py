"""SFT, DPO and GRPO on one accelerator, alignkit vs TRL 1.16 on the same work: throughput, peak memory, MFU, ratios.

A random-init model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate
4864, tied embeddings, vocabulary 151,936; the byte tokenizer's ids, so no hub download), sdpa attention,
bf16 on CUDA (alignkit ``precision=bf16-mixed``, TRL ``bf16=True``), AdamW lr 1e-5 constant, clip 1.0, no
activation checkpointing on either side (TRL's default is on: set off). Each (loop, implementation) runs in its own
child process; the parent prints one line per run, the ratios and a JSON summary. ``benchmarks/gpu_check.sh`` runs
it on a GPU machine; ``--shape tiny --device cpu`` is the smoke test on a CPU (tiny shapes, fp32, a few steps).

    python benchmarks/gpu_throughput.py [--loops sft,dpo,grpo] [--impls alignkit,trl] [--steps 12] [--shape tiny]
                                        [--device cuda]

The work (identical for both implementations; the demo task's byte-level chat rows, 8 problems per row):
* ``sft``: 500 multi-turn rows, assistant turns trained. alignkit: ``train_sft``, packing (padding-free rows of
  4,096 tokens, 16 rows per step). TRL: ``SFTTrainer`` with ``assistant_only_loss`` (a ChatML template with
  ``{% generation %}`` markers), ``packing=True`` + ``packing_strategy="bfd"`` (its padding-free packing),
  ``max_length=4096``, one packed sequence per step. Throughput = trained (assistant) tokens per second, each side
  counting the labels it trains on.
* ``dpo``: 8 pairs per step (the rows' last answer chosen, reversed rejected), sigmoid loss, beta 0.1, reference
  log-probs precomputed before the first step on both sides. Throughput = pairs per second.
* ``grpo``: 8 prompts x 8 completions per step, 128 new tokens at temperature 1 (HF generation on both sides),
  ``math_answer`` reward, one optimizer step per generation round, no KL term (beta 0, TRL's default). Throughput =
  completions per second.

Timing: the interval between consecutive optimizer-step ends (callbacks, after ``torch.cuda.synchronize``); the first
interval is a warm-up and dropped; medians over the rest. Memory: ``torch.cuda.max_memory_allocated`` at the end of
the run (weights, gradients, optimizer state and activations alike; both sides hold the same model). MFU (alignkit's
``mfu`` metric, where the card's peak is known) is the backbone's model FLOPs per token over the card's bf16 peak.

``alignkit-compile`` (``--impls``) is alignkit with ``compile=true`` (each decoder layer through ``torch.compile``).

Goals (issue "Every loop on a GPU"): SFT >= 1.5x TRL's throughput at <= 0.7x its peak memory; DPO and GRPO >= 1.5x.
Not yet run on a GPU: no GPU machine has been lent to the task that wrote this. ``--shape tiny --device cpu`` passes.
On the CPU (2 shared cores, one thread, fp32, ``--shape small``: hidden 256 x 4 layers, 32,000-row head; 3 timed
steps, one run each): SFT 117 vs 27.6 trained tokens/s (4.23x TRL), DPO 5.5 vs 0.5 pairs/s (11.7x). ``compile=true``
on SFT at hidden 256 x 4 layers (with the byte vocabulary's 259-row head): 0.96x / 1.02x the throughput of alignkit
without it in two runs, i.e. no gain on the CPU at this size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import CHATML_GEN

REPO = Path(__file__).resolve().parents[1]
LR = 1e-5
PAIRS, PROMPTS, GROUP = 8, 8, 8  # DPO pairs per step; GRPO prompts per step and completions per prompt
UNITS_PER_STEP = {"dpo": float(PAIRS), "grpo": float(PROMPTS * GROUP)}  # SFT counts its trained tokens instead


def model_config(shape: str):  # noqa: ANN201
    from transformers import Qwen2Config

    from alignkit.data.byte_tokenizer import byte_tokenizer

    vocab = len(byte_tokenizer())
    if shape == "tiny":
        return Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)  # fmt: skip
    if shape == "small":  # the CPU benchmarks' size (hidden 256, 4 layers, a 32,000-row head)
        return Qwen2Config(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=1024, tie_word_embeddings=True)  # fmt: skip
    # Qwen2.5-0.5B's vocabulary width too: the byte tokenizer's ids use the first rows, but the LM head (and the
    # logits a full-vocabulary loss builds) cost what they cost in the real model
    return Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                       max_position_embeddings=4096)  # fmt: skip


def workload(shape: str) -> dict:
    """The rows of each loop (the same for both implementations)."""
    from alignkit.demo import make_rows

    base = make_rows(4000, 3, seed=0)
    conversations = [{"messages": [m for r in base[i : i + 8] for m in r["messages"]]}
                     for i in range(0, len(base) - 7, 8)]  # fmt: skip
    pairs = [{"prompt": c["messages"][:-1], "chosen": [c["messages"][-1]],
              "rejected": [{"role": "assistant", "content": c["messages"][-1]["content"][::-1]}]}
             for c in conversations]  # fmt: skip
    prompts = [{"prompt": [{"role": "user", "content": f"2*{a}"}], "answer": str(2 * a)} for a in range(64)]
    return {"sft": conversations, "dpo": pairs, "grpo": prompts, "max_new": 128 if shape == "qwen0.5b" else 32}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summary(loop: str, impl: str, marks: list[float], per_step: list[float], device: str, mfu: list[float]) -> dict:
    import torch

    steps = [b - a for a, b in zip(marks, marks[1:])][1:] or [marks[-1] - marks[0]]  # the first interval: warm-up
    units = per_step[2 : 2 + len(steps)] or per_step[-len(steps) :]  # what the timed steps did
    step_s = statistics.median(steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"loop": loop, "impl": impl, "step_time_s": step_s, "per_step": statistics.median(units),
            "throughput": statistics.median(units) / step_s, "peak_allocated_gb": peak,
            "mfu": statistics.median(mfu) if mfu else None, "timed_steps": len(steps)}  # fmt: skip


def child_alignkit(loop: str, steps: int, shape: str, device: str, out: str, compile: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from alignkit.data.byte_tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(model_config(shape), attn_implementation="sdpa")
    work = workload(shape)
    marks, per_step, mfu = [], [], []

    def cb(step: int, record: dict) -> None:
        sync(device)
        marks.append(time.perf_counter())
        per_step.append(float(record["num_trained_tokens"]) if loop == "sft" else UNITS_PER_STEP[loop])
        if record.get("mfu") is not None:
            mfu.append(record["mfu"])

    common = dict(output_dir=out, device=device, precision="bf16-mixed" if device.startswith("cuda") else "fp32",
                  max_steps=steps, progress=False, chat_format="chatml", overwrite=True, lr=LR, schedule="constant",
                  warmup_steps=0, keep_last=1, compile=compile)  # fmt: skip
    if loop == "sft":
        from alignkit.loops.sft import SFTConfig, train_sft

        cfg = SFTConfig(**common, batch_size=16, packing=True, pack_tokens=4096, max_length=4096, epochs=100)
        train_sft(cfg, model=model, tokenizer=tok, train_data=work["sft"], callbacks=[cb])
    elif loop == "dpo":
        from alignkit.loops.dpo import DPOConfig, train_dpo

        cfg = DPOConfig(**common, batch_size=PAIRS, beta=0.1, epochs=100,
                        reference_cache_dir=str(Path(out) / "cache"))  # fmt: skip
        train_dpo(cfg, model=model, tokenizer=tok, train_data=work["dpo"], callbacks=[cb])
    else:
        from alignkit.loops.grpo import GRPOConfig, train_grpo

        cfg = GRPOConfig(**common, group_size=GROUP, prompts_per_step=PROMPTS, max_new_tokens=work["max_new"],
                         temperature=1.0, micro_batch_size=PROMPTS * GROUP, kl_coef=0.0)  # fmt: skip
        train_grpo(cfg, model=model, tokenizer=tok, train_data=work["grpo"], reward_funcs=["math_answer"],
                   callbacks=[cb])  # fmt: skip
    return summary(loop, "alignkit-compile" if compile else "alignkit", marks, per_step, device, mfu)


def child_trl(loop: str, steps: int, shape: str, device: str, out: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.reward_funcs.math import math_answer_reward

    tok = byte_tokenizer()
    tok.chat_template = CHATML_GEN
    model = AutoModelForCausalLM.from_config(model_config(shape), attn_implementation="sdpa")
    work = workload(shape)
    marks: list[float] = []
    per_step: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ANN003
            sync(device)
            marks.append(time.perf_counter())

    on_cuda = device.startswith("cuda")
    common = dict(output_dir=out, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0,
                  bf16=on_cuda, use_cpu=not on_cuda, gradient_checkpointing=False, report_to="none",
                  save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)  # fmt: skip
    if loop == "sft":
        from trl import SFTConfig, SFTTrainer

        class CountingSFT(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
                if model.training:
                    per_step.append(float((inputs["labels"] != -100).sum()))
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        args = SFTConfig(**common, per_device_train_batch_size=1, packing=True, packing_strategy="bfd",
                         max_length=4096, assistant_only_loss=True)  # fmt: skip
        trainer = CountingSFT(model=model, args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_list(work["sft"]))  # fmt: skip
    elif loop == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, per_device_train_batch_size=PAIRS, beta=0.1, loss_type=["sigmoid"],
                         precompute_ref_log_probs=True, max_length=4096)  # fmt: skip
        trainer = DPOTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(work["dpo"]))  # fmt: skip
    else:
        from trl import GRPOConfig, GRPOTrainer

        def math_answer(prompts, completions, completion_ids, answer, **kw):  # noqa: ANN001, ANN201, ANN003
            return math_answer_reward(prompts, completions, completion_ids, answer=answer)

        args = GRPOConfig(**common, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                          max_completion_length=work["max_new"], temperature=1.0, beta=0.0, use_vllm=False)  # fmt: skip
        trainer = GRPOTrainer(model=model, args=args, processing_class=tok, reward_funcs=[math_answer],
                              train_dataset=datasets.Dataset.from_list(work["grpo"]))  # fmt: skip
    if loop != "sft":
        per_step.extend([UNITS_PER_STEP[loop]] * (steps + 2))
    trainer.add_callback(Timer())
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return summary(loop, "trl", marks, per_step, device, [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loops", default="sft,dpo,grpo")
    ap.add_argument("--impls", default="alignkit,trl", help="alignkit, alignkit-compile (compile=true), trl")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument(
        "--shape",
        choices=("qwen0.5b", "small", "tiny"),
        default="qwen0.5b",
        help="model shapes: Qwen2.5-0.5B's, hidden 256 x 4 layers, or tiny (a CPU smoke test)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per child run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        loop, impl, out = args.child.split(":", 2)
        if impl == "trl":
            result = child_trl(loop, args.steps, args.shape, args.device, out)
        else:
            result = child_alignkit(loop, args.steps, args.shape, args.device, out, compile=impl == "alignkit-compile")
        print("RESULT " + json.dumps(result))
        return
    results: dict[tuple[str, str], dict] = {}
    unit = {"sft": "trained tokens/s", "dpo": "pairs/s", "grpo": "completions/s"}
    with tempfile.TemporaryDirectory() as tmp:
        for loop in args.loops.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--child", f"{loop}:{impl}:{tmp}/{loop}-{impl}", "--steps",
                       str(args.steps), "--device", args.device, "--shape", args.shape]  # fmt: skip
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
                    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                    failed = p.returncode != 0 or not line
                    tail = p.stderr[-3000:]
                except subprocess.TimeoutExpired:
                    failed, tail = True, f"timed out after {args.timeout} s"
                if failed:
                    print(f"{loop} {impl}: FAILED\n{tail}", flush=True)
                    results[loop, impl] = {"loop": loop, "impl": impl, "failed": True}
                    continue
                r = results[loop, impl] = json.loads(line[-1][7:])
                mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
                mem = f"{r['peak_allocated_gb']:.2f} GB" if r["peak_allocated_gb"] else "n/a"
                print(f"{loop} {impl}: {r['throughput']:.1f} {unit[loop]}, {r['step_time_s']:.3f} s/step, MFU {mfu}, "
                      f"peak {mem} ({r['timed_steps']} timed steps)", flush=True)  # fmt: skip
            t = results.get((loop, "trl"))
            for impl in ("alignkit", "alignkit-compile"):
                a = results.get((loop, impl))
                if a and t and not a.get("failed") and not t.get("failed"):
                    mem = (f", peak memory {a['peak_allocated_gb'] / t['peak_allocated_gb']:.2f}x TRL's"
                           if a["peak_allocated_gb"] and t["peak_allocated_gb"] else "")  # fmt: skip
                    print(f"{loop}: {impl} {a['throughput'] / t['throughput']:.2f}x TRL's throughput{mem}", flush=True)
    print("SUMMARY " + json.dumps(list(results.values())))
    if any(r.get("failed") for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
