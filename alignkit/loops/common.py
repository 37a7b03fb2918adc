"""Pieces every loop shares: model + LoRA set-up, optimizer, schedule, batch plan, and the set-up / step /
end-of-step bookkeeping around a loop's own work. Small on purpose.

A loop is, top to bottom::

    model, tokenizer = common.load_policy(cfg, model, tokenizer)   # the objects passed in, or cfg.model
    model = common.maybe_add_lora(model, cfg)
    run = common.start_run(model, cfg, total_steps, "sft")         # AdamW, schedule, resume, metrics log
    for step in common.step_range(run, "sft"):
        ...forward, loss(normalizer=...), backward per micro-batch, StepMetrics.add...
        grad_norm, lr = common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm)
        common.end_step(run, {"step": step + 1, ...}, model=model, tokenizer=tokenizer)  # log, checkpoint
    run.log.close()
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.metrics import MetricsLog
from alignkit.models import add_lora, is_peft, load_model_and_tokenizer
from alignkit.reference import Reference, ReferenceInputs, build_reference


def load_policy(
    cfg: Any, model: torch.nn.Module | None = None, tokenizer: Any = None, *, loader: Callable[..., Any] | None = None,
    **load_kw: Any,
) -> tuple[torch.nn.Module, Any]:  # fmt: skip
    """The model and tokenizer a loop trains: the objects passed in, else ``loader(cfg.model, dtype=cfg.dtype,
    attn_implementation=cfg.attn_implementation, **load_kw)`` (default :func:`load_model_and_tokenizer`)."""
    if model is None:
        if not cfg.model:
            raise ValueError(f"{type(cfg).__name__}.model is empty: name a model folder or HF id, or pass a model")
        load = loader or load_model_and_tokenizer
        model, tokenizer = load(cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, **load_kw)
    if tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    return model, tokenizer


def maybe_add_lora(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Wrap ``model`` in a LoRA adapter when ``cfg.lora_r > 0`` (a peft model passed in is used as it is)."""
    if cfg.lora_r > 0 and not is_peft(model):
        return add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    return model


def data_references(
    kind: str,
    cfg: Any,
    policy: torch.nn.Module,
    train: list[Any],
    evals: list[Any],
    *,
    scorer: Any,
    ref_model: torch.nn.Module | None,
    sequences: Callable[[list[Any]], Sequence[Any]],
    batches: Callable[[list[Any]], Iterable[Any]],
    settings: dict[str, Any],
) -> tuple[Reference, Reference]:
    """The references of a loop over a fixed dataset (DPO, KTO) for its train and eval examples, from ``cfg``'s
    ``ReferenceBlock`` keys: ``kind`` by name (``reference.REFERENCES``; only a precomputed one differs between
    the two), ``cfg.ref_model`` loaded for model / TR-DPO when no model is passed. ``sequences(examples)`` and
    ``batches(examples)`` give a precomputed table's ids and the batches covering them."""
    if ref_model is None and cfg.ref_model and kind in ("model", "tr_dpo"):
        ref_model, _ = load_model_and_tokenizer(
            cfg.ref_model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )

    def build(examples: list[Any]) -> Reference:
        inputs = ReferenceInputs(
            scorer=scorer,
            ref_model=ref_model,
            sequences=lambda: sequences(examples),
            batches=lambda: batches(examples),
            cache_dir=cfg.reference_cache_dir,
            settings=settings,
            progress=cfg.progress,
            tr_dpo_alpha=cfg.tr_dpo_alpha,
            tr_dpo_sync_steps=cfg.tr_dpo_sync_steps,
        )
        return build_reference(kind, policy, inputs)

    reference = build(train)
    return reference, (build(evals) if evals and kind == "precomputed" else reference)


def plan_steps(
    lengths: Sequence[int], cfg: Any, unit: str = "examples", pack_tokens: int | None = None
) -> tuple[list[list[list[int]]], int]:
    """The run's data plan (:func:`plan_batches` with ``cfg.seed, epochs, grad_accum, batch_size``) and the
    optimizer steps it makes: the plan's length, capped by ``cfg.max_steps``; zero steps is an error."""
    plan = plan_batches(
        lengths, seed=cfg.seed, epochs=cfg.epochs, grad_accum=cfg.grad_accum, batch_size=cfg.batch_size,
        pack_tokens=pack_tokens,
    )  # fmt: skip
    total = min(len(plan), cfg.max_steps) if cfg.max_steps else len(plan)
    if total == 0:
        raise ValueError(f"no full optimizer step: {len(lengths)} {unit}, grad_accum={cfg.grad_accum}")
    return plan, total


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):  # noqa: ANN201
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel is ~6x faster than the per-parameter loop on CPU (and GPU); same math.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # a dtype/device the fused kernel does not support
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):  # noqa: ANN201
    """Multiplier of the peak learning rate at each step: linear warmup, then cosine / linear / constant."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule={schedule!r}; expected cosine, linear or constant")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return f


def plan_batches(
    lengths: Sequence[int],
    *,
    seed: int,
    epochs: float,
    grad_accum: int,
    batch_size: int | None = None,
    pack_tokens: int | None = None,
) -> list[list[list[int]]]:
    """The whole run's data order, fixed by the seed: steps -> micro-batches -> example indices.

    Unpacked: each micro-batch is `batch_size` shuffled examples. Packed: each epoch's shuffled examples are
    placed by best-fit-decreasing, window by window, into bins of at most `pack_tokens` tokens; bin order is
    shuffled; a bin is one micro-batch. The plan is a pure function of the seed, so the data position is
    just the step.
    """
    from alignkit.data.collate import pack_best_fit_decreasing

    rng = random.Random(seed)
    micro: list[list[int]] = []
    n_epochs = max(1, math.ceil(epochs))
    for e in range(n_epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if e == n_epochs - 1 and epochs != n_epochs:  # fractional last epoch
            order = order[: max(1, int(round((epochs - e) * len(order))))]
        if pack_tokens is not None:
            # Best-fit-decreasing over the whole epoch would sort by length, making every micro-batch one
            # length class (on short, uniform tasks, one problem type): pack within shuffled windows of
            # about `PACK_WINDOW` bins instead, which keeps batches mixed and bins nearly as full.
            bins = []
            for window in _token_windows(order, lengths, PACK_WINDOW * pack_tokens):
                packed = pack_best_fit_decreasing([lengths[i] for i in window], pack_tokens)
                bins.extend([window[j] for j in b] for b in packed)
            rng.shuffle(bins)
            micro.extend(bins)
        else:
            assert batch_size is not None
            micro.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return [micro[i : i + grad_accum] for i in range(0, len(micro) - grad_accum + 1, grad_accum)]


PACK_WINDOW = 8


def _token_windows(order: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive slices of `order` holding about `budget` tokens each."""
    windows, cur, n = [], [], 0
    for i in order:
        cur.append(i)
        n += lengths[i]
        if n >= budget:
            windows.append(cur)
            cur, n = [], 0
    if cur:
        windows.append(cur)
    return windows


