"""Policy-gradient losses (docs/LOSSES.md §7): KL estimators, ratios, per-token terms, rollout IS, masks, ``pg_loss``.

Every stage is a free function; variants are found by name in ``KL_ESTIMATORS``, ``POLICY_LOSSES`` and (from
``aggregation``) ``AGGREGATIONS``; advantage estimators live in ``advantages`` (``ADVANTAGES``) and are
re-exported here. Per-token inputs are ``[B,T]`` and aligned (slot t = log π(y_t | x, y_<t)); ``m`` is the
``[B,T]`` loss mask. Masked slots are replaced with ``torch.where`` before any arithmetic, so NaN/inf padding
reaches neither the loss nor the gradients.

``pg_loss`` composes the stages in TRL's order:
ratio → per-token term → ×OPSM ×entropy-mask ×IS weights → +kl_coef·k(×ρ) → aggregate → −entropy_coef·H̄.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from alignkit.ops import as_bool, as_float, count_sequences, count_tokens, masked_mean

from .advantages import (
    ADVANTAGES,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from .aggregation import AGGREGATIONS, Normalizer, aggregate

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "RATIO_LEVELS",
    "aggregate",
    "cispo_term",
    "entropy_bonus",
    "gmpo_term",
    "grpo_advantages",
    "high_entropy_mask",
    "kl_estimate",
    "kl_penalized_rewards",
    "off_policy_seq_mask",
    "overlong_penalty",
    "pg_loss",
    "policy_loss",
    "policy_token_loss",
    "ppo_clip_term",
    "ratio_bounds_from_eps",
    "ratios",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "reinforce_term",
    "rloo_advantages",
    "rollout_is_weights",
    "sapo_term",
    "truncation_mask",
    "vespo_term",
]

Metrics = dict[str, Tensor]


def ratio_bounds_from_eps(lo: float, hi: float | None = None) -> tuple[float, float]:
    """Peer offsets ε to alignkit's absolute bounds: ``(1−lo, 1+hi)``, ``hi`` defaulting to ``lo``."""
    return 1.0 - lo, 1.0 + (lo if hi is None else hi)


