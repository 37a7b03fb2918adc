"""Process reward model training, top to bottom.

Composes: stepwise rows -> prompt + (step + separator) tokens, a label on each separator (`data.prm`) -> padded
micro-batches -> step logits at label tokens only (`prm.step_logits`) -> `losses.reward.prm_loss` with the step's
count of labelled steps as normaliser -> `loops.common` (+ eval step accuracy and F1 on bad steps).

    from alignkit.loops.prm import PRMConfig, train_prm
    train_prm(PRMConfig(model="path/or/hf-id", dataset="prm800k.jsonl", output_dir="runs/prm"))

The trained checkpoint is an ordinary HF folder; score with `alignkit.prm.score_steps` or use it as a GRPO/RLOO
reward with `alignkit.prm.prm_reward` (same `step_separator`, `head` candidate ids and `chat_format`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit import distributed
from alignkit.data.collate import pad_collate
from alignkit.data.loading import load_rows
from alignkit.data.prm import IGNORE_INDEX, tokenize_prm_rows
from alignkit.loops import common
from alignkit.loops.config import BatchBlock, DataBlock, EvalBlock, ModelBlock, OptimBlock, RunBlock, require
from alignkit.losses.reward import prm_loss
from alignkit.metrics import StepMetrics
from alignkit.models import eval_mode, pad_token_id
from alignkit.prm import step_logits, step_metrics


@dataclass
class PRMConfig(ModelBlock, DataBlock, EvalBlock, BatchBlock, OptimBlock, RunBlock):
    output_dir: str = "runs/prm"
    eval_rows: int | None = 512  # cap on evaluation rows
    head: Literal["classification", "scalar", "lm"] = "classification"  # 2-class CE, BCE, or LM logits
    candidate_tokens: list[str] = field(default_factory=lambda: ["-", "+"])  # head="lm": tokens for wrong, right
    step_separator: str = "\n"  # appended to every step; its last token carries the step's label
    max_prompt_length: int | None = None  # keep the prompt's last tokens
    train_on_last_step_only: bool = False  # only the last step of each row carries a label
    soft_labels: bool | None = None  # None: soft when a label is not exactly 0/1
    eval_batch_size: int = 16  # rows per evaluation forward
    lr: float = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    threshold: float = 0.5  # a step is predicted right when its probability exceeds this

    def check(self) -> None:
        require(self, 0 < self.threshold < 1, "threshold", "a probability in (0, 1)")
        require(self, len(self.candidate_tokens) == 2, "candidate_tokens", "two tokens: [wrong, right]")
        require(self, bool(self.step_separator), "step_separator", "a non-empty string")
        require(self, self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1")


def _auto_class(head: str) -> dict[str, Any]:
    """How to load the model for a head: a causal LM (head="lm") or a token classifier with 2 / 1 labels."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    if head == "lm":
        return {"auto_class": AutoModelForCausalLM}
    return {"auto_class": AutoModelForTokenClassification, "num_labels": 2 if head == "classification" else 1}


def candidate_ids(tokenizer: Any, tokens: Sequence[str]) -> tuple[int, int]:
    """Token ids of the (wrong, right) candidate tokens of an LM-head PRM; each must be exactly one token."""
    if len(tokens) != 2:
        raise ValueError(f"candidate_tokens must be [wrong, right], got {list(tokens)}")
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in tokens]
    for t, i in zip(tokens, ids):
        if len(i) != 1:
            raise ValueError(f"candidate token {t!r} is {len(i)} tokens {i}; pick tokens that encode to one id")
    return ids[0][0], ids[1][0]


def _batch(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    keep = ("input_ids", "labels", "soft_labels")
    b = pad_collate([{k: e[k] for k in keep if k in e} for e in examples], pad_token_id=pad_id)
    return {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}


def _micro_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cand: Any, normalizer: float):
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    pos = batch["labels"] != IGNORE_INDEX
    logits = step_logits(
        model,
        batch["input_ids"],
        pos,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        candidate_ids=cand,
    )
    soft = batch["soft_labels"][pos] if "soft_labels" in batch else None
    loss, metrics = prm_loss(logits, batch["labels"][pos], normalizer=normalizer, soft_labels=soft)
    return loss, metrics, logits.detach()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: Sequence[dict[str, Any]], cfg: PRMConfig, pad_id: int, cand: Any = None
) -> dict[str, float]:
    """Step-mean NLL and step metrics (accuracy, majority baseline, precision/recall/F1 on bad steps)."""
    with eval_mode(model):
        nll, probs, targets = 0.0, [], []
        for i in range(0, len(examples), cfg.eval_batch_size):
            batch = _batch(list(examples[i : i + cfg.eval_batch_size]), pad_id)
            with common.precision(cfg, model):
                loss, _, logits = _micro_loss(model, batch, cand, normalizer=1.0)
            nll += float(loss)
            pos = batch["labels"] != IGNORE_INDEX
            probs.append(logits.float().softmax(-1)[:, 1].cpu())
            targets.append((batch["soft_labels"] if "soft_labels" in batch else batch["labels"].float())[pos])
    scores, labels = torch.cat(probs), torch.cat(targets)
    out = step_metrics(scores, labels, cfg.threshold)
    out["loss"] = nll / max(labels.numel(), 1)
    return out


