"""Direct preference optimisation (and its family), top to bottom.

pairs -> chat format -> chosen/rejected tokens -> reference log-probs (precomputed and cached, LoRA adapter off,
an explicit model, or TR-DPO) -> one forward of chosen+rejected per micro-batch through the chunked log-prob head
-> `dpo_loss` (or SimPO / CPO / ORPO) with the step's pair count as normaliser -> AdamW -> metrics.jsonl + atomic
checkpoints.

    from alignkit.loops.dpo import DPOConfig, train_dpo
    train_dpo(DPOConfig(model="runs/sft/checkpoint-900", dataset="pairs.jsonl", output_dir="runs/dpo"))

Config keys beyond the SFT-like ones:
    loss: "dpo" (reference-based, `dpo_loss`), or reference-free "simpo", "cpo", "orpo".
    loss_type / loss_weights: DPO variant(s) of `DPO_LOSSES` (+ "sft"); a list is a weighted mixture (MPO).
        For loss="cpo", loss_type[0] is the CPO form (sigmoid, hinge, ipo, simpo).
    beta, label_smoothing, f_divergence, f_alpha, discopop_tau, ipo_length_normalize, ld_alpha (LD-DPO),
    wpo (WPO pair weights), simpo_margin (γ of SimPO / CPO-simpo), cpo_alpha (AlphaPO), nll_coef (CPO).
    reference: "precomputed" | "lora" | "model" | "tr_dpo" (see alignkit.reference); reference_cache_dir,
        ref_model (path for "model"/"tr_dpo"; default a frozen copy of the initial policy), tr_dpo_alpha,
        tr_dpo_sync_steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.data.loading import load_rows
from alignkit.data.preference import collate_pairs, pair_sequences, split_pairs, tokenize_pairs
from alignkit.loops._preference_common import (
    StepMetrics,
    add_lora,
    check_reference_choice,
    is_peft,
    load_policy,
    make_reference,
    model_reference,
    pad_token_id,
)
from alignkit.loops.common import end_step, optimizer_step, plan_batches, start_run, step_range
from alignkit.losses.preference import cpo_loss, dpo_loss, orpo_loss, simpo_loss
from alignkit.reference import Scorer, batch_sequence_logps


@dataclass
class DPOConfig:
    model: str = ""  # HF id or local folder (ignored when a model object is passed to train_dpo)
    dataset: str = ""  # rows {prompt?, chosen, rejected}: plain strings or conversations
    dataset_split: str = "train"
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_rows: int | None = 256
    output_dir: str = "runs/dpo"
    chat_format: str | None = None  # registered name; None = detect from the tokenizer's template
    max_length: int = 1024  # per sequence (prompt + completion)
    truncation: Literal["right", "left"] = "right"
    packing: bool = False  # pack the 2P sequences of a micro-batch into rows of <= max_length tokens
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    loss: Literal["dpo", "simpo", "cpo", "orpo"] = "dpo"
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    discopop_tau: float = 0.05
    ipo_length_normalize: bool = True
    ld_alpha: float | None = None  # LD-DPO: weight of tokens past the shorter completion's length
    wpo: bool = False  # WPO: weight each pair by w(y_c)·w(y_r)
    simpo_margin: float = 0.5  # γ (logit units) for simpo and cpo's simpo form
    cpo_alpha: float = 0.0  # AlphaPO reward shape for cpo
    nll_coef: float = 1.0  # weight of the chosen NLL term in cpo
    reference: Literal["precomputed", "lora", "model", "tr_dpo"] = "precomputed"
    reference_cache_dir: str | None = None  # None = $ALIGNKIT_CACHE/reference or ~/.cache/alignkit/reference
    ref_model: str | None = None
    tr_dpo_alpha: float = 0.6
    tr_dpo_sync_steps: int = 512
    temperature: float = 1.0  # log-probs of logits / temperature (policy and reference alike)
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None
    save_every: int | None = None  # steps between checkpoints; the final state is always saved
    keep_last: int = 2
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True
    token_chunk: int = 2048
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


# ----------------------------------------------------------------------------------------------------------
# Losses on per-sequence log-probs: family name -> (cfg, policy results, reference [2P], pairs, chosen tokens)
# ----------------------------------------------------------------------------------------------------------


def _dpo(cfg: DPOConfig, pol: dict, ref: torch.Tensor, n_pairs: float, n_chosen_tok: float):  # noqa: ANN202
    pc, pr = split_pairs(pol["ld_sum"] if cfg.ld_alpha is not None else pol["sum"])
    rc, rr = split_pairs(ref)
    n_c, n_r = split_pairs(pol["n_tokens"])
    weights = None
    if cfg.wpo:
        w_c, w_r = split_pairs(pol["wpo"])
        weights = w_c * w_r
    return dpo_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=cfg.loss_type,
        loss_weights=cfg.loss_weights,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        f_divergence=cfg.f_divergence,
        f_alpha=cfg.f_alpha,
        discopop_tau=cfg.discopop_tau,
        chosen_lengths=n_c,
        rejected_lengths=n_r,
        ipo_length_normalize=cfg.ipo_length_normalize,
        pair_weights=weights,
        sft_logps=split_pairs(pol["sum"])[0],  # the sft term is never LD-reduced
        sft_normalizer=n_chosen_tok,
        normalizer=n_pairs,
    )


def _means(pol: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mean = pol["sum"] / pol["n_tokens"].clamp_min(1.0)
    return split_pairs(mean)


def _chosen_nll(pol: dict, n_chosen_tok: float) -> torch.Tensor:
    # this micro-batch's share of the step's chosen token-mean NLL (global token count as normaliser)
    return -split_pairs(pol["sum"])[0].sum() / n_chosen_tok


def _simpo(cfg: DPOConfig, pol: dict, ref: Any, n_pairs: float, n_chosen_tok: float):  # noqa: ANN202
    c, r = _means(pol)
    return simpo_loss(
        c, r, beta=cfg.beta, margin=cfg.simpo_margin, label_smoothing=cfg.label_smoothing, normalizer=n_pairs
    )


def _cpo(cfg: DPOConfig, pol: dict, ref: Any, n_pairs: float, n_chosen_tok: float):  # noqa: ANN202
    kind = cfg.loss_type[0]
    c, r = _means(pol) if kind in ("ipo", "simpo") else split_pairs(pol["sum"])  # TRL: means for ipo/simpo
    return cpo_loss(
        c,
        r,
        loss_type=kind,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        margin=cfg.simpo_margin,
        alpha=cfg.cpo_alpha,
        nll=_chosen_nll(pol, n_chosen_tok),
        nll_coef=cfg.nll_coef,
        normalizer=n_pairs,
    )


def _orpo(cfg: DPOConfig, pol: dict, ref: Any, n_pairs: float, n_chosen_tok: float):  # noqa: ANN202
    c, r = _means(pol)
    return orpo_loss(c, r, _chosen_nll(pol, n_chosen_tok), beta=cfg.beta, normalizer=n_pairs)


PAIR_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "dpo": _dpo,
    "simpo": _simpo,
    "cpo": _cpo,
    "orpo": _orpo,
}
REFERENCE_FREE = ("simpo", "cpo", "orpo")
# metric name -> the count it is a mean over (None: already globally normalised, so micro-batches add up)
_METRIC_WEIGHTS = {"n_pairs": None, "nll": None}


def _step_metrics() -> StepMetrics:
    return StepMetrics(_METRIC_WEIGHTS | {f"loss/{t}": None for t in ("sft", *_all_types())}, "n_pairs")


def _all_types() -> tuple[str, ...]:
    from alignkit.losses.preference import LOSS_TYPES

    return tuple(LOSS_TYPES)


def _micro(model, batch, cfg: DPOConfig, reference, n_pairs: float, n_chosen_tok: float):  # noqa: ANN001, ANN202
    """Loss and metrics of one micro-batch: reference values (no grad), then ONE policy forward of 2P rows."""
    ref = None if cfg.loss in REFERENCE_FREE else reference.logps(model, batch)
    pol = batch_sequence_logps(
        model, batch, temperature=cfg.temperature, token_chunk=cfg.token_chunk, ld_alpha=cfg.ld_alpha, wpo=cfg.wpo
    )
    return PAIR_LOSSES[cfg.loss](cfg, pol, ref, n_pairs, n_chosen_tok)


def _chosen_tokens(pairs: Sequence[dict[str, Any]]) -> int:
    # labels[0] is never scored (collate drops it), matching the forward's mask
    return sum(sum(1 for x in p["chosen_labels"][1:] if x != -100) for p in pairs)


@torch.no_grad()
def evaluate(model, pairs: Sequence[dict[str, Any]], cfg: DPOConfig, reference, pad_id: int) -> dict[str, float]:  # noqa: ANN001
    """Loss (pair mean) and reward metrics over `pairs`, keys prefixed `eval_`."""
    was_training = model.training
    model.eval()
    n_pairs, n_tok = float(len(pairs)), float(max(_chosen_tokens(pairs), 1))
    acc = _step_metrics()
    loss_sum = 0.0
    for i in range(0, len(pairs), cfg.batch_size):
        batch = collate_pairs(
            pairs[i : i + cfg.batch_size], pad_token_id=pad_id, packing=cfg.packing, capacity=cfg.max_length
        )
        loss, metrics = _micro(model, batch, cfg, reference, n_pairs, n_tok)
        loss_sum += float(loss)
        acc.add(metrics)
    model.train(was_training)
    return {"eval_loss": loss_sum, **{f"eval_{k}": v for k, v in acc.result().items()}}


def train_dpo(
    cfg: DPOConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    ref_model: torch.nn.Module | None = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Run DPO (or SimPO/CPO/ORPO). Pass objects or let `cfg` name them. Returns a summary including the
    reference's info (`summary["reference"]`: kind, and for precomputed the cache key/path, `cache_hit` and the
    number of reference `forward_passes` this run made)."""
    if cfg.loss not in PAIR_LOSSES:
        raise ValueError(f"loss={cfg.loss!r}; expected one of {list(PAIR_LOSSES)}")
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if model is None:
        model, tokenizer = load_policy(cfg)
    pad_id = pad_token_id(tokenizer)
    kind = check_reference_choice(cfg, cfg.loss in REFERENCE_FREE, model)
    scorer = Scorer(temperature=cfg.temperature, token_chunk=cfg.token_chunk, ld_alpha=cfg.ld_alpha)
    prebuilt = model_reference(kind, cfg, model, ref_model, scorer)  # before LoRA: a copy of the bare model
    if cfg.lora_r > 0 and not is_peft(model):
        model = add_lora(model, cfg)

    # rows -> chosen/rejected tokens (pairs with an empty completion after truncation are dropped and reported)
    tok_kw = dict(chat_format=cfg.chat_format, max_length=cfg.max_length, truncation=cfg.truncation)
    rows = load_rows(train_data if train_data is not None else cfg.dataset, cfg.dataset_split).to_list()
    train, report = tokenize_pairs(tokenizer, rows, **tok_kw)
    print(f"[alignkit dpo] train: {report}")
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        eval_rows = load_rows(eval_data if eval_data is not None else cfg.eval_dataset, cfg.eval_split).to_list()
        evals = tokenize_pairs(tokenizer, eval_rows[: cfg.eval_rows], **tok_kw)[0]

    # the reference, fixed before any update (a resume below loads trained weights only afterwards)
    def reference_for(pairs: list[dict[str, Any]]) -> Any:
        def batches():  # noqa: ANN202
            for i in range(0, len(pairs), cfg.batch_size):
                chunk = pairs[i : i + cfg.batch_size]
                yield collate_pairs(chunk, pad_token_id=pad_id, packing=cfg.packing, capacity=cfg.max_length)

        settings = {"family": "pairs", **tok_kw}
        sequences = lambda: pair_sequences(pairs)
        return make_reference(
            kind, cfg, model, scorer, prebuilt=prebuilt, sequences=sequences, batches=batches, settings=settings
        )

    reference = reference_for(train)
    eval_reference = reference_for(evals) if evals and kind == "precomputed" else reference
    print(f"[alignkit dpo] reference: {reference.info}")

    # the whole data order, fixed by the seed: resuming means skipping to a step
    plan = plan_batches(
        [1] * len(train), seed=cfg.seed, epochs=cfg.epochs, grad_accum=cfg.grad_accum, batch_size=cfg.batch_size
    )
    total_steps = min(len(plan), cfg.max_steps) if cfg.max_steps else len(plan)
    if total_steps == 0:
        raise ValueError(f"no full optimizer step: {len(train)} pairs, grad_accum={cfg.grad_accum}")

    run = start_run(model, cfg, total_steps, "dpo")
    reference.load_state_dict(run.state.get("reference", {}))
    model.train()
    steps = step_range(run, cfg.loss)

    def saved_state(step: int) -> dict[str, Any]:  # beside the weights in each checkpoint
        return {"reference": reference.state_dict()}

    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        micro = [[train[i] for i in mb] for mb in plan[step]]
        # Global normalisers: pairs (and chosen tokens, for NLL terms) over all micro-batches of the step, so
        # summing micro-batch losses gives exactly the full-batch gradient whatever the split.
        n_pairs = float(sum(len(mb) for mb in micro))
        n_chosen_tok = float(max(sum(_chosen_tokens(mb) for mb in micro), 1))
        acc = _step_metrics()
        loss_sum = torch.zeros(())
        n_tokens = 0
        for mb in micro:
            batch = collate_pairs(mb, pad_token_id=pad_id, packing=cfg.packing, capacity=cfg.max_length)
            loss, metrics = _micro(model, batch, cfg, reference, n_pairs, n_chosen_tok)
            loss.backward()
            loss_sum += loss.detach().cpu()
            acc.add(metrics)
            n_tokens += batch["n_tokens"]
        grad_norm, lr = optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm)
        done = step + 1
        reference.after_step(model, done)

        record = {"step": done, "loss": float(loss_sum), "lr": lr, "grad_norm": grad_norm, **acc.result()}
        record.update(num_pairs=int(n_pairs), num_tokens=n_tokens, step_time_s=time.perf_counter() - t0)
        if evals and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            record.update(evaluate(model, evals, cfg, eval_reference, pad_id))
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracies', 0):.2f}")
        end_step(run, record, model=model, tokenizer=tokenizer, callbacks=callbacks, extra_state=saved_state)
    run.log.close()
    return {
        "steps": total_steps,
        "last": record,
        "run_dir": str(run_dir),
        "report": str(report),
        "reference": dict(reference.info),
    }