def _keep(x: Tensor, mb: Tensor) -> Tensor:
    """``x`` where ``mb``, else 0 (a where, so masked NaN/inf cannot leak into values or grads)."""
    x = as_float(x)
    return torch.where(mb, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _per_token(A: Tensor, shape: torch.Size) -> Tensor:
    """Sequence ``[B]`` / ``[B,1]`` or token ``[B,T]`` advantages as ``[B,T]``."""
    return (A.unsqueeze(-1) if A.dim() == 1 else A).expand(shape)


def _frac(cond: Tensor, mb: Tensor) -> Tensor:
    return masked_mean(cond.float(), mb)


def _detached(metrics: Metrics) -> Metrics:
    return {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# KL (§7.2)
# ---------------------------------------------------------------------------------------------------------------


def _k3(d: Tensor) -> Tensor:
    # e^{-d} - 1 + d, with expm1 for accuracy near d=0
    return torch.expm1(-d) + d


def _low_var(d: Tensor) -> Tensor:
    nd = (-d).clamp(-20.0, 20.0)
    return (torch.expm1(nd) - nd).clamp(-10.0, 10.0)


#: kind -> k(d), d = logp − ref_logp.
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d * d,
    "k3": _k3,
    "abs": torch.abs,
    "low_var": _low_var,
}


def kl_estimate(logp: Tensor, ref_logp: Tensor, *, kind: str = "k3", straight_through: bool = False) -> Tensor:
    """Per-token KL(π‖π_ref) estimate ``[B,T]`` from sampled-token log-probs (no masking: callers mask).

    ``straight_through`` (verl "+") returns ``k2 − sg(k2) + sg(k)``: the value of ``kind``, the gradient of k2.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose from {sorted(KL_ESTIMATORS)}")
    d = as_float(logp) - as_float(ref_logp)
    k = KL_ESTIMATORS[kind](d)
    if straight_through:
        k2 = 0.5 * d * d
        return k2 - k2.detach() + k.detach()
    return k


@torch.no_grad()
def kl_penalized_rewards(
    R: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    m: Tensor,
    *,
    kl_coef: float,
    kind: str = "k1",
    placement: Literal["sequence_sum", "per_token"] = "sequence_sum",
) -> tuple[Tensor, Metrics]:
    """Fold a KL penalty into the rewards (no grad).

    ``sequence_sum`` (TRL RLOO): ``R − kl_coef·Σ_t m·k_t`` → ``[B]``. ``per_token`` (PPO, REINFORCE++):
    token rewards ``[B,T]`` = ``−kl_coef·k_t`` with ``R`` added on each row's last unmasked slot (dropped for
    empty rows). β is not comparable across placements.
    """
    mb = as_bool(m)
    k = _keep(kl_estimate(_keep(old_logp, mb), _keep(ref_logp, mb), kind=kind), mb)
    metrics = {"kl": masked_mean(k, mb), "kl_seq_sum_mean": k.sum(-1).mean()}
    R = as_float(R)
    if placement == "sequence_sum":
        return R - kl_coef * k.sum(-1), metrics
    if placement != "per_token":
        raise ValueError(f"placement must be 'sequence_sum' or 'per_token', got {placement!r}")
    T = mb.shape[-1]
    last = T - 1 - mb.flip(-1).float().argmax(-1)  # index of the last unmasked slot
    outcome = torch.zeros_like(k).scatter(-1, last.unsqueeze(-1), R.unsqueeze(-1))
    return _keep(outcome - kl_coef * k, mb), metrics


# ---------------------------------------------------------------------------------------------------------------
# ratios (§7.3)
# ---------------------------------------------------------------------------------------------------------------

#: level -> fn(token log-ratio [B,T] (0 where masked), mask) -> log-ratio broadcastable to [B,T].
RATIO_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": lambda lr, mb: lr,
    "sequence": lambda lr, mb: masked_mean(lr, mb, dim=-1).unsqueeze(-1),  # GSPO, grad through the mean
    "sequence_sum": lambda lr, mb: lr.sum(-1, keepdim=True),  # TRL RLOO: product of token ratios
}


def ratios(
    logp: Tensor,
    old_logp: Tensor | None,
    m: Tensor,
    *,
    level: str = "token",
    max_log_ratio: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Importance ratio ρ = π/π_old at ``level``, broadcast to ``[B,T]``, and the token log-ratio ``[B,T]``.

    ``old_logp=None`` means on-policy: ``old = sg(logp)``, so ρ ≡ 1 with the REINFORCE gradient.
    ``max_log_ratio`` clamps the (level) log-ratio before ``exp`` (verl/ORLHF use 20; TRL none).
    """
    if level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio level {level!r}; choose from {sorted(RATIO_LEVELS)}")
    mb = as_bool(m)
    logp = _keep(logp, mb)
    old = logp.detach() if old_logp is None else _keep(old_logp, mb)
    log_ratio = logp - old
    lw = RATIO_LEVELS[level](log_ratio, mb)
    if max_log_ratio is not None:
        lw = lw.clamp(-max_log_ratio, max_log_ratio)
    return torch.exp(lw).expand(mb.shape), log_ratio


# ---------------------------------------------------------------------------------------------------------------
# per-token terms (§7.4). Uniform signature: (logp, ratio, log_ratio, A, m, **options) -> (L [B,T], metrics);
# inputs are already masked to 0, A is [B,T]. Each term takes its own options and ignores other kinds'.
# ---------------------------------------------------------------------------------------------------------------


def _clip_metrics(x: Tensor, A: Tensor, mb: Tensor, lo: float | None, hi: float | None) -> Metrics:
    """Fractions of tokens where the clip is active: below ``lo`` with A<0, above ``hi`` with A>0."""
    low = (x < lo) & (A < 0) if lo is not None else torch.zeros_like(mb)
    high = (x > hi) & (A > 0) if hi is not None else torch.zeros_like(mb)
    return {
        "clip_ratio/low_mean": _frac(low, mb),
        "clip_ratio/high_mean": _frac(high, mb),
        "clip_ratio/region_mean": _frac(low | high, mb),
    }