def train_prm(
    cfg: PRMConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Train a PRM. Pass `model`/`tokenizer`/`train_data` objects, or let `cfg` name them. Returns a summary
    with the last logged record and, when there is eval data, the final eval metrics."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    common.prepare_run_dir(cfg)  # before anything is loaded: a bad output_dir fails fast
    model, tokenizer = common.load_policy(cfg, model, tokenizer, **_auto_class(cfg.head))
    pad_id = pad_token_id(tokenizer)
    cand = candidate_ids(tokenizer, cfg.candidate_tokens) if cfg.head == "lm" else None

    # rows -> tokens + step labels (rows whose every label token was truncated away are dropped and reported)
    tok_kw = dict(
        step_separator=cfg.step_separator,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        chat_format=cfg.chat_format,
        soft_labels=cfg.soft_labels,
    )
    rows = load_rows(train_data if train_data is not None else cfg.train_source(), cfg.dataset_split).to_list()
    train, report = tokenize_prm_rows(tokenizer, rows, train_on_last_step_only=cfg.train_on_last_step_only, **tok_kw)
    print(f"[alignkit prm] train: {report}")
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        erows = load_rows(eval_data if eval_data is not None else cfg.eval_dataset, cfg.eval_split).to_list()
        evals, ereport = tokenize_prm_rows(tokenizer, erows[: cfg.eval_rows], **tok_kw)  # every step, always
        print(f"[alignkit prm] eval: {ereport}")

    # the whole data order, fixed by the seed: resuming means skipping to a step
    plan, total_steps = common.plan_steps([len(e["input_ids"]) for e in train], cfg)

    run = common.start_run(model, cfg, total_steps, "prm")

    model.train()
    steps = common.step_range(run, "prm")
    record: dict[str, Any] = {}
    eval_metrics: dict[str, float] = {}
    for step in steps:
        t0 = time.perf_counter()
        micro = [[train[i] for i in mb] for mb in plan[step]]
        # The normaliser is the step's total count of labelled steps, so summing micro-batch losses gives exactly
        # the full-batch step-mean gradient whatever the split.
        n_steps = sum(e["num_steps"] for mb in micro for e in mb)
        acc = StepMetrics({"loss": None, "n_steps": None}, "n_steps")
        for mb, grad_sync in distributed.my_micro_batches(model, micro):  # this rank's share of the step
            with grad_sync:
                with common.precision(cfg, model):
                    loss, metrics, _ = _micro_loss(model, _batch(mb, pad_id), cand, normalizer=float(n_steps))
                distributed.backward(loss)
            acc.add({"loss": loss.detach(), **metrics})
        grad_norm, lr = common.optimizer_step(run, model, loss=acc.total("loss"))

        done = step + 1
        stats = acc.result(over_ranks=True)
        stats = {"loss": stats["loss"], "step_accuracy": stats.get("accuracy", 0.0)}
        n_tokens = sum(len(e["input_ids"]) for mb in micro for e in mb)
        record = common.step_record(done, stats, lr, grad_norm, t0, num_steps=n_steps, num_tokens=n_tokens)
        if evals and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            eval_metrics = evaluate(model, evals, cfg, pad_id, cand)
            record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['step_accuracy']:.3f}")
        common.end_step(run, record, model=model, tokenizer=tokenizer, callbacks=callbacks)
    run.log.close()
    if evals and not eval_metrics:
        eval_metrics = evaluate(model, evals, cfg, pad_id, cand)
    return {"steps": total_steps, "last": record, "eval": eval_metrics, "run_dir": str(run_dir), "report": str(report)}
