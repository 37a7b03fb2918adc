"""What activation checkpointing costs the RL loops: shared-prompt scoring vs its padded fallback (alignkit only).

    python benchmarks/rl_checkpointing.py [--runs 2] [--steps 4] [--prompt-tokens 256] [--new 32]

Shared-prompt scoring (``shared_prefix=true``, the default) runs a group's prompt once and its completions on the
prompt's KV cache. Activation checkpointing turns the cache off, so with ``gradient_checkpointing=true`` the GRPO
loop scores padded prompt + completion rows instead (the prompt recomputed for every completion, and again in the
backward). This measures the training part of a GRPO step (step time minus generation and reward time) and the
peak memory of three settings on the same work:

* ``shared``: shared-prompt scoring, no checkpointing (the default);
* ``padded``: ``shared_prefix=false``, no checkpointing (what the fallback scores, without recomputation);
* ``ckpt``: ``gradient_checkpointing=true`` (the fallback: padded rows, layers recomputed in the backward).

Workload: the CPU benchmarks' Llama shape (hidden 256, 4 layers, vocabulary 32,000, seed 0), fp32, one thread;
byte-level prompts of ``--prompt-tokens`` tokens, 4 prompts x 8 completions of ``--new`` sampled tokens per step
(the HF backend; a random model rarely stops early). Each setting runs ``--runs`` times in fresh subprocesses,
interleaved; medians over the timed steps (the first step is a warm-up). Peak memory: the process's RSS high-water
mark above its RSS once the model exists (``_common.PeakRSS``).

Last measured (2 shared CPU cores, torch 2.13 CPU, ``--runs 2 --steps 3``):

    | setting | train s/step | vs shared | peak MB |
    | shared  | 1.973        | 1.00x     | 1052    |
    | padded  | 4.910        | 2.49x     | 2201    |
    | ckpt    | 6.620        | 3.36x     | 1172    |
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from _common import PeakRSS, print_table

SETTINGS = {
    "shared": dict(shared_prefix=True, gradient_checkpointing=False),
    "padded": dict(shared_prefix=False, gradient_checkpointing=False),
    "ckpt": dict(shared_prefix=True, gradient_checkpointing=True),
}


def child(setting: str, steps: int, prompt_tokens: int, new: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.loops.grpo import GRPOConfig, train_grpo

    torch.set_num_threads(1)
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=1024, max_position_embeddings=2048,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))  # fmt: skip
    words = "the quick brown fox jumps over the lazy dog and keeps running far away "
    rows = [{"prompt": (f"{i}: " + words * 64)[:prompt_tokens]} for i in range(16)]
    mem = PeakRSS()
    train_s: list[float] = []

    def cb(step: int, rec: dict) -> None:
        train_s.append(rec["step_time_s"] - rec.get("gen_time_s", 0.0) - rec.get("reward_time_s", 0.0))

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, group_size=8, prompts_per_step=4, max_new_tokens=new, max_steps=steps + 1,
                         micro_batch_size=32, max_prompt_length=None, progress=False, lr=1e-5,
                         **SETTINGS[setting])  # fmt: skip
        mem.reset()
        train_grpo(cfg, model=model, tokenizer=tok, train_data=rows,
                   reward_funcs=[lambda completions, **kw: [float(len(c)) for c in completions]],
                   callbacks=[cb])  # fmt: skip
    return {"train_s": train_s[1:], "peak_mb": mem.peak_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.prompt_tokens, args.new)))
        return
    results: dict[str, list[dict]] = {k: [] for k in SETTINGS}
    for _ in range(args.runs):
        for setting in SETTINGS:
            cmd = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps), "--prompt-tokens",
                   str(args.prompt_tokens), "--new", str(args.new)]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{setting} failed:\n{p.stderr[-3000:]}")
            results[setting].append(json.loads(line[-1][7:]))
    med = {k: statistics.median(t for r in rs for t in r["train_s"]) for k, rs in results.items()}
    peak = {k: statistics.median(r["peak_mb"] for r in rs) for k, rs in results.items()}
    print(f"workload: 4 prompts x 8 completions, {args.prompt_tokens} prompt + {args.new} new tokens, "
          f"{args.runs} runs x {args.steps} timed steps")  # fmt: skip
    rows = [[k, f"{med[k]:.3f}", f"{med[k] / med['shared']:.2f}x", f"{peak[k]:.0f}"] for k in SETTINGS]
    print_table(["setting", "train s/step", "vs shared", "peak MB"], rows)


if __name__ == "__main__":
    main()