def ppo_clip_term(
    logp: Tensor,
    ratio: Tensor,
    log_ratio: Tensor,
    A: Tensor,
    m: Tensor,
    *,
    ratio_low: float | None = None,
    ratio_high: float | None = None,
    dual_clip: float | None = None,
    **_: object,
) -> tuple[Tensor, Metrics]:
    """``−min(ρA, clip(ρ, lo, hi)A)`` (defaults 0.8, 1.2); ``dual_clip=c > hi`` caps the A<0 loss at ``−cA``."""
    lo = 0.8 if ratio_low is None else ratio_low
    hi = 1.2 if ratio_high is None else ratio_high
    L = -torch.min(ratio * A, ratio.clamp(lo, hi) * A)
    metrics = _clip_metrics(ratio, A, m, lo, hi)
    if dual_clip is not None:
        if not dual_clip > hi:
            raise ValueError(f"dual_clip ({dual_clip}) must exceed ratio_high ({hi})")
        L = torch.where(A < 0, torch.minimum(L, -dual_clip * A), L)
        metrics["dual_clip_frac"] = _frac((A < 0) & (ratio > dual_clip), m)
    return L, metrics


def cispo_term(
    logp: Tensor,
    ratio: Tensor,
    log_ratio: Tensor,
    A: Tensor,
    m: Tensor,
    *,
    ratio_low: float | None = None,
    ratio_high: float | None = None,
    **_: object,
) -> tuple[Tensor, Metrics]:
    """CISPO ``−sg(clip(ρ, lo, hi))·A·logp``; ``ratio_high`` (absolute, TRL suggests 5) is required."""
    if ratio_high is None:
        raise ValueError("cispo needs an explicit absolute ratio_high (TRL suggests 5.0)")
    w = ratio.clamp(min=ratio_low, max=ratio_high).detach()
    return -w * A * logp, _clip_metrics(ratio, A, m, ratio_low, ratio_high)


def sapo_term(
    logp: Tensor,
    ratio: Tensor,
    log_ratio: Tensor,
    A: Tensor,
    m: Tensor,
    *,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    **_: object,
) -> tuple[Tensor, Metrics]:
    """SAPO soft gate ``−(4/τ)·σ(τ(ρ−1))·A`` with τ = tau_pos if A>0 else tau_neg (gradient −A∇logp at ρ=1)."""
    tau = torch.where(A > 0, sapo_tau_pos, sapo_tau_neg).to(ratio.dtype)
    return -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * A, {}


def gmpo_term(
    logp: Tensor,
    ratio: Tensor,
    log_ratio: Tensor,
    A: Tensor,
    m: Tensor,
    *,
    ratio_low: float | None = None,
    ratio_high: float | None = None,
    **_: object,
) -> tuple[Tensor, Metrics]:
    """GMPO ``L_i = −exp(masked_mean_t clip(log ρ_t))·Ā_i``, broadcast over row i's tokens.

    The clip is sign-aware: tokens with A>0 are capped above at ``ln ratio_high``, A<0 floored at
    ``ln ratio_low`` (defaults e^{∓0.4}). Uses token log-ratios whatever the ratio level; aggregate with
    ``seq_mean_token_mean`` to get the per-sequence mean.
    """
    lo = math.log(math.exp(-0.4) if ratio_low is None else ratio_low)
    hi = math.log(math.exp(0.4) if ratio_high is None else ratio_high)
    clipped = torch.where(A > 0, log_ratio.clamp(max=hi), torch.where(A < 0, log_ratio.clamp(min=lo), log_ratio))
    seq = torch.exp(masked_mean(clipped, m, dim=-1)) * masked_mean(A, m, dim=-1)
    return (-seq).unsqueeze(-1).expand(m.shape), _clip_metrics(log_ratio, A, m, lo, hi)


def reinforce_term(
    logp: Tensor, ratio: Tensor, log_ratio: Tensor, A: Tensor, m: Tensor, **_: object
) -> tuple[Tensor, Metrics]:
    """Vanilla policy gradient ``−A·logp`` (ignores the ratio)."""
    return -A * logp, {}


