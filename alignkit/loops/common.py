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
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit import distributed, hardware, run_dir
from alignkit.checkpoint import (
    check_free_space,
    estimate_checkpoint_bytes,
    find_resumable,
    load_checkpoint,
    load_model_weights,
    publish_final_model,
    save_checkpoint,
)
from alignkit.config import to_dict
from alignkit.data.plan import plan_batches
from alignkit.errors import TrainingDiverged
from alignkit.metrics import MetricsLog, NullLog, step_line
from alignkit.models import add_lora, is_peft, load_model_and_tokenizer
from alignkit.reference import Reference, ReferenceInputs, build_reference
from alignkit.trackers import open_trackers


def prepare_run_dir(cfg: Any) -> str:
    """Before anything is loaded: join the process group of a distributed run (:func:`distributed.init`), then
    check and claim ``cfg.output_dir`` (:func:`alignkit.run_dir.prepare_run_dir`, on rank 0 only; its error,
    if any, is raised on every rank). Returns the run id."""
    distributed.init(cfg, hardware.resolve_device(cfg.device))
    outcome: tuple[str, Any] = ("ok", None)
    if distributed.is_main():
        try:
            outcome = ("ok", run_dir.prepare_run_dir(cfg))
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            outcome = ("error", e)
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


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
    return place_model(model, cfg), tokenizer


def place_model(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """The one place a loop's model meets the hardware: ``cfg.device``, bf16 weights for ``precision=bf16``,
    activation checkpointing, compiled decoder layers (see :mod:`alignkit.hardware`)."""
    model = model.to(hardware.resolve_device(cfg.device))
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)
    if cfg.gradient_checkpointing:
        hardware.apply_activation_checkpointing(model)
    if cfg.compile:
        hardware.compile_layers(model)
    return model


def precision(cfg: Any, model: torch.nn.Module) -> Any:  # noqa: ANN401
    """The forward context of ``cfg.precision`` on the model's device: bf16 autocast for ``bf16-mixed`` (the
    policy's, the reference's and generation's forwards alike), nothing otherwise."""
    kind = getattr(cfg, "precision", "fp32")
    if distributed.is_fsdp(model):  # FSDP2's mixed-precision policy casts instead (distributed.parallelize)
        kind = "fp32"
    return hardware.autocast(kind, next(model.parameters()).device)


def vision_processor(model: torch.nn.Module, tokenizer: Any, cfg: Any, image_processor: Any = None) -> Any:  # noqa: ANN401
    """For a vision-language model: its :class:`alignkit.vision.VisionProcessor` (image processor from the model's
    folder, or ``image_processor``, or made to match its config), with ``freeze_vision`` applied. None for a text
    model (``freeze_vision`` is then refused)."""
    from alignkit.config import ConfigError
    from alignkit.vision import VisionProcessor, freeze_vision_tower, is_vision_model

    if not is_vision_model(model):
        if getattr(cfg, "freeze_vision", False):
            raise ConfigError(f"{type(cfg).__name__}.freeze_vision=True: the model has no vision encoder")
        return None
    vision = VisionProcessor.for_model(model, tokenizer, image_processor)
    if getattr(cfg, "packing", False) and not vision.family.packing:
        raise ConfigError(f"{type(cfg).__name__}.packing=True: {vision.family.packing_refusal}")
    if getattr(cfg, "freeze_vision", False):
        freeze_vision_tower(model)
    return vision


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
    needed: Sequence[int] | None = None,
) -> tuple[Reference, Reference]:
    """The references of a loop over a fixed dataset (DPO, KTO) for its train and eval examples, from ``cfg``'s
    ``ReferenceBlock`` keys: ``kind`` by name (``reference.REFERENCES``; only a precomputed one differs between
    the two), ``cfg.ref_model`` loaded for model / TR-DPO when no model is passed. ``sequences(examples)`` and
    ``batches(examples)`` give a precomputed table's ids and the batches covering them; ``needed``: the train
    examples the run reads (None: all), the only ones a precomputed reference scores."""
    if ref_model is None and cfg.ref_model and kind in ("model", "tr_dpo"):
        ref_model, _ = load_model_and_tokenizer(
            cfg.ref_model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )

    def build(examples: list[Any], read: Sequence[int] | None = None) -> Reference:
        scored = examples if read is None else [examples[i] for i in read]
        inputs = ReferenceInputs(
            scorer=scorer,
            ref_model=ref_model,
            sequences=lambda: sequences(examples),
            batches=lambda: batches(scored),
            cache_dir=cfg.reference_cache_dir,
            settings=settings,
            progress=cfg.progress,
            tr_dpo_alpha=cfg.tr_dpo_alpha,
            tr_dpo_sync_steps=cfg.tr_dpo_sync_steps,
        )
        return build_reference(kind, policy, inputs)

    reference = parallelize_reference(build(train, needed), cfg)
    return reference, (build(evals) if evals and kind == "precomputed" else reference)


