"""Your own SimPO + SFT training loop, built from alignkit's parts (no alignkit trainer).

Shows: a tiny random Llama with alignkit's byte tokenizer learning to double 3-digit numbers in ChatML;
preference pairs built here (chosen = the right double, rejected = a near miss) tokenized by `tokenize_pairs`
and batched by `collate_pairs`; per-sequence log-probs from alignkit's scoring; `simpo_loss` plus a chosen-NLL
(SFT) term, both with explicit normalisers so that gradient accumulation gives the full-batch gradient; your own
AdamW; `save_checkpoint`, then a plain `transformers.AutoModelForCausalLM.from_pretrained` of the result.

Run:  python examples/custom_loop_simpo_sft.py --steps 150 --out runs/example_simpo
The last line is `RESULT {...}` (JSON): held-out SimPO pair accuracy and reward margin before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from alignkit.checkpoint import save_checkpoint
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.preference import collate_pairs, tokenize_pairs
from alignkit.losses.preference import simpo_loss
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.ops import split_pairs
from alignkit.scoring import batch_sequence_logps

BETA, MARGIN, SFT_COEF = 2.0, 0.5, 1.0  # SimPO's β and γ act on token-mean log-probs
PAIRS, MICRO = 32, 16  # pairs per optimizer step, pairs per forward (MICRO < PAIRS: gradient accumulation)


def make_pairs(numbers: list[int], seed: int) -> list[dict[str, Any]]:
    """One pair per number: the right double against a typical slip (a dropped carry, an odd last digit)."""
    rng = random.Random(seed)
    rows = []
    for a in numbers:
        wrong = max(0, 2 * a + rng.choice([-100, -10, -1, 1, 10, 100]))
        wrong = wrong if wrong != 2 * a else 2 * a + 1
        user, ans = {"role": "user", "content": f"2*{a}"}, lambda x: [{"role": "assistant", "content": str(x)}]
        rows.append({"prompt": [user], "chosen": ans(2 * a), "rejected": ans(wrong)})
    return rows


def mean_logps(model: torch.nn.Module, pairs: list[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Token-mean completion log-probs (chosen, rejected), the quantity SimPO compares, plus the chosen sums."""
    batch = collate_pairs(pairs, pad_token_id=pad_id)  # 2P rows: chosen 0..P-1, then rejected
    out = batch_sequence_logps(model, batch)
    mean = out["sum"] / out["n_tokens"].clamp_min(1)
    (c, r), (c_sum, _) = split_pairs(mean), split_pairs(out["sum"])
    return c, r, c_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: list[dict[str, Any]], pad_id: int) -> dict[str, float]:
    model.eval()
    c, r, _ = mean_logps(model, pairs, pad_id)
    _, m = simpo_loss(c, r, beta=BETA, margin=MARGIN, normalizer="local")  # reuse its metrics (β·π̄ rewards)
    model.train()
    return {"accuracy": float(m["rewards/accuracies"]), "margin": float(m["rewards/margins"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="runs/example_simpo")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()  # no save/load bars in the example's output

    tok = byte_tokenizer()
    config = tiny_llama_config(len(tok), hidden=64, layers=2, heads=4, kv_heads=4)
    config.eos_token_id, config.pad_token_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    model = build_tiny_model(config, seed=0)
    numbers = random.Random(0).sample(range(1000), 1000)
    train_pairs, _ = tokenize_pairs(tok, make_pairs(numbers[200:], seed=1), chat_format="chatml")
    eval_pairs, _ = tokenize_pairs(tok, make_pairs(numbers[:200], seed=2), chat_format="chatml")
    before = evaluate(model, eval_pairs, tok.pad_token_id)
    print(f"held-out before: pair accuracy {before['accuracy']:.3f}, margin {before['margin']:+.3f}")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(0)
    for step in range(1, args.steps + 1):
        step_pairs = rng.sample(train_pairs, PAIRS)
        # Normalisers over the WHOLE optimizer step: summing the micro-batch losses then equals the full-batch
        # loss, whatever the split. SimPO's unit is the pair; the NLL's unit is the chosen completion token.
        n_pairs, n_chosen_tokens = len(step_pairs), sum(sum(x != -100 for x in p["chosen_labels"]) for p in step_pairs)
        step_pref = step_nll = 0.0
        for i in range(0, n_pairs, MICRO):
            c, r, c_sum = mean_logps(model, step_pairs[i : i + MICRO], tok.pad_token_id)
            pref, _ = simpo_loss(c, r, beta=BETA, margin=MARGIN, normalizer=n_pairs)
            nll = -c_sum.sum() / n_chosen_tokens
            (pref + SFT_COEF * nll).backward()
            step_pref, step_nll = step_pref + float(pref.detach()), step_nll + float(nll.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  simpo loss {step_pref:.3f}  chosen nll/token {step_nll:.3f}")

    after = evaluate(model, eval_pairs, tok.pad_token_id)
    ckpt = save_checkpoint(args.out, args.steps, model=model, tokenizer=tok, optimizer=opt)
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)  # a plain HF folder: transformers alone loads it
    again = evaluate(reloaded, eval_pairs, tok.pad_token_id)
    assert abs(again["margin"] - after["margin"]) < 1e-4, (again, after)
    print(f"held-out after:  pair accuracy {after['accuracy']:.3f}, margin {after['margin']:+.3f}")
    print(f"saved {ckpt}; AutoModelForCausalLM reload scores the same: accuracy {again['accuracy']:.3f}")
    result = {"before": before["accuracy"], "after": after["accuracy"], "margin_before": before["margin"]}
    result |= {"margin_after": after["margin"], "checkpoint": str(ckpt), "seconds": time.perf_counter() - t0}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