def vespo_term(
    logp: Tensor,
    ratio: Tensor,
    log_ratio: Tensor,
    A: Tensor,
    m: Tensor,
    *,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    vespo_is_weights: Tensor | None = None,
    **_: object,
) -> tuple[Tensor, Metrics]:
    """VESPO (TRL 1.16 ``loss_type="vespo"``; not in the spec table): ``−sg(φ(w))·A·logp``.

    ``w`` = sequence ratio ``exp(Σ_t m·clamp(log ρ_t, ±20) + Σ_t m·log is_w_t)`` clamped to [1e-8, e^20];
    ``φ(w) = exp(λ + k·ln w − λw)`` with (k, λ) chosen by the sign of A (A≥0: pos). Rollout IS weights enter
    through ``w`` (``vespo_is_weights``) instead of multiplying the loss.
    """
    floor = math.log(1e-8)
    seq = torch.where(m, log_ratio.clamp(-20.0, 20.0), 0.0).sum(-1, keepdim=True)
    if vespo_is_weights is not None:
        log_is = torch.log(as_float(vespo_is_weights).expand(m.shape)).clamp(floor, 20.0)
        seq = seq + torch.where(m, log_is, 0.0).sum(-1, keepdim=True)
    log_w = seq.detach().clamp(floor, 20.0)
    pos = A >= 0
    k = torch.where(pos, vespo_k_pos, vespo_k_neg).to(log_w.dtype)
    lam = torch.where(pos, vespo_lambda_pos, vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * A * logp, {"vespo/phi_mean": masked_mean(phi, m)}


#: kind -> per-token term ``fn(logp, ratio, log_ratio, A, m, **options) -> (L [B,T], metrics)``.
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "ppo_clip": ppo_clip_term,
    "cispo": cispo_term,
    "sapo": sapo_term,
    "gmpo": gmpo_term,
    "reinforce": reinforce_term,
    "vespo": vespo_term,
}


def _terms(
    kind: str, logp: Tensor, ratio: Tensor, log_ratio: Tensor, A: Tensor, mb: Tensor, options: dict
) -> tuple[Tensor, Metrics]:
    if kind not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss kind {kind!r}; choose from {sorted(POLICY_LOSSES)}")
    if options.get("dual_clip") is not None and kind != "ppo_clip":
        raise ValueError("dual_clip only applies to kind='ppo_clip'")
    L, metrics = POLICY_LOSSES[kind](logp, ratio, log_ratio, A, mb, **options)
    metrics["approx_kl"] = masked_mean(_k3(log_ratio), mb)  # k3 of log(π/π_old), ≥ 0
    metrics["ratio_mean"] = masked_mean(ratio, mb)
    return L, metrics


def policy_token_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    A: Tensor,
    m: Tensor,
    *,
    kind: str = "ppo_clip",
    level: str = "token",
    max_log_ratio: float | None = None,
    **options: object,
) -> tuple[Tensor, Metrics]:
    """Ratio + per-token term: ``L [B,T]`` (0 where masked) and detached metrics; see ``POLICY_LOSSES``.

    ``A`` is ``[B]`` (sequence) or ``[B,T]`` (token); ``options`` are the kind's keywords (``ratio_low``, ...).
    """
    mb = as_bool(m)
    ratio, log_ratio = ratios(logp, old_logp, mb, level=level, max_log_ratio=max_log_ratio)
    A = _keep(_per_token(A, mb.shape), mb)
    L, metrics = _terms(kind, _keep(logp, mb), ratio, log_ratio, A, mb, options)
    return _keep(L, mb), _detached(metrics)


