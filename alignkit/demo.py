"""The embedded default: no downloads, no GPU. A tiny Llama learns to double 3-digit numbers in chat form.

Doubling ("2*478" -> "956") is multi-digit arithmetic with carries that a 1M-parameter model learns in a
few hundred steps; two-operand addition needs several times more compute than a 3-minute CPU demo allows.

`alignkit demo` builds a byte-level tokenizer in code and a tiny model from a config, generates the task,
measures held-out exact-match accuracy, fine-tunes with the SFT loop, measures again, and plots the run.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.templates import get_format

FORMAT = "chatml"


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"  # where the demo writes its runs and demo_result.json
    digits: int = 3  # numbers have up to this many digits
    train_size: int = 800  # distinct training problems (all that are not held out)
    eval_size: int = 200  # held-out problems for the evaluation
    steps: int = 400  # SFT optimizer steps
    batch_size: int = 64  # conversations per SFT step
    lr: float = 2e-3  # SFT learning rate
    hidden: int = 128  # hidden size of the random-init Llama
    layers: int = 4  # its decoder layers
    seed: int = 0  # seeds data, model and sampling
    progress: bool = True  # tqdm progress bars
    grpo_steps: int = 20  # GRPO stage after SFT on the same task (0 = skip); its run goes to OUTPUT_DIR/grpo
    grpo_lr: float = 2e-4  # learning rate of the GRPO stage
    grpo_temperature: float = 2.0  # sampling temperature of the GRPO stage (the SFT model is ~99% right at 1.0)


def make_rows(n: int, digits: int, seed: int, exclude: set[tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """Up to `n` distinct doubling problems as chat rows (fewer if the `digits` range runs out); problems whose
    `pair` (the operand tuple) is in `exclude` are skipped (held-out split). Each row also carries `answer`."""
    rng = random.Random(seed)
    hi = 10**digits - 1
    seen: set[tuple[int, ...]] = set(exclude or ())
    pool = [a for a in range(hi + 1) if (a,) not in seen]
    rng.shuffle(pool)
    rows = []
    for a in pool[:n]:
        answer = str(2 * a)
        rows.append(
            {
                "messages": [{"role": "user", "content": f"2*{a}"}, {"role": "assistant", "content": answer}],
                "pair": [a],
                "answer": answer,
            }
        )
    return rows


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int = 100) -> float:
    """Greedy-decode each prompt and compare the answer text exactly."""
    fmt = get_format(FORMAT)
    model.eval()
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [fmt.render(r["messages"][:1], add_generation_prompt=True).text for r in chunk]
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, enc))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=end_id, pad_token_id=pad
        )
        for r, seq in zip(chunk, out[:, width:].tolist()):
            if end_id in seq:
                seq = seq[: seq.index(end_id)]
            correct += tokenizer.decode(seq) == r["messages"][1]["content"]
    model.train()
    return correct / max(1, len(rows))


def grpo_stage(cfg: DemoConfig, model: torch.nn.Module, tokenizer: Any, train_rows: list, eval_rows: list) -> dict:
    """GRPO on the training problems with the built-in `math_answer` reward, sampling at `grpo_temperature`
    (where the SFT model is often wrong); the mean reward of 4 such samples per held-out problem is measured
    before and after."""
    from alignkit.loops.grpo import GRPOConfig, evaluate_rewards, train_grpo

    def prompts(rows: list) -> list[dict[str, Any]]:
        return [{"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in rows]

    def sampled_reward() -> float:
        kw = dict(n=4, temperature=cfg.grpo_temperature, max_new_tokens=8, chat_format=FORMAT, seed=cfg.seed)
        return evaluate_rewards(model, tokenizer, prompts(eval_rows), ["math_answer"], **kw)["reward"]

    before = sampled_reward()
    grpo = GRPOConfig(
        output_dir=str(Path(cfg.output_dir) / "grpo"),
        overwrite=True,  # rerunning the demo replaces its previous run
        chat_format=FORMAT,
        rewards=["math_answer"],
        group_size=8,
        prompts_per_step=16,
        max_new_tokens=8,
        temperature=cfg.grpo_temperature,
        micro_batch_size=128,
        max_steps=cfg.grpo_steps,
        lr=cfg.grpo_lr,
        seed=cfg.seed,
        progress=cfg.progress,
        keep_last=1,
    )
    train_grpo(grpo, model=model, tokenizer=tokenizer, train_data=prompts(train_rows))
    after = sampled_reward()
    T = cfg.grpo_temperature
    print(f"[demo] GRPO, {cfg.grpo_steps} steps: mean reward of samples at T={T:g}: {before:.3f} -> {after:.3f}")
    return {"grpo_reward_before": before, "grpo_reward_after": after}


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.loops.sft import SFTConfig, train_sft
    from alignkit.models import build_tiny_model, tiny_llama_config
    from alignkit.plot import plot_run

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer = byte_tokenizer()
    config = tiny_llama_config(len(tokenizer), hidden=cfg.hidden, layers=cfg.layers, heads=4, kv_heads=4)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    model = build_tiny_model(config, seed=cfg.seed)
    eval_rows = make_rows(cfg.eval_size, cfg.digits, seed=cfg.seed + 1)
    held_out = {tuple(r["pair"]) for r in eval_rows}
    train_rows = make_rows(cfg.train_size, cfg.digits, seed=cfg.seed, exclude=held_out)

    before = exact_match(model, tokenizer, eval_rows)
    print(f"[demo] tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), byte tokenizer")
    print(
        f"[demo] task: double a number (2*478 -> 956); {len(train_rows)} training problems, {len(eval_rows)} held out"
    )
    print(f"[demo] held-out exact match before training: {before:.1%}")
    sft = SFTConfig(
        output_dir=cfg.output_dir,
        overwrite=True,  # rerunning the demo replaces its previous run
        chat_format=FORMAT,
        packing=True,
        pack_tokens=cfg.batch_size * 24,
        max_length=128,
        epochs=100,
        max_steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=50,
        schedule="cosine",
        min_lr_ratio=0.05,
        weight_decay=0.01,
        adam_beta2=0.95,
        seed=cfg.seed,
        log_every=10,
        progress=cfg.progress,
        keep_last=1,
    )
    summary = train_sft(
        sft, model=model, tokenizer=tokenizer, train_data=[{"messages": r["messages"]} for r in train_rows]
    )
    after = exact_match(model, tokenizer, eval_rows)
    png = plot_run(cfg.output_dir, title=f"alignkit demo: held-out exact match {before:.0%} -> {after:.0%}")
    result = {"exact_match_before": before, "exact_match_after": after}
    if cfg.grpo_steps > 0:
        result.update(grpo_stage(cfg, model, tokenizer, train_rows, eval_rows))
    result["seconds"] = time.perf_counter() - t0
    Path(cfg.output_dir, "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"[demo] exact match after {summary['steps']} SFT steps: {after:.1%} (before {before:.1%})")
    print(f"[demo] curves: {png}; metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}; {result['seconds']:.0f} s")
    return result
