"""Direct preference optimisation (and its family), top to bottom.

Composes: pairs (`data.preference`) -> a reference (`reference.build_reference`: precomputed and cached, LoRA
adapter off, a separate model, or TR-DPO) -> one forward of chosen+rejected per micro-batch
(`scoring.batch_sequence_logps`) -> `losses.preference` with the step's pair count as normaliser -> `loops.common`.

    from alignkit.loops.dpo import DPOConfig, train_dpo
    train_dpo(DPOConfig(model="runs/sft/checkpoint-900", dataset="pairs.jsonl", output_dir="runs/dpo"))

Config keys beyond the shared blocks:
    loss: "dpo" (reference-based, `dpo_loss`), or reference-free "simpo", "cpo", "orpo".
    loss_type / loss_weights: DPO variant(s) of `DPO_LOSSES` (+ "sft"); a list is a weighted mixture (MPO).
        For loss="cpo", loss_type[0] is the CPO form (sigmoid, hinge, ipo, simpo).
    beta, label_smoothing, f_divergence, f_alpha, discopop_tau, ipo_length_normalize, ld_alpha (LD-DPO),
    wpo (WPO pair weights), simpo_margin (γ of SimPO / CPO-simpo), cpo_alpha (AlphaPO), nll_coef (CPO).
    The reference keys are `loops.config.ReferenceBlock`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit import distributed
from alignkit.data.loading import load_rows
from alignkit.data.plan import LazyBatches, examples_in_plan
from alignkit.data.preference import collate_pairs, pair_sequences, tokenize_pairs
from alignkit.logprobs import IGNORE_INDEX
from alignkit.loops import common
from alignkit.loops.config import OfflineConfig, ReferenceBlock, require
from alignkit.losses.preference import CPO_LOSSES, F_DIVERGENCES, LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss
from alignkit.metrics import StepMetrics
from alignkit.models import eval_mode, is_peft, pad_token_id
from alignkit.ops import split_pairs
from alignkit.reference import resolve_reference_kind
from alignkit.scoring import SequenceScorer, batch_sequence_logps


@dataclass
class DPOLossBlock:
    """The keys of ``losses.preference.dpo_loss`` (the offline and the online DPO loops share them)."""

    # DPO variant(s) (losses.DPO_LOSSES, + "sft"); several: a weighted mixture (offline cpo: the CPO form)
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None  # weights of the loss_type mixture (None: all 1)
    beta: float = 0.1  # inverse temperature of the implicit reward
    label_smoothing: float = 0.0  # assumed fraction of flipped preference labels (cDPO / robust DPO)
    f_divergence: str = "reverse_kl"  # f-DPO divergence: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha: float = 0.5  # alpha of f_divergence=alpha_divergence
    discopop_tau: float = 0.05  # temperature of the DiscoPOP loss
    ipo_length_normalize: bool = True  # IPO: log-ratios divided by the completion length (as TRL)

    def check(self) -> None:
        types = list(self.loss_type)
        require(self, bool(types), "loss_type", "at least one loss type")
        w = self.loss_weights
        require(self, w is None or len(w) == len(types), "loss_weights", f"one weight per loss_type ({len(types)})")
        require(self, self.beta > 0, "beta", "a number > 0")
        require(self, 0 <= self.label_smoothing < 0.5, "label_smoothing", "a number in [0, 0.5)")
        require(self, self.f_divergence in F_DIVERGENCES, "f_divergence", f"one of {list(F_DIVERGENCES)}")


def dpo_options(cfg: DPOLossBlock) -> dict[str, Any]:
    """The ``dpo_loss`` keywords a config sets."""
    keys = [f.name for f in fields(DPOLossBlock)]
    return {k: getattr(cfg, k) for k in keys}


@dataclass
class DPOConfig(OfflineConfig, ReferenceBlock, DPOLossBlock):
    output_dir: str = "runs/dpo"
    truncation: Literal["right", "left"] = "right"  # which end of the prompt a pair over max_length loses
    packing: bool = False  # pack the 2P sequences of a micro-batch into rows of <= max_length tokens
    loss: Literal["dpo", "simpo", "cpo", "orpo"] = "dpo"  # dpo (with a reference), or reference-free simpo / cpo / orpo
    ld_alpha: float | None = None  # LD-DPO: weight of tokens past the shorter completion's length
    wpo: bool = False  # WPO: weight each pair by w(y_c)·w(y_r)
    simpo_margin: float = 0.5  # γ (logit units) for simpo and cpo's simpo form
    cpo_alpha: float = 0.0  # AlphaPO reward shape for cpo
    nll_coef: float = 1.0  # weight of the chosen NLL term in cpo

    def check(self) -> None:
        types = list(self.loss_type)
        if self.loss == "cpo":
            require(self, types[0] in CPO_LOSSES, "loss_type", f"a CPO form, one of {list(CPO_LOSSES)}")
        elif self.loss == "dpo":
            unknown = [t for t in types if t not in LOSS_TYPES]
            require(self, not unknown, "loss_type", f"types of {list(LOSS_TYPES)} (unknown DPO loss_type {unknown})")
        require(self, self.ld_alpha is None or 0 <= self.ld_alpha <= 1, "ld_alpha", "a weight in [0, 1] (or none)")


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
        **dpo_options(cfg),
        chosen_lengths=n_c,
        rejected_lengths=n_r,
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
_METRIC_WEIGHTS = {"loss": None, "n_pairs": None, "nll": None, "num_tokens": None}


def _step_metrics() -> StepMetrics:
    return StepMetrics(_METRIC_WEIGHTS | {f"loss/{t}": None for t in ("sft", *LOSS_TYPES)}, "n_pairs")


def _micro(model, batch, cfg: DPOConfig, reference, n_pairs: float, n_chosen_tok: float):  # noqa: ANN001, ANN202
    """Loss and metrics of one micro-batch: reference values (no grad), then ONE policy forward of 2P rows."""
    ref = None if cfg.loss in REFERENCE_FREE else reference.logps(model, batch)
    pol = batch_sequence_logps(
        model, batch, temperature=cfg.temperature, token_chunk=cfg.token_chunk, ld_alpha=cfg.ld_alpha, wpo=cfg.wpo
    )
    return PAIR_LOSSES[cfg.loss](cfg, pol, ref, n_pairs, n_chosen_tok)


def _chosen_tokens(pairs: Sequence[dict[str, Any]]) -> int:
    # labels[0] is never scored (collate drops it), matching the forward's mask
    return sum(sum(1 for x in p["chosen_labels"][1:] if x != IGNORE_INDEX) for p in pairs)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, pairs: Sequence[dict[str, Any]], cfg: DPOConfig, reference: Any, pad_id: int,
    vision: Any = None,
) -> dict[str, float]:  # fmt: skip
    """Loss (pair mean) and reward metrics over `pairs`, keys prefixed `eval_`."""
    with eval_mode(model):
        n_pairs, n_tok = float(len(pairs)), float(max(_chosen_tokens(pairs), 1))
        acc = _step_metrics()
        for i in range(0, len(pairs), cfg.batch_size):
            batch = collate_pairs(
                pairs[i : i + cfg.batch_size], pad_token_id=pad_id, packing=cfg.packing, capacity=cfg.max_length,
                vision=vision,
            )  # fmt: skip
            with common.precision(cfg, model):
                loss, metrics = _micro(model, batch, cfg, reference, n_pairs, n_tok)
            acc.add({"loss": loss, **metrics})
    return {f"eval_{k}": v for k, v in acc.result().items()}


def train_dpo(
    cfg: DPOConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    ref_model: torch.nn.Module | None = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    image_processor: Any = None,
) -> dict[str, Any]:
    """Run DPO (or SimPO/CPO/ORPO). Pass objects or let `cfg` name them. Returns a summary including the
    reference's info (`summary["reference"]`: kind, and for precomputed the cache key/path, `cache_hit` and the
    number of reference `forward_passes` this run made). A vision-language model trains on pairs with images
    (the reference precomputed and cached for them too)."""
    if cfg.loss not in PAIR_LOSSES:
        raise ValueError(f"loss={cfg.loss!r}; expected one of {list(PAIR_LOSSES)}")
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    common.prepare_run_dir(cfg)  # before anything is loaded: a bad output_dir fails fast
    model, tokenizer = common.load_policy(cfg, model, tokenizer)
    vision = common.vision_processor(model, tokenizer, cfg, image_processor)  # None for a text model
    pad_id = pad_token_id(tokenizer)
    lora = cfg.lora_r > 0 or is_peft(model)
    kind = resolve_reference_kind(cfg.reference, reference_free=cfg.loss in REFERENCE_FREE, lora=lora)
    scorer = SequenceScorer(temperature=cfg.temperature, token_chunk=cfg.token_chunk, ld_alpha=cfg.ld_alpha)

    # rows -> chosen/rejected tokens (pairs with an empty completion after truncation are dropped and reported)
    tok_kw = dict(chat_format=cfg.chat_format, max_length=cfg.max_length, truncation=cfg.truncation)
    rows = load_rows(train_data if train_data is not None else cfg.train_source(), cfg.dataset_split).to_list()
    train, report = tokenize_pairs(tokenizer, rows, vision=vision, **tok_kw)
    print(f"[alignkit dpo] train: {report}")
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        eval_rows = load_rows(eval_data if eval_data is not None else cfg.eval_dataset, cfg.eval_split).to_list()
        evals = tokenize_pairs(tokenizer, eval_rows[: cfg.eval_rows], vision=vision, **tok_kw)[0]

    # the reference, fixed before any update and before LoRA wraps the policy (a copy of the bare model is what
    # model / TR-DPO keep); a resume below loads trained weights only afterwards
    def batches(pairs: list[dict[str, Any]]) -> LazyBatches:
        collate = lambda chunk: [collate_pairs(chunk, pad_token_id=pad_id, packing=cfg.packing,  # noqa: E731
                                               capacity=cfg.max_length, vision=vision)]  # fmt: skip
        return LazyBatches(pairs, cfg.batch_size, collate)

    # the whole data order, fixed by the seed (resuming means skipping to a step); a precomputed reference scores
    # only the pairs the run's steps read
    plan, total_steps = common.plan_steps([1] * len(train), cfg, "pairs")
    with common.precision(cfg, model):
        reference, eval_reference = common.data_references(
            kind, cfg, model, train, evals, scorer=scorer, ref_model=ref_model, sequences=pair_sequences,
            batches=batches, settings={"family": "pairs", **tok_kw}, needed=examples_in_plan(plan, total_steps),
        )  # fmt: skip
    print(f"[alignkit dpo] reference: {reference.info}")
    model = common.maybe_add_lora(model, cfg)

    run = common.start_run(model, cfg, total_steps, "dpo")
    reference.load_state_dict(run.state.get("reference", {}))
    model.train()
    steps = common.step_range(run, cfg.loss)

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
        for mb, grad_sync in distributed.my_micro_batches(model, micro):  # this rank's share of the step
            batch = collate_pairs(mb, pad_token_id=pad_id, packing=cfg.packing, capacity=cfg.max_length, vision=vision)
            with grad_sync:
                with common.precision(cfg, model):
                    loss, metrics = _micro(model, batch, cfg, reference, n_pairs, n_chosen_tok)
                distributed.backward(loss)
            acc.add({"loss": loss.detach(), **metrics, "num_tokens": float(batch["n_tokens"])})
        stats = acc.result(over_ranks=True)
        n_tokens = int(stats.pop("num_tokens"))
        stats.pop("n_pairs", None)  # the record's num_pairs: one name per quantity
        grad_norm, lr = common.optimizer_step(run, model, loss=acc.total("loss"))
        done = step + 1
        reference.after_step(model, done)

        counts = {"num_pairs": int(n_pairs), "num_tokens": n_tokens}
        record = common.step_record(done, stats, lr, grad_norm, t0, **counts)
        if evals and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            record.update(evaluate(model, evals, cfg, eval_reference, pad_id, vision))
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracies', 0):.2f}")
        common.end_step(run, record, model=model, tokenizer=vision or tokenizer, callbacks=callbacks,
                        extra_state=saved_state)  # fmt: skip
    run.log.close()
    return {
        "steps": total_steps,
        "last": record,
        "run_dir": str(run_dir),
        "report": str(report),
        "reference": dict(reference.info),
    }
