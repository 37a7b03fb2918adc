"""Pieces the DPO and KTO loops share: model + LoRA set-up, choosing the reference, folding micro-batch metrics,
one optimizer step. Small on purpose; each loop still reads top to bottom."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.reference import (
    REFERENCE_KINDS,
    LoraReference,
    ModelReference,
    NoReference,
    PrecomputedReference,
    Scorer,
    SyncedReference,
)


def load_policy(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """Model + tokenizer named by `cfg.model` (dtype and attention implementation from cfg)."""
    from alignkit.models import load_model_and_tokenizer

    if not cfg.model:
        raise ValueError("no model: set `model` in the config or pass a model object")
    return load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)


def add_lora(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA adapter (`cfg.lora_r`, `lora_alpha`, `lora_dropout`, `lora_targets`)."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets)
    )
    return get_peft_model(model, lc)


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def is_peft(model: torch.nn.Module | None) -> bool:
    return model is not None and hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def check_reference_choice(cfg: Any, reference_free: bool, model: torch.nn.Module | None = None) -> str:
    """The reference kind the run will use; raises on combinations that cannot work. A peft model passed in
    counts as LoRA (cfg.lora_r may then stay 0)."""
    if reference_free:
        return "none"
    kind = cfg.reference
    if kind not in REFERENCE_KINDS or kind == "none":
        raise ValueError(f"reference={kind!r}; expected one of {[k for k in REFERENCE_KINDS if k != 'none']}")
    lora = cfg.lora_r > 0 or is_peft(model)
    if kind == "lora" and not lora:
        raise ValueError("reference='lora' switches the LoRA adapter off; it needs lora_r > 0 or a peft model")
    if kind == "tr_dpo" and lora:
        raise ValueError("reference='tr_dpo' syncs full weights; it cannot be combined with LoRA (lora_r > 0)")
    return kind


def model_reference(
    kind: str, cfg: Any, policy: torch.nn.Module, ref_model: torch.nn.Module | None, scorer: Scorer
) -> ModelReference | None:
    """For `model` / `tr_dpo`: the given reference model, else `cfg.ref_model`, else a frozen copy of the policy.
    Call before LoRA wraps the policy (a copy of the bare model is what TR-DPO syncs)."""
    if kind not in ("model", "tr_dpo"):
        return None
    if ref_model is None and getattr(cfg, "ref_model", None):
        from alignkit.models import load_model_and_tokenizer

        ref_model, _ = load_model_and_tokenizer(
            cfg.ref_model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )
    if ref_model is not None:
        ref_model = ref_model.to(next(policy.parameters()).device)
    if kind == "tr_dpo":
        ref = ref_model if ref_model is not None else _copy(policy)
        return SyncedReference(ref, scorer, alpha=cfg.tr_dpo_alpha, sync_steps=cfg.tr_dpo_sync_steps)
    return ModelReference(ref_model if ref_model is not None else _copy(policy), scorer)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def make_reference(
    kind: str,
    cfg: Any,
    policy: torch.nn.Module,
    scorer: Scorer,
    *,
    prebuilt: ModelReference | None,
    sequences: Callable[[], Sequence[tuple[Sequence[int], Sequence[int]]]],
    batches: Callable[[], Iterable[Mapping[str, Any]]],
    settings: Mapping[str, Any],
) -> Any:
    """The reference object of `kind` for one dataset (`sequences` in table-id order, `batches` covering them)."""
    if kind == "none":
        return NoReference()
    if kind == "precomputed":
        return PrecomputedReference.build(
            policy,
            sequences(),
            batches,
            scorer,
            cache_dir=cfg.reference_cache_dir,
            settings=settings,
            progress=cfg.progress,
        )
    if kind == "lora":
        return LoraReference(scorer)
    assert prebuilt is not None
    return prebuilt


class StepMetrics:
    """Folds per-micro-batch loss metrics into one value per step.

    A loss reports local means with their counts; `weights` maps a metric name to the count it is a mean over
    (`None`: a term already divided by the global normaliser, so micro-batch values add up; `"last"`: a
    batch-global input such as KTO's z0). Unlisted names default to `default_weight`.
    """

    def __init__(self, weights: Mapping[str, str | None], default_weight: str | None) -> None:
        self.weights, self.default = dict(weights), default_weight
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def add(self, metrics: Mapping[str, Tensor]) -> None:
        vals = {k: float(v) for k, v in metrics.items()}  # one host sync per micro-batch, outside the loss
        for k, v in vals.items():
            w = self.weights.get(k, self.default)
            if w == "last":
                self.last[k] = v
            elif w is None or w == k:
                self.sums[k] = self.sums.get(k, 0.0) + v
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * vals[w]
                self.counts[k] = self.counts.get(k, 0.0) + vals[w]

    def result(self) -> dict[str, float]:
        out = {
            k: (v / self.counts[k] if self.counts[k] else 0.0) if k in self.counts else v for k, v in self.sums.items()
        }
        return {**out, **self.last}
