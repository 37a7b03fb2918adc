"""KTO and BCO (unpaired preference optimisation), top to bottom.

rows {prompt, completion, label} (paired rows are unpaired: chosen -> desirable, rejected -> undesirable) ->
chat format -> tokens, plus for each example a mismatched sequence (its prompt, another prompt's completion) ->
reference log-probs (precomputed and cached, LoRA adapter off, an explicit model, or TR-DPO) -> per step:
KTO's reference point z0 from the step's mismatched sequences (no grad), then per micro-batch one forward and
`kto_loss` / `bco_loss` with the step's example count as normaliser -> AdamW -> metrics.jsonl + checkpoints.

    from alignkit.loops.kto import KTOConfig, train_kto
    train_kto(KTOConfig(model="runs/sft/checkpoint-900", dataset="labels.jsonl", output_dir="runs/kto"))

z0 (docs/LOSSES.md §5): Σ(π′−ρ′)/count over the step's mismatched sequences (all micro-batches), clamped at ≥ 0 and
detached; it is recomputed with the current policy every step. Each example's mismatched sequence pairs its prompt
with the completion of the next example whose prompt differs (fixed when tokenizing, so a precomputed reference
covers it). BCO's running reward mean is loop state: updated per micro-batch (update-then-use, TRL's order),
carried across steps and saved in checkpoints.

Config keys beyond the shared blocks: loss ("kto" | "apo_zero_unpaired" | "bco"), beta, desirable_weight,
undesirable_weight; the reference keys are `loops.config.ReferenceBlock`'s, as in DPO.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit import distributed
from alignkit.data.loading import load_rows
from alignkit.data.plan import LazyBatches, examples_in_plan
from alignkit.data.preference import collate_unpaired, tokenize_unpaired, unpaired_sequences
from alignkit.loops import common
from alignkit.loops.config import OfflineConfig, ReferenceBlock, require
from alignkit.losses.unpaired import BCOState, bco_loss, kto_loss, kto_reference_point, kto_weight_ratio
from alignkit.metrics import StepMetrics
from alignkit.models import eval_mode, is_peft, pad_token_id
from alignkit.reference import resolve_reference_kind
from alignkit.scoring import SequenceScorer, batch_sequence_logps


@dataclass
class KTOConfig(OfflineConfig, ReferenceBlock):
    output_dir: str = "runs/kto"
    truncation: Literal["right", "left"] = "right"  # which end of the prompt an example over max_length loses
    packing: bool = False  # pack a micro-batch's sequences into rows of <= max_length tokens
    loss: Literal["kto", "apo_zero_unpaired", "bco"] = "kto"  # kto, apo_zero_unpaired or bco
    beta: float = 0.1  # inverse temperature of the implicit reward
    desirable_weight: float = 1.0  # weight of desirable examples' losses (lambda_D)
    undesirable_weight: float = 1.0  # weight of undesirable examples' losses (lambda_U)

    def check(self) -> None:
        require(self, self.beta > 0, "beta", "a number > 0")
        require(self, self.desirable_weight > 0, "desirable_weight", "a number > 0")
        require(self, self.undesirable_weight > 0, "undesirable_weight", "a number > 0")
        require(self, self.loss != "bco" or distributed.env_world_size() == 1, "loss",
                "kto or apo_zero_unpaired under several ranks: BCO's running reward mean follows the micro-batch "
                "order, which the ranks split")  # fmt: skip


_WEIGHTS = {
    "rewards/chosen": "n_desirable",
    "logps/chosen": "n_desirable",
    "rewards/rejected": "n_undesirable",
    "logps/rejected": "n_undesirable",
    "n_desirable": None,
    "n_undesirable": None,
    "kl": "last",
    "delta": "last",
    "loss": None,
}


def _step_metrics() -> StepMetrics:
    return StepMetrics(_WEIGHTS, None)


def _finish(metrics: dict[str, float]) -> dict[str, float]:
    metrics.pop("rewards/margins", None)  # a difference of side means: recomputed from the step's means
    metrics["rewards/margins"] = metrics.get("rewards/chosen", 0.0) - metrics.get("rewards/rejected", 0.0)
    return metrics


def _batch(
    examples: Sequence[dict[str, Any]], cfg: KTOConfig, pad_id: int, kl: bool = False, vision: Any = None
) -> dict[str, Any]:
    return collate_unpaired(
        examples, pad_token_id=pad_id, kl=kl, packing=cfg.packing, capacity=cfg.max_length, vision=vision
    )


@torch.no_grad()
def kl_reference_point(model, micro: Sequence[Sequence[dict]], cfg: KTOConfig, reference, pad_id: int,  # noqa: ANN001
                       over_ranks: bool = False, vision: Any = None) -> torch.Tensor:  # fmt: skip
    """z0 = max(0, Σ(π′−ρ′) / count) over the mismatched sequences of all micro-batches of a step (no grad);
    mismatched sequences that truncation left empty are not counted. ``over_ranks`` (a training step, whose
    micro-batches the ranks share): each rank scores its share and the sums and counts are all-reduced (exact,
    where TRL averages the ranks' means); without it this rank scores them all (an evaluation)."""
    total, count = torch.zeros(()), torch.zeros(())
    for mb in distributed.shard(micro) if over_ranks else micro:
        kb = _batch(mb, cfg, pad_id, kl=True, vision=vision)
        pol = batch_sequence_logps(model, kb, temperature=cfg.temperature, token_chunk=cfg.token_chunk)
        keep = pol["n_tokens"] > 0
        s, c = kto_reference_point(pol["sum"][keep], reference.logps(model, kb)[keep])
        total, count = total + s.cpu(), count + c.cpu()
    if over_ranks:
        total, count = distributed.all_reduce_sum(torch.stack([total, count])).unbind()
    return (total / count.clamp_min(1.0)).clamp_min(0.0)


def _micro(model, batch, cfg: KTOConfig, reference, z0, bco_state, normalizer: float, train: bool = True):  # noqa: ANN001, ANN202
    """Loss, metrics and BCO state of one micro-batch (one forward of its completions)."""
    ref = reference.logps(model, batch)
    pol = batch_sequence_logps(model, batch, temperature=cfg.temperature, token_chunk=cfg.token_chunk)
    desirable = batch["desirable"].to(pol["sum"].device)
    if cfg.loss == "bco":
        return bco_loss(pol["sum"], ref, desirable, bco_state, beta=cfg.beta, update_state=train, normalizer=normalizer)
    loss, metrics = kto_loss(
        pol["sum"],
        ref,
        desirable,
        kl_ref_point=z0,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        loss_type=cfg.loss,
        normalizer=normalizer,
    )
    return loss, metrics, bco_state


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[dict],
    cfg: KTOConfig,
    reference: Any,
    bco_state: Any,
    pad_id: int,
    vision: Any = None,
) -> dict[str, float]:
    """Loss and side metrics over `examples` (z0 from all of them; BCO state used, not updated); `eval_` keys."""
    with eval_mode(model):
        chunks = [examples[i : i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
        with common.precision(cfg, model):
            z0 = kl_reference_point(model, chunks, cfg, reference, pad_id, vision=vision) if cfg.loss == "kto" else None
        acc = _step_metrics()
        for mb in chunks:
            with common.precision(cfg, model):
                loss, metrics, _ = _micro(
                    model, _batch(mb, cfg, pad_id, vision=vision), cfg, reference, z0, bco_state, len(examples), False
                )
            acc.add({"loss": loss, **metrics})
    return {f"eval_{k}": v for k, v in _finish(acc.result()).items()}


def train_kto(
    cfg: KTOConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    ref_model: torch.nn.Module | None = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    image_processor: Any = None,
) -> dict[str, Any]:
    """Run KTO / APO-zero (unpaired) / BCO. Returns a summary with the reference's info and the final BCO state.
    A vision-language model trains on rows with images (as DPO)."""
    if cfg.loss not in ("kto", "apo_zero_unpaired", "bco"):
        raise ValueError(f"loss={cfg.loss!r}; expected kto, apo_zero_unpaired or bco")
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    common.prepare_run_dir(cfg)  # before anything is loaded: a bad output_dir fails fast
    model, tokenizer = common.load_policy(cfg, model, tokenizer)
    vision = common.vision_processor(model, tokenizer, cfg, image_processor)  # None for a text model
    pad_id = pad_token_id(tokenizer)
    kind = resolve_reference_kind(cfg.reference, lora=cfg.lora_r > 0 or is_peft(model))
    scorer = SequenceScorer(temperature=cfg.temperature, token_chunk=cfg.token_chunk)

    tok_kw = dict(chat_format=cfg.chat_format, max_length=cfg.max_length, truncation=cfg.truncation)
    rows = load_rows(train_data if train_data is not None else cfg.train_source(), cfg.dataset_split).to_list()
    tok_kw["kl_completions"] = cfg.loss == "kto"  # only KTO's reference point reads mismatched sequences
    train, report = tokenize_unpaired(tokenizer, rows, vision=vision, **tok_kw)
    n_d = sum(e["desirable"] for e in train)
    print(f"[alignkit {cfg.loss}] train: {report}; {n_d} desirable, {len(train) - n_d} undesirable")
    if cfg.loss == "kto" and 0 < n_d < len(train):
        ratio = kto_weight_ratio(cfg.desirable_weight, cfg.undesirable_weight, n_d, len(train) - n_d)
        if not 1.0 <= ratio <= 4 / 3:
            print(f"[alignkit kto] λ_D·n_D/(λ_U·n_U) = {ratio:.2f}; the KTO paper recommends [1, 4/3]")
    evals: list[dict[str, Any]] = []
    if eval_data is not None or cfg.eval_dataset:
        eval_rows = load_rows(eval_data if eval_data is not None else cfg.eval_dataset, cfg.eval_split).to_list()
        evals = tokenize_unpaired(tokenizer, eval_rows[: cfg.eval_rows], vision=vision, **tok_kw)[0]

    # the reference, fixed before any update and before LoRA wraps the policy (see the DPO loop)
    def batches(examples: list[dict[str, Any]]) -> LazyBatches:
        def collate(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
            kl = [_batch(chunk, cfg, pad_id, kl=True, vision=vision)] if cfg.loss == "kto" else []
            return [_batch(chunk, cfg, pad_id, vision=vision), *kl]

        return LazyBatches(examples, cfg.batch_size, collate, per_chunk=2 if cfg.loss == "kto" else 1)

    # a precomputed reference scores only the examples (and their KL sequences) the run's steps read
    plan, total_steps = common.plan_steps([1] * len(train), cfg)
    with common.precision(cfg, model):
        reference, eval_reference = common.data_references(
            kind, cfg, model, train, evals, scorer=scorer, ref_model=ref_model, sequences=unpaired_sequences,
            batches=batches, settings={"family": "unpaired", **tok_kw}, needed=examples_in_plan(plan, total_steps),
        )  # fmt: skip
    print(f"[alignkit {cfg.loss}] reference: {reference.info}")
    model = common.maybe_add_lora(model, cfg)

    run = common.start_run(model, cfg, total_steps, cfg.loss)
    reference.load_state_dict(run.state.get("reference", {}))
    bco_state = BCOState.initial()
    if run.state.get("bco_state") is not None:
        bco_state = BCOState(*(torch.as_tensor(v) for v in run.state["bco_state"]))
    model.train()
    steps = common.step_range(run, cfg.loss)

    def saved_state(step: int) -> dict[str, Any]:  # read at save time: the reference and BCO's running state
        return {"reference": reference.state_dict(), "bco_state": tuple(t.detach().cpu() for t in bco_state)}

    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        micro = [[train[i] for i in mb] for mb in plan[step]]
        n_examples = float(sum(len(mb) for mb in micro))  # the global normaliser: examples in the step
        with common.precision(cfg, model):
            z0 = (
                kl_reference_point(model, micro, cfg, reference, pad_id, over_ranks=True, vision=vision)
                if cfg.loss == "kto"
                else None
            )
        acc = _step_metrics()
        for mb, grad_sync in distributed.my_micro_batches(model, micro):  # this rank's share of the step
            batch = _batch(mb, cfg, pad_id, vision=vision)
            with grad_sync:
                with common.precision(cfg, model):
                    loss, metrics, bco_state = _micro(model, batch, cfg, reference, z0, bco_state, n_examples)
                distributed.backward(loss)
            acc.add({"loss": loss.detach(), **metrics, "num_tokens": float(batch["n_tokens"])})
        stats = acc.result(over_ranks=True)
        n_tokens = int(stats.pop("num_tokens"))
        grad_norm, lr = common.optimizer_step(run, model, loss=acc.total("loss"))
        done = step + 1
        reference.after_step(model, done)

        counts = {"num_examples": int(n_examples), "num_tokens": n_tokens}
        record = common.step_record(done, _finish(stats), lr, grad_norm, t0, **counts)
        if evals and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            record.update(evaluate(model, evals, cfg, eval_reference, bco_state, pad_id, vision))
        if cfg.progress:
            steps.set_postfix(loss=f"{record['loss']:.4f}")
        common.end_step(run, record, model=model, tokenizer=vision or tokenizer, callbacks=callbacks,
                        extra_state=saved_state)  # fmt: skip
    run.log.close()
    return {
        "steps": total_steps,
        "last": record,
        "run_dir": str(run_dir),
        "report": str(report),
        "reference": dict(reference.info),
        "bco_state": {"mean": float(bco_state.mean), "count": float(bco_state.count)},
    }