def parallelize_reference(reference: Reference, cfg: Any) -> Reference:
    """A reference that holds its own model (model / TR-DPO) gets that model sharded like the policy under
    FSDP2 (:func:`distributed.parallelize`); others are returned as they are."""
    ref_model = getattr(reference, "model", None)
    if isinstance(ref_model, torch.nn.Module):
        distributed.parallelize(ref_model, cfg)
    return reference


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


def make_optimizer(model: torch.nn.Module | Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0,
                   betas=(0.9, 0.999)):  # noqa: ANN001, ANN201  # fmt: skip
    """AdamW over trainable parameters (of a model, or the tensors given, e.g. fp32 master copies); no weight decay
    on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel is ~6x faster than the per-parameter loop on CPU (and GPU); same math.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # a dtype/device the fused kernel does not support
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """``cfg.warmup_steps``, or ``ceil(cfg.warmup_ratio * total_steps)`` when a ratio is given."""
    ratio = getattr(cfg, "warmup_ratio", 0.0)
    return cfg.warmup_steps or (math.ceil(ratio * total_steps) if ratio else 0)


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


# ---------------------------------------------------------------------------------------------------------------
# set-up, optimizer step, end of step
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a loop sets up before its first step. ``start`` is the first step to run (0, or the resumed
    checkpoint's step); ``state`` holds the resumed checkpoint's saved entries ({} for a fresh run);
    ``nonfinite_steps`` / ``nonfinite_streak`` count updates skipped for a non-finite loss or gradient."""

    cfg: Any
    total_steps: int
    run_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: Any
    log: MetricsLog | NullLog
    start: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0
    skipped: bool = False  # the last optimizer step was skipped
    master: hardware.MasterWeights | None = None  # fp32 master weights (precision=bf16)
    timer: hardware.StepTimer | None = None  # speed / memory of each step (made at the first end_step)