# ---------------------------------------------------------------------------------------------------------------
# rollout mismatch and masks (§7.6)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def rollout_is_weights(
    old_logp: Tensor,
    rollout_logp: Tensor,
    m: Tensor,
    *,
    level: Literal["token", "sequence"] = "sequence",
    mode: Literal["truncate", "mask", "seq_mask_token_truncate"] = "mask",
    is_low: float | None = None,
    is_high: float | None = 3.0,
    seq_reduce: Literal["sum", "mean"] = "sum",
) -> tuple[Tensor, Metrics]:
    """Trainer-vs-sampler importance weights ``w = π_old/π_rollout`` ``[B,T]`` (0 where masked; no grad).

    ``log w_t = old − rollout`` with NaN (unscored by the sampler) → w=1. ``level="sequence"`` combines a row's
    log-weights by ``seq_reduce``: ``sum`` (product of ratios, TRL) or ``mean`` (geometric mean), then
    broadcasts. ``mode``: ``truncate`` clamps to [lo, hi] (TIS); ``mask`` keeps ``w`` inside [lo, hi] and zeroes
    the rest (MIS; token level = IcePop); ``seq_mask_token_truncate`` zeroes rows whose sequence weight is outside
    [lo, hi] and truncates the token weights of the others (ORLHF seq-mask-tis; ``level`` is ignored).
    A missing bound is open. The weights multiply the policy term only, not the KL term.

    Metrics: ``is/mean, is/min, is/max, is/ess`` over the units (tokens, or non-empty rows at sequence level),
    ``is/frac_masked``, ``is/frac_truncated``, ``is/mismatch_k1``, ``is/mismatch_k3`` (KL(rollout‖old), token mean).
    """
    mb = as_bool(m)
    raw = torch.where(mb, as_float(old_logp) - as_float(rollout_logp), 0.0)
    scored = mb & ~torch.isnan(raw)
    lw = torch.where(scored, raw, 0.0)
    lo = -math.inf if is_low is None else is_low
    hi = math.inf if is_high is None else is_high
    if seq_reduce not in ("sum", "mean"):
        raise ValueError(f"seq_reduce must be 'sum' or 'mean', got {seq_reduce!r}")
    seq_lw = lw.sum(-1, keepdim=True) if seq_reduce == "sum" else masked_mean(lw, mb, dim=-1).unsqueeze(-1)
    if mode == "seq_mask_token_truncate":
        unit_w, units = torch.exp(lw), mb
        keep = ((torch.exp(seq_lw) >= lo) & (torch.exp(seq_lw) <= hi)).expand(mb.shape)
        w = torch.where(keep, unit_w.clamp(lo, hi), 0.0)
        truncated = keep & ((unit_w < lo) | (unit_w > hi))
    else:
        if level == "token":
            unit_w, units = torch.exp(lw), mb
        elif level == "sequence":
            unit_w, units = torch.exp(seq_lw), mb.any(-1, keepdim=True)
        else:
            raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
        inside = (unit_w >= lo) & (unit_w <= hi)
        if mode == "truncate":
            w, keep, truncated = unit_w.clamp(lo, hi), torch.ones_like(inside), ~inside
        elif mode == "mask":
            w, keep, truncated = torch.where(inside, unit_w, 0.0), inside, torch.zeros_like(inside)
        else:
            raise ValueError(f"mode must be 'truncate', 'mask' or 'seq_mask_token_truncate', got {mode!r}")
    w_units = torch.where(units, w, 0.0)
    n = units.float().sum().clamp(min=1.0)
    any_unit = units.any()
    metrics = {
        "is/mean": w_units.sum() / n,
        "is/min": torch.where(any_unit, torch.where(units, w, math.inf).amin(), 0.0),
        "is/max": torch.where(any_unit, torch.where(units, w, -math.inf).amax(), 0.0),
        "is/ess": w_units.sum() ** 2 / (n * (w_units * w_units).sum()).clamp(min=1e-30),
        "is/frac_masked": _frac(~keep.expand_as(units), units),
        "is/frac_truncated": _frac(truncated.expand_as(units), units),
        "is/mismatch_k1": masked_mean(-lw, scored),
        "is/mismatch_k3": masked_mean(torch.expm1(lw) - lw, scored),
    }
    return torch.where(mb, w.expand(mb.shape), 0.0), metrics


