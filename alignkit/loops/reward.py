"""Reward-model training (Bradley-Terry), top to bottom.

{prompt, chosen, rejected} rows -> chat format -> token ids of prompt+chosen and prompt+rejected -> micro-batches
of pairs, both sides scored in ONE padded forward -> bradley_terry_loss with the step's pair count as normaliser
-> AdamW -> metrics.jsonl + atomic checkpoints (HF folders: `AutoModelForSequenceClassification` loads them).

    from alignkit.loops.reward import RewardConfig, train_reward
    train_reward(RewardConfig(model="runs/sft/checkpoint-900", dataset="pairs.jsonl", output_dir="runs/rm"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.data.collate import pad_collate
from alignkit.data.loading import load_rows
from alignkit.data.preference import tokenize_pairs as tokenize_preference_pairs
from alignkit.data.rows import RowError
from alignkit.loops.common import end_step, optimizer_step, plan_batches, start_run, step_range
from alignkit.losses.preference import split_pairs
from alignkit.losses.reward import bradley_terry_loss
from alignkit.reward_model import load_reward_model, score

STEP_METRICS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")  # pair means logged every step


@dataclass
class RewardConfig:
    model: str = ""  # causal-LM or reward-model folder / HF id (ignored when a model object is passed)
    dataset: str = ""  # hub id, .json/.jsonl/.parquet file or folder of {prompt?, chosen, rejected, margin?} rows
    dataset_split: str = "train"
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_rows: int | None = 512  # cap on evaluation pairs
    output_dir: str = "runs/reward"
    chat_format: str | None = None  # registered name; None = detect from the tokenizer's template
    max_length: int | None = 1024  # pairs with either side longer are dropped (TRL's filter), never truncated
    batch_size: int = 8  # pairs per micro-batch (the forward sees 2x sequences)
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-4  # TRL's RewardConfig default
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    use_margin: bool = True  # subtract the rows' `margin` column from r_c - r_r when the data has one
    center_coef: float | None = None  # reward centering c·(r_c + r_r)² (TRL center_rewards_coefficient)
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None  # steps between evaluations; the final step is always evaluated
    save_every: int | None = None  # steps between checkpoints; the final state is always saved
    keep_last: int = 2
    resume: bool = False  # continue from RUN_DIR/latest if present
    tensorboard: bool = False
    progress: bool = True


def _margins(rows: Sequence[Mapping[str, Any]], use: bool) -> list[float] | None:
    """The `margin` column as floats, None when absent or unused; a partly missing column is an error."""
    if not use or not any(r.get("margin") is not None for r in rows):
        return None
    out = []
    for i, r in enumerate(rows):
        m = r.get("margin")
        if isinstance(m, bool) or not isinstance(m, int | float):
            raise RowError(i, "margin", "a number in every row (other rows have one), or use_margin=false", m)
        out.append(float(m))
    return out


def tokenize_pairs(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    chat_format: str | None,
    max_length: int | None,
    use_margin: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """Rows -> [{"chosen_ids", "rejected_ids", "margin"?}], dropping pairs with a side over `max_length`.

    Rows are read by `alignkit.data.preference` (explicit or implicit prompt, plain or conversational; the
    implicit prompt renders to the same tokens). Only the ids matter here, so labels are ignored. Returns
    (pairs, number dropped).
    """
    examples, report = tokenize_preference_pairs(tokenizer, rows, chat_format=chat_format)
    margins = _margins(rows, use_margin)
    pairs = []
    for e in examples:
        if max_length is not None and max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) > max_length:
            continue
        pair = {"chosen_ids": e["chosen_input_ids"], "rejected_ids": e["rejected_input_ids"]}
        if margins is not None:
            pair["margin"] = margins[e["index"]]
        pairs.append(pair)
    return pairs, report.rows - len(pairs)


def score_pairs(
    model: torch.nn.Module, pairs: Sequence[Mapping[str, Any]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chosen and rejected of `P` pairs in one right-padded `[2P, T]` forward -> `[P]` r_c, `[P]` r_r, margins."""
    seqs = [{"input_ids": p["chosen_ids"]} for p in pairs] + [{"input_ids": p["rejected_ids"]} for p in pairs]
    b = pad_collate(seqs, pad_token_id=pad_id)
    dev = next(model.parameters()).device
    rewards = score(model, b["input_ids"].to(dev), b["attention_mask"].to(dev))  # [2P]
    r_c, r_r = split_pairs(rewards)
    margin = torch.tensor([p["margin"] for p in pairs], device=dev) if "margin" in pairs[0] else None
    return r_c, r_r, margin


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: Sequence[Mapping[str, Any]], cfg: RewardConfig, pad_id: int):  # noqa: ANN201
    """Pair-mean loss, accuracy (r_c > r_r) and margin over `pairs`."""
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i : i + cfg.batch_size]
        r_c, r_r, m = score_pairs(model, chunk, pad_id)
        loss, met = bradley_terry_loss(r_c, r_r, margin=m, center_coef=cfg.center_coef, normalizer=len(pairs))
        sums["loss"] += float(loss)
        sums["accuracy"] += float(met["accuracy"]) * len(chunk) / len(pairs)
        sums["margin"] += float(met["margin"]) * len(chunk) / len(pairs)
    model.train(was_training)
    return {f"eval_{k}": v for k, v in sums.items()}


