"""Supervised fine-tuning, top to bottom.

rows -> chat format -> tokens + labels -> (packed) micro-batches -> chunked log-probs of trained tokens
-> sft_loss with the step's global token count as normaliser -> AdamW -> metrics.jsonl + atomic checkpoints.

    from alignkit.loops.sft import SFTConfig, train_sft
    train_sft(SFTConfig(model="path/or/hf-id", dataset="data.jsonl", output_dir="runs/sft"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.data.collate import pack_collate, pack_rows, packed_forward_kwargs, pad_collate
from alignkit.data.loading import load_rows
from alignkit.data.tokenize import tokenize_dataset
from alignkit.logprobs import model_token_logps
from alignkit.loops.common import end_step, optimizer_step, plan_batches, start_run, step_range
from alignkit.losses.sft import sft_loss


@dataclass
class SFTConfig:
    model: str = ""  # HF id or local folder (ignored when a model object is passed to train_sft)
    dataset: str = ""  # hub id, .json/.jsonl/.parquet file or folder
    dataset_split: str = "train"
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_rows: int | None = 256  # cap on evaluation rows
    output_dir: str = "runs/sft"
    chat_format: str | None = None  # registered name; None = detect from the tokenizer's template
    train_on: Literal["assistant", "last", "completion", "all"] = "assistant"
    max_length: int = 2048
    truncation: Literal["right", "left"] = "right"
    packing: bool = True  # padding-free: each micro-batch is one row of concatenated documents
    batch_size: int = 8  # sequences per micro-batch without packing
    pack_tokens: int | None = None  # tokens per packed micro-batch (default batch_size * max_length)
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    loss: Literal["nll", "dft"] = "nll"
    label_smoothing: float = 0.0
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None
    save_every: int | None = None  # steps between checkpoints; the final state is always saved
    keep_last: int = 2
    resume: bool = False  # continue from RUN_DIR/latest if present
    tensorboard: bool = False
    progress: bool = True
    token_chunk: int = 2048  # tokens per tile of the chunked LM-head log-prob computation
    lora_r: int = 0  # > 0 trains a LoRA adapter through peft
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def _batch(examples: list[dict[str, Any]], cfg: SFTConfig, pad_id: int) -> dict[str, torch.Tensor]:
    if cfg.packing:
        impl = cfg.attn_implementation or "sdpa"
        # flash varlen: one padding-free row; dense sdpa/eager: rows of at most max_length (cost ~ R·L²)
        b = (
            pack_collate(examples)
            if "flash" in impl
            else pack_rows(examples, capacity=cfg.max_length, pad_token_id=pad_id)
        )
        kw = packed_forward_kwargs(b, impl)
        kw.pop("use_cache", None)
        return {**kw, "labels": b["labels"]}
    b = pad_collate(examples, pad_token_id=pad_id)
    return {k: b[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}


def _micro_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: SFTConfig, normalizer: float):
    extras = ("mean_logp",) if cfg.label_smoothing > 0 else ()
    labels = batch.pop("labels")
    out = model_token_logps(model, labels=labels, extras=extras, token_chunk=cfg.token_chunk, **batch)
    return sft_loss(
        out["logps"],
        out["mask"],
        normalizer=normalizer,
        kind=cfg.loss,
        label_smoothing=cfg.label_smoothing,
        mean_logp=out.get("mean_logp"),
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Sequence[dict[str, Any]], cfg: SFTConfig, pad_id: int) -> float:
    """Token-mean NLL over `examples`."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        chunk = list(examples[i : i + cfg.batch_size])
        tokens = sum(sum(1 for x in e["labels"] if x != -100) for e in chunk)
        loss, _ = _micro_loss(model, _batch(chunk, cfg, pad_id), cfg, normalizer=1.0)
        total += float(loss)
        n += tokens
    model.train(was_training)
    return total / max(n, 1)


def _load_model(cfg: SFTConfig):  # noqa: ANN202
    from alignkit.models import load_model_and_tokenizer

    return load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)


def _add_lora(model: torch.nn.Module, cfg: SFTConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets
    )
    return get_peft_model(model, lc)


def train_sft(
    cfg: SFTConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Run SFT. Pass `model`/`tokenizer`/`train_data` objects, or let `cfg` name them. Returns a summary."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if model is None:
        model, tokenizer = _load_model(cfg)
    if cfg.lora_r > 0:
        model = _add_lora(model, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # rows -> tokens + labels (rows with nothing to train on are dropped and reported)
    tok_kw = dict(chat_format=cfg.chat_format, train_on=cfg.train_on, max_length=cfg.max_length)
    tok_kw["truncation"] = cfg.truncation
    train_ds, report = tokenize_dataset(load_rows(train_data or cfg.dataset, cfg.dataset_split), tokenizer, **tok_kw)
    print(f"[alignkit sft] train: {report}")
    train = train_ds.to_list()
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        eval_ds, _ = tokenize_dataset(load_rows(eval_data or cfg.eval_dataset, cfg.eval_split), tokenizer, **tok_kw)
        evals = eval_ds.to_list()[: cfg.eval_rows]

    # the whole data order, fixed by the seed: resuming means skipping to a step
    pack_tokens = (cfg.pack_tokens or cfg.batch_size * cfg.max_length) if cfg.packing else None
    plan = plan_batches(
        [len(e["input_ids"]) for e in train],
        seed=cfg.seed,
        epochs=cfg.epochs,
        grad_accum=cfg.grad_accum,
        batch_size=cfg.batch_size,
        pack_tokens=pack_tokens,
    )
    total_steps = min(len(plan), cfg.max_steps) if cfg.max_steps else len(plan)
    if total_steps == 0:
        raise ValueError(f"no full optimizer step: {len(train)} examples, grad_accum={cfg.grad_accum}")

    run = start_run(model, cfg, total_steps, "sft", betas=(cfg.adam_beta1, cfg.adam_beta2))
    model.train()
    steps = step_range(run, "sft")
    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        micro = [[train[i] for i in mb] for mb in plan[step]]
        # The normaliser is the step's total count of trained tokens, so summing micro-batch losses gives
        # exactly the full-batch token-mean gradient whatever the split.
        n_trained = sum(sum(1 for x in e["labels"] if x != -100) for mb in micro for e in mb)
        n_tokens = sum(len(e["input_ids"]) for mb in micro for e in mb)
        loss_sum = torch.zeros(())
        for mb in micro:
            loss, _ = _micro_loss(model, _batch(mb, cfg, pad_id), cfg, normalizer=float(n_trained))
            loss.backward()
            loss_sum += loss.detach()
        grad_norm, lr = optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm)

        done = step + 1
        record = {
            "step": done,
            "loss": float(loss_sum),
            "lr": lr,
            "grad_norm": grad_norm,
            "num_tokens": n_tokens,
            "num_trained_tokens": n_trained,
            "step_time_s": time.perf_counter() - t0,
        }
        if evals and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            record["eval_loss"] = evaluate(model, evals, cfg, pad_id)
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}")
        end_step(run, record, model=model, tokenizer=tokenizer, callbacks=callbacks)
    run.log.close()
    return {"steps": total_steps, "last": record, "run_dir": str(run_dir), "report": str(report)}
