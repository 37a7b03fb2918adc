"""alignkit's SFT, DPO and GRPO on one accelerator: tokens/s, peak memory and an MFU estimate per loop.

A random-init model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate
4864, vocab 151,936, tied embeddings), bf16-mixed, the byte-level chat data of the demo task made longer, run
through the real loops (`train_sft`, `train_dpo`, `train_grpo` with HF generation). Each loop runs in its own
child process; the script prints one line per loop and a JSON summary. `benchmarks/gpu_check.sh` runs it on a
GPU machine; `--tiny --device cpu` is the smoke test on a CPU (tiny shapes, a few steps).

    python benchmarks/gpu_throughput.py [--loops sft,dpo,grpo] [--steps 20] [--tiny] [--device cuda]

TRL's side of the comparison (SFTTrainer with bf16 and padding-free packing, DPOTrainer, GRPOTrainer on the same
work) is not written yet: see the open GPU issue.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_config(tiny: bool):  # noqa: ANN201
    from transformers import Qwen2Config

    from alignkit.data.byte_tokenizer import byte_tokenizer

    vocab = len(byte_tokenizer())
    if tiny:
        return Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)  # fmt: skip
    # Qwen2.5-0.5B's shapes, but the byte tokenizer's vocabulary (no hub download): the LM head is then small,
    # so MFU here is the backbone's
    return Qwen2Config(vocab_size=vocab, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                       max_position_embeddings=4096)  # fmt: skip


def child(loop: str, steps: int, tiny: bool, device: str, out: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.demo import make_rows
    from alignkit.metrics import read_metrics

    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(model_config(tiny), attn_implementation="sdpa")
    # longer conversations than the demo's: several problems per row
    base = make_rows(4000, 3, seed=0)
    rows = [{"messages": [m for r in base[i : i + 8] for m in r["messages"]]} for i in range(0, len(base), 8)]
    common = dict(output_dir=out, device=device, precision="bf16-mixed", max_steps=steps, progress=False,
                  chat_format="chatml", overwrite=True)  # fmt: skip
    if loop == "sft":
        from alignkit.loops.sft import SFTConfig, train_sft

        cfg = SFTConfig(**common, batch_size=16, packing=True, pack_tokens=16 * 512, max_length=1024, lr=1e-5)
        train_sft(cfg, model=model, tokenizer=tok, train_data=rows)
    elif loop == "dpo":
        from alignkit.loops.dpo import DPOConfig, train_dpo

        pairs = [{"prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
                  "rejected": [{"role": "assistant", "content": r["messages"][-1]["content"][::-1]}]}
                 for r in rows]  # fmt: skip
        cfg = DPOConfig(**common, batch_size=8, reference_cache_dir=str(Path(out) / "cache"))
        train_dpo(cfg, model=model, tokenizer=tok, train_data=pairs)
    else:
        from alignkit.loops.grpo import GRPOConfig, train_grpo

        prompts = [{"prompt": [{"role": "user", "content": f"2*{a}"}], "answer": str(2 * a)} for a in range(64)]
        new = 32 if tiny else 128
        cfg = GRPOConfig(**common, group_size=8, prompts_per_step=8, max_new_tokens=new, micro_batch_size=64)
        train_grpo(cfg, model=model, tokenizer=tok, train_data=prompts, reward_funcs=["math_answer"])
    recs = read_metrics(out)[1:] or read_metrics(out)  # the first step includes warm-up work
    med = lambda k: sorted(r.get(k, 0.0) for r in recs)[len(recs) // 2]  # noqa: E731
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"loop": loop, "tokens_per_s": med("tokens_per_s"), "step_time_s": med("step_time_s"),
            "mfu": med("mfu") if "mfu" in recs[-1] else None, "peak_allocated_gb": peak}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loops", default="sft,dpo,grpo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        loop, out = args.child.split(":", 1)
        print("RESULT " + json.dumps(child(loop, args.steps, args.tiny, args.device, out)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for loop in args.loops.split(","):
            cmd = [sys.executable, __file__, "--child", f"{loop}:{tmp}/{loop}", "--steps", str(args.steps),
                   "--device", args.device] + (["--tiny"] if args.tiny else [])  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{loop}: FAILED (exit {p.returncode})\n{p.stderr[-3000:]}")
                results.append({"loop": loop, "failed": True})
                continue
            r = json.loads(line[-1][7:])
            results.append(r)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
            mem = f"{r['peak_allocated_gb']:.2f} GB" if r["peak_allocated_gb"] else "n/a"
            print(f"{loop}: {r['tokens_per_s']:.0f} tokens/s, {r['step_time_s']:.3f} s/step, MFU {mfu}, peak {mem}")
    print("SUMMARY " + json.dumps(results))
    if any(r.get("failed") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