def train_reward(
    cfg: RewardConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Train a scalar reward model. Pass `model` (see `alignkit.reward_model`)/`tokenizer`/`train_data` objects,
    or let `cfg` name them. Returns a summary with the final step record."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if model is None:
        if not cfg.model:
            raise ValueError("RewardConfig.model is empty: name a causal-LM or reward-model folder / HF id")
        model, tokenizer = load_reward_model(
            cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, seed=cfg.seed
        )
    if tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if model.config.pad_token_id is None:  # saved checkpoints must work with HF's own pooling too
        model.config.pad_token_id = pad_id

    # rows -> token ids of both sides; pairs longer than max_length are dropped and reported
    tok_kw = dict(chat_format=cfg.chat_format, max_length=cfg.max_length, use_margin=cfg.use_margin)
    if train_data is None and not cfg.dataset:
        raise ValueError("RewardConfig.dataset is empty: name a file, folder or hub id of preference rows")
    train_rows = load_rows(train_data if train_data is not None else cfg.dataset, cfg.dataset_split).to_list()
    train, dropped = tokenize_pairs(train_rows, tokenizer, **tok_kw)
    print(f"[alignkit reward] train: {len(train)} pairs; {dropped} dropped (empty, or longer than {cfg.max_length})")
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        eval_rows = load_rows(eval_data if eval_data is not None else cfg.eval_dataset, cfg.eval_split).to_list()
        evals = tokenize_pairs(eval_rows, tokenizer, **tok_kw)[0][: cfg.eval_rows]

    # the whole data order, fixed by the seed: resuming means skipping to a step
    plan = plan_batches(
        [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train],
        seed=cfg.seed,
        epochs=cfg.epochs,
        grad_accum=cfg.grad_accum,
        batch_size=cfg.batch_size,
    )
    total_steps = min(len(plan), cfg.max_steps) if cfg.max_steps else len(plan)
    if total_steps == 0:
        raise ValueError(f"no full optimizer step: {len(train)} pairs, grad_accum={cfg.grad_accum}")

    run = start_run(model, cfg, total_steps, "reward")

    model.train()
    device = next(model.parameters()).device
    steps = step_range(run, "reward")
    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        micro = [[train[i] for i in mb] for mb in plan[step]]
        # The normaliser is the step's pair count, so summed micro-batch losses give the full-batch pair mean.
        n_pairs = sum(len(mb) for mb in micro)
        # accumulate on the model's device: one host sync per step (the log), not per micro-batch
        loss_sum = torch.zeros((), device=device)
        stats = {k: torch.zeros((), device=device) for k in STEP_METRICS}
        for mb in micro:
            r_c, r_r, margin = score_pairs(model, mb, pad_id)
            loss, met = bradley_terry_loss(r_c, r_r, margin=margin, center_coef=cfg.center_coef, normalizer=n_pairs)
            loss.backward()
            loss_sum += loss.detach()
            for k in stats:  # metrics are local pair means: weight by the micro-batch's pairs
                stats[k] += met[k] * (len(mb) / n_pairs)
        grad_norm, lr = optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm)

        done = step + 1
        record = {
            "step": done,
            "loss": float(loss_sum),
            "lr": lr,
            "grad_norm": grad_norm,
            **{k: float(v) for k, v in stats.items()},
            "num_pairs": n_pairs,
            "num_tokens": sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for mb in micro for p in mb),
            "step_time_s": time.perf_counter() - t0,
        }
        if evals and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
            record.update(evaluate(model, evals, cfg, pad_id))
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        end_step(run, record, model=model, tokenizer=tokenizer, callbacks=callbacks)
    run.log.close()
    return {"steps": total_steps, "last": record, "run_dir": str(run_dir), "dropped": dropped}