@torch.no_grad()
def off_policy_seq_mask(
    A: Tensor, logp: Tensor, behavior_logp: Tensor, m: Tensor, *, threshold: float
) -> tuple[Tensor, Metrics]:
    """Off-policy sequence mask (DeepSeek-V3.2): keep if ``A ≥ 0`` or ``masked_mean(behavior − sg(logp)) ≤ δ``.

    ``A`` is ``[B]`` or ``[B,T]``; NaN behaviour log-probs count as 0 KL. Returns a bool keep-mask ``[B,T]``
    (multiplies the per-token loss; it does not change the normaliser) and ``opsm/frac_dropped`` (token-weighted).
    """
    mb = as_bool(m)
    kl = torch.where(mb, as_float(behavior_logp) - as_float(logp).detach(), 0.0)
    kl = torch.where(torch.isnan(kl), 0.0, kl)
    low_kl = (masked_mean(kl, mb, dim=-1) <= threshold).unsqueeze(-1)
    keep = ((_per_token(A, mb.shape) >= 0) | low_kl).expand(mb.shape)
    return keep, {"opsm/frac_dropped": _frac(~keep, mb)}


def truncation_mask(is_truncated: Tensor, m: Tensor | None = None) -> Tensor:
    """Zero the rows of truncated completions: ``m`` with those rows masked, or a ``[B,1]`` bool keep-mask.

    Apply before counting the normaliser, so truncated rows add to neither the loss nor ``count_*``.
    """
    keep = ~as_bool(is_truncated).unsqueeze(-1)
    return keep if m is None else torch.where(keep, m, torch.zeros_like(m))