# ---------------------------------------------------------------------------------------------------------------
# set-up, optimizer step, end of step
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a loop sets up before its first step. ``start`` is the first step to run (0, or the resumed
    checkpoint's step); ``state`` holds the resumed checkpoint's saved entries ({} for a fresh run)."""

    cfg: Any
    total_steps: int
    run_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: Any
    log: MetricsLog
    start: int = 0
    state: dict[str, Any] = field(default_factory=dict)


def start_run(model: torch.nn.Module, cfg: Any, total_steps: int, name: str, *, betas=(0.9, 0.999)) -> Run:  # noqa: ANN001
    """AdamW (``make_optimizer``) and the warmup + ``cfg.schedule`` LR schedule over ``total_steps``; with
    ``cfg.resume``, weights, optimizer, schedule and RNG restored from ``cfg.output_dir``'s latest checkpoint;
    the metrics log (truncated after the resumed step). ``cfg`` needs ``output_dir, lr, weight_decay,
    schedule, warmup_steps, min_lr_ratio, resume, tensorboard``."""
    run_dir = Path(cfg.output_dir)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, betas=betas)
    schedule = lr_lambda(cfg.schedule, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    state: dict[str, Any] = {}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        print(f"[alignkit {name}] resumed from {ckpt} at step {state['step']}")
    start = int(state.get("step", 0))
    log = MetricsLog(run_dir, resume_step=start if ckpt is not None else None, tensorboard=cfg.tensorboard)
    return Run(cfg, total_steps, run_dir, optimizer, scheduler, log, start, state)


def step_range(run: Run, desc: str) -> Iterable[int]:
    """Steps ``run.start .. total_steps - 1``, as a tqdm bar when ``cfg.progress`` (it has ``set_postfix``)."""
    steps = range(run.start, run.total_steps)
    if not run.cfg.progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, initial=run.start, total=run.total_steps, desc=desc, unit="step")


def optimizer_step(model: torch.nn.Module, optimizer: Any, scheduler: Any, max_grad_norm: float | None) -> tuple:
    """Clip the trainable gradients (None: measure only), step, advance the schedule, zero the gradients.
    Returns (grad_norm before clipping, learning rate the step used)."""
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr


def step_record(step: int, stats: dict[str, float], lr: float, grad_norm: float, t0: float, **counts: Any) -> dict:
    """One metrics record: ``step, loss, lr, grad_norm``, the step's folded metrics (``stats``, with ``loss``),
    the loop's ``counts`` (``num_tokens``, ...) and ``step_time_s`` since ``t0`` (``time.perf_counter()``)."""
    stats = dict(stats)
    head = {"step": step, "loss": stats.pop("loss"), "lr": lr, "grad_norm": grad_norm}
    return {**head, **stats, **counts, "step_time_s": time.perf_counter() - t0}


def end_step(
    run: Run,
    record: dict[str, Any],
    *,
    model: torch.nn.Module,
    tokenizer: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    extra_state: Callable[[int], dict[str, Any]] | None = None,
) -> None:
    """After the optimizer step ``record["step"]``: log the record (every ``cfg.log_every`` steps, the last
    one, and any step with an ``eval_loss``), write an atomic checkpoint (every ``cfg.save_every`` steps and at
    the end) carrying ``extra_state(step)`` beside weights, optimizer, schedule and RNG, then call the callbacks."""
    cfg, done, total_steps = run.cfg, record["step"], run.total_steps
    if done % cfg.log_every == 0 or done == total_steps or "eval_loss" in record:
        run.log.log(record)
    if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps:
        save_checkpoint(
            run.run_dir,
            done,
            model=model,
            tokenizer=tokenizer,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            state=extra_state(done) if extra_state is not None else None,
            keep_last=cfg.keep_last,
        )
    for cb in callbacks:
        cb(done, record)
