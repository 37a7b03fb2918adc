"""Supervised fine-tuning, top to bottom.

Composes: rows (`data.loading`) -> chat format + labels (`data.tokenize`) -> padded or packed micro-batches
(`data.collate`) -> per-token log-probs (`scoring.model_token_logps`) -> `losses.sft.sft_loss` with the step's
trained-token count as normaliser -> the shared step bookkeeping (`loops.common`) -> metrics + checkpoints.

    from alignkit.loops.sft import SFTConfig, train_sft
    train_sft(SFTConfig(model="path/or/hf-id", dataset="data.jsonl", output_dir="runs/sft"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit import distributed
from alignkit.data.collate import pack_collate, pack_rows, packed_forward_kwargs, pad_collate
from alignkit.data.loading import load_rows
from alignkit.data.tokenize import tokenize_dataset, tokenize_vision_rows
from alignkit.hardware import to_device
from alignkit.logprobs import IGNORE_INDEX
from alignkit.loops import common
from alignkit.loops.config import OfflineConfig
from alignkit.losses.sft import sft_loss
from alignkit.metrics import StepMetrics
from alignkit.models import eval_mode, pad_token_id
from alignkit.scoring import model_token_logps


@dataclass
class SFTConfig(OfflineConfig):
    output_dir: str = "runs/sft"
    max_length: int = 2048
    # tokens with loss: assistant turns, the last one, the completion column, or all
    train_on: Literal["assistant", "last", "completion", "all"] = "assistant"
    truncation: Literal["right", "left"] = "right"  # which end a sequence over max_length loses
    packing: bool = True  # padding-free: each micro-batch is one row of concatenated documents
    pack_tokens: int | None = None  # tokens per packed micro-batch (default batch_size * max_length)
    lr: float = 2e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    loss: Literal["nll", "dft"] = "nll"  # nll, or dft (each token NLL weighted by its detached probability)
    label_smoothing: float = 0.0  # mix of the mean log-prob over the vocabulary into each token loss


def _batch(examples: list[dict[str, Any]], cfg: SFTConfig, pad_id: int, vision: Any = None) -> dict[str, torch.Tensor]:
    if cfg.packing:
        impl = cfg.attn_implementation or "sdpa"
        # one padding-free row for kernels that keep documents apart at no cost (flash varlen, flex attention's
        # document mask); rows of at most max_length for dense sdpa/eager, whose cost grows with the row length²
        varlen = "flash" in impl or impl == "flex_attention"
        if vision is not None:  # the rows' images in their packed order
            cap = None if varlen else cfg.max_length
            return vision.pack(examples, capacity=cap, pad_token_id=pad_id, attn_implementation=impl)
        b = pack_collate(examples) if varlen else pack_rows(examples, capacity=cfg.max_length, pad_token_id=pad_id)
        kw = packed_forward_kwargs(b, impl)
        kw.pop("use_cache", None)
        return {**kw, "labels": b["labels"]}
    if vision is not None:
        return vision.collate(examples, pad_id)
    b = pad_collate(examples, pad_token_id=pad_id)
    return {k: b[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}


def _micro_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: SFTConfig, normalizer: float):
    extras = ("mean_logp",) if cfg.label_smoothing > 0 else ()
    batch = to_device(batch, next(model.parameters()).device)
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
def evaluate(
    model: torch.nn.Module, examples: Sequence[dict[str, Any]], cfg: SFTConfig, pad_id: int, vision: Any = None
) -> float:
    """Token-mean NLL over `examples`."""
    with eval_mode(model):
        total, n = 0.0, 0
        for i in range(0, len(examples), cfg.batch_size):
            chunk = list(examples[i : i + cfg.batch_size])
            tokens = sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in chunk)
            with common.precision(cfg, model):
                loss, _ = _micro_loss(model, _batch(chunk, cfg, pad_id, vision), cfg, normalizer=1.0)
            total += float(loss)
            n += tokens
    return total / max(n, 1)


def train_sft(
    cfg: SFTConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    image_processor: Any = None,
) -> dict[str, Any]:
    """Run SFT. Pass `model`/`tokenizer`/`train_data` objects, or let `cfg` name them. Returns a summary.
    A vision-language model (``AutoModelForImageTextToText``) trains on rows with images (``alignkit.vision``)."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    common.prepare_run_dir(cfg)  # before anything is loaded: a bad output_dir fails fast
    model, tokenizer = common.load_policy(cfg, model, tokenizer)
    vision = common.vision_processor(model, tokenizer, cfg, image_processor)  # None for a text model
    model = common.maybe_add_lora(model, cfg)
    pad_id = pad_token_id(tokenizer)

    # rows -> tokens + labels (rows with nothing to train on are dropped and reported)
    tok_kw = dict(chat_format=cfg.chat_format, train_on=cfg.train_on, max_length=cfg.max_length)
    tok_kw["truncation"] = cfg.truncation

    def tokenize(source: Any, split: str) -> tuple[list[dict[str, Any]], Any]:
        rows = load_rows(source, split)
        if vision is not None:  # images stay files (or bytes) until batched
            return tokenize_vision_rows(vision, rows, progress=cfg.progress, **tok_kw)
        ds, rep = tokenize_dataset(rows, tokenizer, **tok_kw)
        return ds.to_list(), rep

    train, report = tokenize(train_data or cfg.train_source(), cfg.dataset_split)
    print(f"[alignkit sft] train: {report}")
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        evals = tokenize(eval_data or cfg.eval_dataset, cfg.eval_split)[0][: cfg.eval_rows]

    # the whole data order, fixed by the seed: resuming means skipping to a step
    pack_tokens = (cfg.pack_tokens or cfg.batch_size * cfg.max_length) if cfg.packing else None
    plan, total_steps = common.plan_steps([len(e["input_ids"]) for e in train], cfg, pack_tokens=pack_tokens)

    run = common.start_run(model, cfg, total_steps, "sft", betas=(cfg.adam_beta1, cfg.adam_beta2))
    model.train()
    steps = common.step_range(run, "sft")
    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        micro = [[train[i] for i in mb] for mb in plan[step]]
        # The normaliser is the step's total count of trained tokens, so summing micro-batch losses gives
        # exactly the full-batch token-mean gradient whatever the split.
        n_trained = sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX) for mb in micro for e in mb)
        n_tokens = sum(len(e["input_ids"]) for mb in micro for e in mb)
        acc = StepMetrics()
        for mb, grad_sync in distributed.my_micro_batches(model, micro):  # this rank's share of the step
            with grad_sync:
                with common.precision(cfg, model):
                    loss, _ = _micro_loss(model, _batch(mb, cfg, pad_id, vision), cfg, normalizer=float(n_trained))
                distributed.backward(loss)
            acc.add({"loss": loss.detach()})
        grad_norm, lr = common.optimizer_step(run, model, loss=acc.total("loss"))

        done = step + 1
        counts = {"num_tokens": n_tokens, "num_trained_tokens": n_trained}
        record = common.step_record(done, acc.result(over_ranks=True), lr, grad_norm, t0, **counts)
        if evals and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            record["eval_loss"] = evaluate(model, evals, cfg, pad_id, vision)
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}")
        common.end_step(run, record, model=model, tokenizer=vision or tokenizer, callbacks=callbacks)
    run.log.close()
    return {"steps": total_steps, "last": record, "run_dir": str(run_dir), "report": str(report)}