def overlong_penalty(length: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong shaping ``−factor·clip((len − max_len + buffer)/buffer, 0, 1)`` ``[B]``."""
    return -factor * ((as_float(length) - max_len + buffer) / buffer).clamp(0.0, 1.0)


def high_entropy_mask(H: Tensor, m: Tensor, threshold: float | Tensor) -> Tensor:
    """Bool ``[B,T]``: unmasked tokens with entropy ≥ a caller-supplied (global) quantile threshold."""
    return (as_float(H) >= threshold) & as_bool(m)


def entropy_bonus(
    H: Tensor, m: Tensor, *, entropy_coef: float | Tensor, normalizer: Normalizer
) -> tuple[Tensor, Metrics]:
    """The term ``−entropy_coef·Σ m·H / D_H`` to *add* to the loss (grad through H); its own normaliser.

    TRL uses the local token mean (``normalizer="local"``), whatever the policy aggregation.
    """
    mb = as_bool(m)
    term = -entropy_coef * aggregate(H, mb, mode="token_mean", normalizer=normalizer)
    return term, {"entropy": masked_mean(H, mb).detach()}


# ---------------------------------------------------------------------------------------------------------------
# composite
# ---------------------------------------------------------------------------------------------------------------


def pg_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    A: Tensor,
    m: Tensor,
    *,
    normalizer: Normalizer,
    kind: str = "ppo_clip",
    level: str = "token",
    agg: str = "token_mean",
    ratio_low: float | None = None,
    ratio_high: float | None = None,
    dual_clip: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    max_log_ratio: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float | Tensor = 0.0,
    kl_kind: str = "k3",
    kl_straight_through: bool = False,
    kl_is_weight: bool = True,
    is_weights: Tensor | None = None,
    opsm_mask: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_mask: Tensor | None = None,
    entropy_coef: float | Tensor = 0.0,
    entropy_normalizer: Normalizer | None = None,
    **kind_options: object,
) -> tuple[Tensor, Metrics]:
    """Policy-gradient loss in TRL's order; returns a 0-dim loss and detached metrics.

    Args:
        logp, old_logp: ``[B,T]`` current / behaviour-policy log-probs (``old_logp=None``: on-policy, ρ≡1).
        A: ``[B]`` or ``[B,T]`` advantages. m: ``[B,T]`` loss mask (apply ``truncation_mask`` first).
        normalizer: D of ``agg`` (see ``aggregate``); required.
        kind, level, ratio_low, ratio_high, dual_clip, sapo_tau_*, max_log_ratio, kind_options: the policy term
            (``POLICY_LOSSES``, ``ratios``).
        ref_logp, kl_coef, kl_kind, kl_straight_through: in-loss KL ``+kl_coef·k_t``, added whenever ``ref_logp``
            is given; ``kl_is_weight`` multiplies it by ρ with grad (TRL ``use_bias_correction_kl``).
        is_weights: ``[B,T]`` rollout IS weights (policy term only). opsm_mask, entropy_mask: ``[B,T]`` bool.
        entropy, entropy_coef, entropy_normalizer: ``[B,T]`` entropies (grad flows); the bonus
            ``−entropy_coef·Σ m·entropy_mask·H / D_H`` needs an explicit ``entropy_normalizer`` (TRL: "local").

    Returns:
        ``(loss, metrics)``: clip fractions, ``approx_kl``, ``kl``, ``entropy``, ``policy_loss``, counts.
    """
    mb = as_bool(m)
    ratio, log_ratio = ratios(logp, old_logp, mb, level=level, max_log_ratio=max_log_ratio)
    logp_m = _keep(logp, mb)
    A_m = _keep(_per_token(A, mb.shape), mb)
    options = dict(kind_options, ratio_low=ratio_low, ratio_high=ratio_high, dual_clip=dual_clip)
    options.update(sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg)
    fold_is = kind == "vespo" and is_weights is not None  # VESPO folds IS weights into its sequence ratio (TRL)
    if fold_is:
        options["vespo_is_weights"] = torch.where(mb, as_float(is_weights).expand(mb.shape), 1.0)
    L, metrics = _terms(kind, logp_m, ratio, log_ratio, A_m, mb, options)

    zero = torch.zeros((), dtype=L.dtype, device=L.device)
    if opsm_mask is not None:
        L = torch.where(as_bool(opsm_mask), L, zero)
    if entropy_mask is not None:
        L = torch.where(as_bool(entropy_mask), L, zero)
    if is_weights is not None and not fold_is:
        L = L * _keep(is_weights.expand(mb.shape), mb)
    metrics["policy_loss"] = aggregate(L, mb, mode=agg, normalizer=normalizer)

    if ref_logp is not None:
        k = kl_estimate(logp_m, _keep(ref_logp, mb), kind=kl_kind, straight_through=kl_straight_through)
        metrics["kl"] = masked_mean(k, mb)
        L = L + kl_coef * (k * ratio if kl_is_weight else k)
    elif not (isinstance(kl_coef, int | float) and kl_coef == 0):
        raise ValueError("kl_coef is set but ref_logp is None")
    loss = aggregate(L, mb, mode=agg, normalizer=normalizer)

    if entropy is not None:
        eff = mb if entropy_mask is None else mb & as_bool(entropy_mask)
        if isinstance(entropy_coef, int | float) and entropy_coef == 0:
            metrics["entropy"] = masked_mean(entropy, eff)
        else:
            if entropy_normalizer is None:
                raise ValueError('entropy_coef is set: pass entropy_normalizer (TRL uses "local")')
            bonus, ent_metrics = entropy_bonus(entropy, eff, entropy_coef=entropy_coef, normalizer=entropy_normalizer)
            loss = loss + bonus
            metrics.update(ent_metrics)
    elif not (isinstance(entropy_coef, int | float) and entropy_coef == 0):
        raise ValueError("entropy_coef is set but entropy is None")

    metrics["loss"] = loss
    metrics["n_tokens"] = count_tokens(mb).float()
    metrics["n_seqs"] = count_sequences(mb).float()
    return loss, _detached(metrics)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    A: Tensor,
    m: Tensor,
    *,
    kind: str = "ppo_clip",
    level: str = "token",
    ratio_low: float | None = None,
    ratio_high: float | None = None,
    dual_clip: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    max_log_ratio: float | None = None,
    agg: str = "token_mean",
    normalizer: Normalizer,
    **kind_options: object,
) -> tuple[Tensor, Metrics]:
    """The §7.4 policy loss alone (no KL, IS, masks or entropy): ``aggregate(term(ρ, A), m)``.

    For the per-token ``[B,T]`` loss use ``policy_token_loss``; for the full recipe use ``pg_loss``.
    """
    return pg_loss(
        logp,
        old_logp,
        A,
        m,
        normalizer=normalizer,
        kind=kind,
        level=level,
        agg=agg,
        ratio_low=ratio_low,
        ratio_high=ratio_high,
        dual_clip=dual_clip,
        sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg,
        max_log_ratio=max_log_ratio,
        **kind_options,
    )