def start_run(model: torch.nn.Module, cfg: Any, total_steps: int, name: str, *, betas=(0.9, 0.999)) -> Run:  # noqa: ANN001
    """AdamW (``make_optimizer``) and the warmup + ``cfg.schedule`` LR schedule over ``total_steps``; with
    ``cfg.resume``, weights, optimizer, schedule and RNG restored from ``cfg.output_dir``'s newest intact
    checkpoint (a corrupt one is reported and skipped); the metrics log (truncated after the resumed step).
    Refuses to start without room for two checkpoints. ``cfg`` needs the ``OptimBlock`` and ``RunBlock`` keys."""
    out_dir = Path(cfg.output_dir)
    # the loops call prepare_run_dir before loading; rank 0 reads the id (another rank's view of a shared file
    # system may lag) and every rank takes part in the broadcast
    run_id = distributed.broadcast_object(run_dir.run_id_of(out_dir) if distributed.is_main() else None)
    run_id = run_id or prepare_run_dir(cfg)
    distributed.parallelize(model, cfg)  # before the optimizer: under FSDP2 it steps the shards
    master = hardware.MasterWeights(model) if getattr(cfg, "precision", "fp32") == "bf16" else None
    optimizer = make_optimizer(master.params if master else model, cfg.lr, cfg.weight_decay, betas=betas)
    schedule = lr_lambda(cfg.schedule, warmup_steps(cfg, total_steps), total_steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ckpt = distributed.broadcast_object(find_resumable(out_dir) if cfg.resume and distributed.is_main() else None)
    state: dict[str, Any] = {}
    if ckpt is not None:
        if master is not None:  # the optimizer's tensors are the master copies: fill them before its state
            load_model_weights(model, ckpt)
            master = hardware.MasterWeights(model)
            optimizer = make_optimizer(master.params, cfg.lr, cfg.weight_decay, betas=betas)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        schedule_for = lambda total: lr_lambda(cfg.schedule, warmup_steps(cfg, total), total, cfg.min_lr_ratio)  # noqa: E731
        run_dir.check_run_length(cfg, state, total_steps, schedule, schedule_for)
        if master is not None and state.get("master") is not None:
            master.load_state_dict(state["master"])  # exact fp32 values, not the bf16-rounded model weights
        # the saved learning rate belongs to the saved schedule: recompute it from this run's (a changed max_steps
        # allowed by allow_config_change must not leave the next step at the old schedule's rate)
        lrs = [base * schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() reports; LambdaLR has no public setter
        print(f"[alignkit {name}] resumed from {ckpt} at step {state['step']}")
    check_free_space(out_dir, 2 * estimate_checkpoint_bytes(model), "two checkpoints")
    start = int(state.get("step", 0))
    log: MetricsLog | NullLog = NullLog()  # rank 0 writes the metrics
    if distributed.is_main():
        trackers = open_trackers(cfg.report_to, out_dir, hparams=to_dict(cfg), project=cfg.tracker_project,
                                 run_name=cfg.run_name or out_dir.resolve().name, run_id=run_id)  # fmt: skip
        log = MetricsLog(out_dir, resume_step=start if ckpt is not None else None, trackers=trackers)
    return Run(cfg, total_steps, out_dir, optimizer, scheduler, log, start, state, run_id, master=master)


def step_range(run: Run, desc: str) -> Iterable[int]:
    """Steps ``run.start .. total_steps - 1``, as a tqdm bar when ``cfg.progress`` (it has ``set_postfix``)."""
    steps = range(run.start, run.total_steps)
    if not run.cfg.progress:
        return steps
    from tqdm.auto import tqdm

    # ranks other than 0: a disabled bar, so the loops' set_postfix calls stay valid
    return tqdm(
        steps, initial=run.start, total=run.total_steps, desc=desc, unit="step", disable=not distributed.is_main()
    )


def optimizer_step(run: Run, model: torch.nn.Module, loss: torch.Tensor | float | None = None) -> tuple:
    """Clip the trainable gradients (``cfg.max_grad_norm``; None: measure only), step, advance the schedule,
    zero the gradients. Returns (grad_norm before clipping, learning rate the step used).

    A non-finite ``loss`` or gradient norm skips the update (the schedule still advances, so the learning rate
    stays a function of the step): counted in ``run.nonfinite_steps`` and logged with the step; more than
    ``cfg.max_nonfinite_steps`` in a row raise :class:`TrainingDiverged` (the checkpoints on disk hold the
    weights from before the first bad step)."""
    cfg = run.cfg
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    if run.master is not None:
        run.master.grads_to_master()
    params = run.master.params if run.master is not None else [p for p in model.parameters() if p.requires_grad]
    grad_norm = distributed.data_parallel_grad_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = run.scheduler.get_last_lr()[0]
    bad = not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(float(loss)))
    if distributed.world_size() > 1:  # every rank takes the same skip decision
        bad = bool(distributed.all_reduce_sum(torch.tensor(float(bad))) > 0)
    run.skipped = bad
    if bad:
        run.nonfinite_steps += 1
        run.nonfinite_streak += 1
        limit = getattr(cfg, "max_nonfinite_steps", 3)
        print(f"[alignkit] step {run.scheduler.last_epoch + 1}: non-finite loss {loss} or grad norm {grad_norm}: "
              f"update skipped ({run.nonfinite_streak} in a row)", file=sys.stderr)  # fmt: skip
        if run.nonfinite_streak > limit:
            run.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"{run.nonfinite_streak} optimizer steps in a row had a non-finite loss or gradient norm (more than "
                f"max_nonfinite_steps={limit}); the run stops. Its checkpoints in {run.run_dir} hold weights from "
                "before the first bad step. Lower lr, check the data and rewards, or raise max_nonfinite_steps."
            )
    else:
        run.nonfinite_streak = 0
        run.optimizer.step()
        if run.master is not None:
            run.master.master_to_model()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.master is not None:
        model.zero_grad(set_to_none=True)
    return grad_norm, lr


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
    if run.timer is None:
        run.timer = hardware.StepTimer(model, next(model.parameters()).device)
    else:  # speed and memory of this step (the timer restarts after the bookkeeping below)
        record.update(run.timer.stats(int(record.get("num_tokens", 0)), devices=distributed.world_size()))
    if run.skipped or run.nonfinite_steps:
        record.update(skipped_nonfinite=run.skipped, nonfinite_steps=run.nonfinite_steps)
    if done % cfg.log_every == 0 or done == total_steps or "eval_loss" in record or run.skipped:
        run.log.log(record)
        if not cfg.progress and distributed.is_main():  # no bar: one line per logged step instead
            print(step_line(record, total_steps), flush=True)
    if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps:
        saved = save_checkpoint(
            run.run_dir,
            done,
            model=model,
            tokenizer=tokenizer,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            state={
                "total_steps": total_steps,  # a resume with another length checks the finished steps' lrs
                **(extra_state(done) if extra_state is not None else {}),
                **({"master": run.master.state_dict()} if run.master is not None else {}),
            },
            keep_last=cfg.keep_last,
            run_id=run.run_id,
        )
        if done == total_steps and distributed.is_main():
            publish_final_model(run.run_dir, saved)
    for cb in callbacks:
        cb(done, record)
    run.timer.start()
