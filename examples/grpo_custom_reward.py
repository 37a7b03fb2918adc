"""GRPO by hand with your own reward function and optimiser, built from alignkit's parts.

A tiny Llama, briefly SFT'd (`train_sft`) to double 3-digit numbers in ChatML, then GRPO written out: `HFGenerator`
samples G completions per prompt, a plain-Python reward scores them, `grpo_advantages` makes group-relative advantages,
`model_token_logps` scores the padded prompt+completion rows (`pad_collate`), and `pg_loss` with an explicit normaliser
(the step's completion-token count, so micro-batches add up to the full-batch loss) drives your own `torch.optim.Adam`.
Run: python examples/grpo_custom_reward.py --steps 60 --out runs/example_grpo   (last line: `RESULT {json}`)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.collate import pad_collate
from alignkit.logprobs import IGNORE_INDEX
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.losses.advantages import grpo_advantages
from alignkit.losses.policy import pg_loss
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.rollout import HFGenerator, Rollouts
from alignkit.scoring import model_token_logps
from alignkit.templates import get_format

G, PROMPTS, MICRO = 8, 16, 64  # group size, prompts per step, completions per forward (< G*PROMPTS: accumulate)
TEMPERATURE, MAX_NEW = 1.0, 8  # sampling temperature (the trainer scores at the same one), completion budget


def chat(a: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"2*{a}"}, {"role": "assistant", "content": str(2 * a)}]


def reward(completion: str, answer: str) -> float:
    """The user's reward: 1 for exactly the right double; else partial credit, up to 0.5, for right digits in the
    right places (aligned on the units). The partial credit gives most groups a spread to learn from."""
    text = completion.strip()
    if text == answer:
        return 1.0
    return 0.5 * sum(x == y for x, y in zip(text[::-1], answer[::-1])) / max(len(text), len(answer), 1)


def rollout(
    gen: HFGenerator, tok: PreTrainedTokenizerBase, numbers: list[int], n: int, seed: int | None = None
) -> tuple[Rollouts, list[float]]:
    """n completions per number (groups contiguous) and their rewards."""
    texts = [get_format("chatml").render(chat(a)[:1], add_generation_prompt=True).text for a in numbers]
    prompts = tok(texts, add_special_tokens=False)["input_ids"]
    ro = gen.generate(prompts, n=n, max_new_tokens=MAX_NEW, temperature=TEMPERATURE, seed=seed)
    texts = tok.batch_decode(ro.completion_ids, skip_special_tokens=True)  # drops the <|im_end|> stop token
    return ro, [reward(t, str(2 * a)) for t, a in zip(texts, [a for a in numbers for _ in range(n)])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--out", default="runs/example_grpo")
    args = ap.parse_args()

    tok = byte_tokenizer()
    config = tiny_llama_config(len(tok), hidden=64, layers=2, heads=4, kv_heads=4)
    config.eos_token_id, config.pad_token_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    model = build_tiny_model(config, seed=0)
    gen = HFGenerator(model, pad_token_id=tok.pad_token_id)  # samples from the training model itself: no syncing
    numbers = random.Random(0).sample(range(1000), 1000)
    train, held_out = numbers[200:], numbers[:200]

    # A short SFT so that some samples are right: GRPO only learns from groups whose rewards differ. Padded
    # batches of short rows: on CPU much cheaper than packed rows, whose attention is dense over each row.
    sft = SFTConfig(output_dir=str(Path(args.out) / "sft"), chat_format="chatml", max_steps=args.sft_steps,
                    lr=5e-3, packing=False, batch_size=32, epochs=100, warmup_steps=10, adam_beta2=0.95,
                    progress=False, overwrite=True)  # fmt: skip
    train_sft(sft, model=model, tokenizer=tok, train_data=[{"messages": chat(a)} for a in train])

    def evaluate() -> tuple[float, float]:  # mean reward and exact-match rate of 4 fixed draws per held-out prompt
        r = torch.tensor(rollout(gen, tok, held_out, n=4, seed=1)[1])
        return float(r.mean()), float((r == 1.0).float().mean())

    before, exact_before = evaluate()
    print(f"after {args.sft_steps} SFT steps: held-out mean reward {before:.3f}, exact {exact_before:.3f} (T=1)")

    opt = torch.optim.Adam(model.parameters(), lr=6e-4, betas=(0.9, 0.99))
    # Linear warmup: Adam's first steps are full-size whatever the gradient, which jolts an SFT'd model.
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    rng = random.Random(0)  # which prompts each step
    torch.manual_seed(0)  # which samples: an unseeded HFGenerator draws from torch's global RNG
    for step in range(1, args.steps + 1):
        ro, rewards = rollout(gen, tok, rng.sample(train, PROMPTS), n=G)
        adv, stats = grpo_advantages(rewards, group_size=G)  # [N]; 0 for groups that were all right / all wrong
        pairs = zip(ro.prompt_ids, ro.completion_ids)  # rows are prompt + completion; only the completion is labelled
        rows = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in pairs]
        n_tokens = sum(len(c) for c in ro.completion_ids)  # token_mean's normaliser: the WHOLE step's tokens
        for mb in (slice(i, i + MICRO) for i in range(0, len(rows), MICRO)):
            b = pad_collate(rows[mb], pad_token_id=tok.pad_token_id)
            out = model_token_logps(model, **b, temperature=TEMPERATURE)  # input_ids, labels, masks, positions
            # One update per batch of samples, so on-policy: old_logp=None (ratio ≡ 1, the REINFORCE gradient).
            loss, _ = pg_loss(out["logps"], None, adv[mb], out["mask"], normalizer=n_tokens, agg="token_mean")
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps:
            flat = stats["frac_reward_zero_std"]
            print(f"step {step:3d}  reward {stats['reward_mean']:.3f}  zero-spread groups {flat:.2f}")

    after, exact_after = evaluate()
    print(f"after {args.steps} GRPO steps: held-out mean reward {after:.3f}, exact {exact_after:.3f} (T=1)")
    result = {"before": before, "after": after, "exact_before": exact_before, "exact_after": exact_after}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
