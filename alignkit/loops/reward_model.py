"""Reward-model training (Bradley-Terry), top to bottom.

Composes: pairs (`data.preference`) -> token ids of prompt+chosen and prompt+rejected -> both sides scored in ONE
padded forward of a scalar-head model (`reward_model.score`) -> `losses.reward.bradley_terry_loss` with the
step's pair count as normaliser -> `loops.common` (HF folders `AutoModelForSequenceClassification` loads).

    from alignkit.loops.reward_model import RewardConfig, train_reward
    train_reward(RewardConfig(model="runs/sft/checkpoint-900", dataset="pairs.jsonl", output_dir="runs/rm"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit import distributed
from alignkit.data.collate import pad_collate
from alignkit.data.loading import load_rows
from alignkit.data.preference import tokenize_pairs as tokenize_preference_pairs
from alignkit.data.rows import RowError
from alignkit.loops import common
from alignkit.loops.config import BatchBlock, DataBlock, EvalBlock, ModelBlock, OptimBlock, RunBlock, require
from alignkit.losses.reward import bradley_terry_loss
from alignkit.metrics import StepMetrics
from alignkit.models import eval_mode, pad_token_id
from alignkit.ops import split_pairs
from alignkit.reward_model import load_reward_model, score

STEP_METRICS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")  # pair means logged every step
# pair means, weighted by the micro-batch's pairs; the loss is already divided by the step's pair count
STEP_WEIGHTS = {"loss": None, "n_pairs": None}


@dataclass
class RewardConfig(ModelBlock, DataBlock, EvalBlock, BatchBlock, OptimBlock, RunBlock):
    output_dir: str = "runs/reward"
    eval_rows: int | None = 512  # cap on evaluation pairs
    max_length: int | None = 1024  # pairs with either side longer are dropped (TRL's filter), never truncated
    lr: float = 1e-4  # TRL's RewardConfig default
    use_margin: bool = True  # subtract the rows' `margin` column from r_c - r_r when the data has one
    center_coef: float | None = None  # reward centering c·(r_c + r_r)² (TRL center_rewards_coefficient)

    def check(self) -> None:
        require(self, self.center_coef is None or self.center_coef >= 0, "center_coef", "a number >= 0 (or none)")


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
    with eval_mode(model):
        acc = StepMetrics(STEP_WEIGHTS, "n_pairs")
        for i in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[i : i + cfg.batch_size]
            with common.precision(cfg, model):
                r_c, r_r, m = score_pairs(model, chunk, pad_id)
            loss, met = bradley_terry_loss(r_c, r_r, margin=m, center_coef=cfg.center_coef, normalizer=len(pairs))
            acc.add({"loss": loss, **met})
    res = acc.result()
    return {f"eval_{k}": res[k] for k in ("loss", "accuracy", "margin")}


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
    common.prepare_run_dir(cfg)  # before anything is loaded: a bad output_dir fails fast
    model, tokenizer = common.load_policy(cfg, model, tokenizer, loader=load_reward_model, seed=cfg.seed)
    pad_id = pad_token_id(tokenizer)
    if model.config.pad_token_id is None:  # saved checkpoints must work with HF's own pooling too
        model.config.pad_token_id = pad_id

    # rows -> token ids of both sides; pairs longer than max_length are dropped and reported
    tok_kw = dict(chat_format=cfg.chat_format, max_length=cfg.max_length, use_margin=cfg.use_margin)
    if train_data is None and not (cfg.dataset or cfg.dataset_mixture):
        raise ValueError("RewardConfig.dataset is empty: name a file, folder or hub id of preference rows")
    train_rows = load_rows(train_data if train_data is not None else cfg.train_source(), cfg.dataset_split).to_list()
    train, dropped = tokenize_pairs(train_rows, tokenizer, **tok_kw)
    print(f"[alignkit reward] train: {len(train)} pairs; {dropped} dropped (empty, or longer than {cfg.max_length})")
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        eval_rows = load_rows(eval_data if eval_data is not None else cfg.eval_dataset, cfg.eval_split).to_list()
        evals = tokenize_pairs(eval_rows, tokenizer, **tok_kw)[0][: cfg.eval_rows]

    # the whole data order, fixed by the seed: resuming means skipping to a step
    plan, total_steps = common.plan_steps([len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train], cfg, "pairs")

    run = common.start_run(model, cfg, total_steps, "reward")

    model.train()
    steps = common.step_range(run, "reward")
    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        micro = [[train[i] for i in mb] for mb in plan[step]]
        # The normaliser is the step's pair count, so summed micro-batch losses give the full-batch pair mean.
        n_pairs = sum(len(mb) for mb in micro)
        acc = StepMetrics(STEP_WEIGHTS, "n_pairs")  # one host sync per step (the log), not per micro-batch
        for mb, grad_sync in distributed.my_micro_batches(model, micro):  # this rank's share of the step
            with grad_sync:
                with common.precision(cfg, model):
                    r_c, r_r, margin = score_pairs(model, mb, pad_id)
                loss, met = bradley_terry_loss(r_c, r_r, margin=margin, center_coef=cfg.center_coef, normalizer=n_pairs)
                distributed.backward(loss)
            acc.add({"loss": loss.detach(), **met})
        grad_norm, lr = common.optimizer_step(run, model, loss=acc.total("loss"))

        done = step + 1
        stats = {k: v for k, v in acc.result(over_ranks=True).items() if k in ("loss", *STEP_METRICS)}
        n_tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for mb in micro for p in mb)
        record = common.step_record(done, stats, lr, grad_norm, t0, num_pairs=n_pairs, num_tokens=n_tokens)
        if evals and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
            record.update(evaluate(model, evals, cfg, pad_id))
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        common.end_step(run, record, model=model, tokenizer=tokenizer, callbacks=callbacks)
    run.log.close()
    return {"steps": total_steps, "last": record, "run_dir": str(run_dir), "dropped": dropped}
