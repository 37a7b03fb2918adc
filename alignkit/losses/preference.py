"""Paired preference losses: the DPO family, SimPO, CPO (with AlphaPO) and ORPO (docs/LOSSES.md §4).

Every loss is a pure function of sequence log-probs. Shapes: `P` pairs; policy/reference log-probs are `[P]`
tensors (sums over completion tokens unless a loss says "mean"). Each loss returns `(loss, metrics)`: `loss` is a
0-dim fp32 tensor equal to `Σ(per-pair terms) / normalizer`, `metrics` a dict of detached tensors.

Semantics follow TRL 1.16 except where docs/LOSSES.md §10 says otherwise: `sigmoid` uses ε (cDPO; TRL ignores it),
and the SFT term is a batch-level NLL that WPO pair weights leave alone (TRL 1.16 raises on that combination). The
unpaired losses (KTO, BCO) live in `alignkit.losses.unpaired` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.normalizer import Normalizer, normalize
from alignkit.ops import as_float, split_pairs

__all__ = [
    "DPO_LOSSES",
    "F_DIVERGENCES",
    "CPO_LOSSES",
    "normalize",
    "split_pairs",
    "wpo_weights",
    "wpo_sequence_weights",
    "ld_token_weights",
    "ld_sequence_logps",
    "dpo_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "log1mexp",
]  # plus, lazily, the unpaired names of _UNPAIRED (see __getattr__ at the bottom)

# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------


def _as_pairs(names: Sequence[str], *tensors: Tensor) -> list[Tensor]:
    """Check that all inputs are `[P]` tensors of one shape and cast them to fp32."""
    shape = tensors[0].shape
    for name, t in zip(names, tensors, strict=True):
        if t.dim() != 1 or t.shape != shape:
            raise ValueError(f"{name} must be a [P] tensor matching {names[0]} {tuple(shape)}, got {tuple(t.shape)}")
    return [t.float() for t in tensors]


def _cdpo(z: Tensor, eps: float) -> Tensor:
    """Conservative DPO form `−(1−ε)·logσ(z) − ε·logσ(−z)`; plain `−logσ(z)` at ε=0."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


@torch.no_grad()
def _reward_metrics(r_c: Tensor, r_r: Tensor, logp_c: Tensor, logp_r: Tensor) -> dict[str, Tensor]:
    """Local means of §4.3 (`rewards/*`, `logps/*`) plus `n_pairs`; ties count as wrong."""
    n = r_c.numel()
    denom = max(n, 1)
    return {
        "rewards/chosen": r_c.sum() / denom,
        "rewards/rejected": r_r.sum() / denom,
        "rewards/margins": (r_c - r_r).sum() / denom,
        "rewards/accuracies": (r_c > r_r).float().sum() / denom,
        "logps/chosen": logp_c.detach().float().sum() / denom,
        "logps/rejected": logp_r.detach().float().sum() / denom,
        "n_pairs": torch.tensor(float(n), device=r_c.device),
    }


def wpo_sequence_weights(aligned_sums: Tensor, n_tokens: Tensor) -> Tensor:
    """WPO weights from per-sequence sums: `w(y) = exp(Σ_t (ℓ_t − log Σ_v p_v²) / n)`, `[n] -> [n]` fp32.

    The one home of the WPO formula; `wpo_weights` (padded `[B,T]` rows) and the packed scoring path
    (`alignkit.scoring.batch_sequence_logps`, per-segment sums) both call it.
    """
    return torch.exp(aligned_sums.float() / n_tokens.float().clamp_min(1))


@torch.no_grad()
def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """WPO sequence weights `w(y) = exp(mean_t m·(ℓ_t − log Σ_v p_v²))` (TRL 1.16 form), without gradient.

    Args:
        token_logps: `[B,T]` per-token log-probs ℓ.
        log_sum_sq_probs: `[B,T]` per-token `log Σ_v p_v²`.
        mask: `[B,T]` completion mask.

    Returns:
        `[B]` fp32 weights. Pair weights are `w(y_c)·w(y_r)`, e.g. `w_c * w_r` after `split_pairs`.
    """
    m = mask.bool()
    aligned = torch.where(m, token_logps.float() - log_sum_sq_probs.float(), 0.0)
    return wpo_sequence_weights(aligned.sum(-1), m.sum(-1))


def ld_token_weights(rank: Tensor, shared_lengths: Tensor, alpha: float) -> Tensor:
    """LD-DPO token weights: 1 for the first `ℓ_s` completion tokens (rank `k_t ≤ ℓ_s`), `alpha` after.

    The one home of the LD-DPO rule; `ld_sequence_logps` (padded rows) and the packed scoring path
    (`alignkit.scoring.batch_sequence_logps`) both call it. `rank` and `shared_lengths` broadcast together.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {alpha}")
    return torch.where(rank <= shared_lengths, 1.0, alpha)


def ld_sequence_logps(token_logps: Tensor, mask: Tensor, other_lengths: Tensor, *, alpha: float) -> Tensor:
    """LD-DPO sequence log-prob: full weight on the first `min(n, n_other)` completion tokens, α on the rest.

    With token rank `k_t = cumsum(m)` and `ℓ_s = min(n, n_other)`: `S = Σ_{k_t≤ℓ_s} ℓ_t + α·Σ_{k_t>ℓ_s} ℓ_t`.
    Apply it identically to policy and reference log-probs (not to the SFT term).

    Args:
        token_logps: `[B,T]` per-token log-probs; masked slots may hold anything (NaN included).
        mask: `[B,T]` completion mask.
        other_lengths: `[B]` completion lengths of the other side of each pair (rejected for chosen rows).
        alpha: tail weight in [0, 1]; 1 gives the plain sum.

    Returns:
        `[B]` sequence log-probs (fp32, or fp64 for fp64 input).
    """
    m = mask.bool()
    rank = m.long().cumsum(-1)
    shared = torch.minimum(m.sum(-1), other_lengths.to(rank.device).long()).unsqueeze(-1)
    weight = ld_token_weights(rank, shared, alpha)
    x = as_float(token_logps)
    return torch.where(m, x * weight.to(x.dtype), 0.0).sum(-1)


# --------------------------------------------------------------------------------------------------------------------
# f-divergence scores (§4.2): s = f(h), all with s(0) = 0
# --------------------------------------------------------------------------------------------------------------------


def _alpha_divergence(h: Tensor, alpha: float, exp_cap: float) -> Tensor:
    if abs(alpha - 1.0) < 1e-6:  # the α→1 limit is reverse KL
        return h
    # The cap keeps exp() finite; TRL picks it from the input dtype so the result survives a cast back.
    t = ((alpha - 1.0) * h).clamp(max=exp_cap)
    return torch.expm1(t) / (alpha - 1.0)


F_DIVERGENCES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "reverse_kl": lambda h, alpha, cap: h,
    "forward_kl": lambda h, alpha, cap: -torch.expm1(-h),
    "js_divergence": lambda h, alpha, cap: math.log(2.0) + F.logsigmoid(h),
    "alpha_divergence": _alpha_divergence,
}

# Types whose loss is a function of Δ only (plus `sft`): the f-DPO β·log Z(x) term cancels only there.
_F_DIVERGENCE_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
_SORTING_TYPES = frozenset({"aot", "aot_unpaired"})

# --------------------------------------------------------------------------------------------------------------------
# DPO per-pair losses (§4.1)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairTerms:
    """Everything a per-pair DPO loss may read; all tensors are `[P]` fp32.

    `h_*` are raw log-ratios π−ρ, `s_*` the f-scores of them, `n_*` completion lengths (None if not given).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    h_c: Tensor
    h_r: Tensor
    s_c: Tensor
    s_r: Tensor
    n_c: Tensor | None
    n_r: Tensor | None
    beta: float
    eps: float
    discopop_tau: float
    ipo_length_normalize: bool

    @property
    def delta(self) -> Tensor:
        return self.s_c - self.s_r

    def length_normalized_delta(self) -> Tensor:
        assert self.n_c is not None and self.n_r is not None  # checked by dpo_loss
        return self.s_c / self.n_c - self.s_r / self.n_r


def _ipo(p: PairTerms) -> Tensor:
    d = p.length_normalized_delta() if p.ipo_length_normalize else p.delta
    return (d - 1.0 / (2.0 * p.beta)) ** 2


def _exo_pair(p: PairTerms) -> Tensor:
    # KL(softmax(βΔ) over {c, r} ‖ [1−ε, ε]) written with log-sigmoids so it stays finite for large |βΔ|.
    z = p.beta * p.delta
    q = torch.sigmoid(z)
    return q * (F.logsigmoid(z) - math.log1p(-p.eps)) + (1.0 - q) * (F.logsigmoid(-z) - math.log(p.eps))


def _nca_pair(p: PairTerms) -> Tensor:
    rc, rr = p.beta * p.h_c, p.beta * p.h_r
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def _robust(p: PairTerms) -> Tensor:
    z = p.beta * p.delta
    return (-(1.0 - p.eps) * F.logsigmoid(z) + p.eps * F.logsigmoid(-z)) / (1.0 - 2.0 * p.eps)


def _sppo_hard(p: PairTerms) -> Tensor:
    half = 0.5 / p.beta
    return (p.h_c - half) ** 2 + (p.h_r + half) ** 2


def _aot(p: PairTerms) -> Tensor:
    # Sorting couples the pairs: the loss is defined over the tensor passed in, not per pair.
    policy = torch.sort(p.policy_chosen - p.policy_rejected).values
    ref = torch.sort(p.ref_chosen - p.ref_rejected).values
    return _cdpo(p.beta * (policy - ref), p.eps)


def _aot_unpaired(p: PairTerms) -> Tensor:
    delta = torch.sort(p.h_c).values - torch.sort(p.h_r).values
    return _cdpo(p.beta * delta, p.eps)


def _discopop(p: PairTerms) -> Tensor:
    z = p.beta * p.delta
    # g·e^{−z} as exp(logσ(z/τ) − z): same value, but no 0·inf = NaN when z is very negative.
    return torch.sigmoid(-z / p.discopop_tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / p.discopop_tau) - z)


DPO_LOSSES: dict[str, Callable[[PairTerms], Tensor]] = {
    "sigmoid": lambda p: _cdpo(p.beta * p.delta, p.eps),
    "hinge": lambda p: F.relu(1.0 - p.beta * p.delta),
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": lambda p: -F.logsigmoid(p.beta * p.h_c) - F.logsigmoid(-p.beta * p.h_r),
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": lambda p: torch.sigmoid(-p.beta * p.h_c) + torch.sigmoid(p.beta * p.h_r),
    "apo_down": lambda p: torch.sigmoid(p.beta * p.h_c) + torch.sigmoid(-p.beta * (p.h_c - p.h_r)),
    "discopop": _discopop,
    "sigmoid_norm": lambda p: -F.logsigmoid(p.beta * p.length_normalized_delta()),
}
"""Per-pair DPO losses, name -> `PairTerms -> [P]`. `sft` is not per pair and is handled by `dpo_loss`."""

LOSS_TYPES = (*DPO_LOSSES, "sft")


def _check_dpo_args(
    types: list[str],
    weights: list[float],
    beta: float,
    eps: float,
    f_divergence: str,
    has_pair_weights: bool,
    has_sft: bool,
) -> None:
    """Raise the §4.2 errors before any tensor work."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not types:
        raise ValueError("loss_type must name at least one loss")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown DPO loss_type {unknown}; expected one of {list(LOSS_TYPES)}")
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {eps}")
    if "robust" in types and not eps < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
    if "exo_pair" in types and eps == 0.0:
        raise ValueError("exo_pair needs 0 < label_smoothing < 1 (1e-3 is typical)")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence {f_divergence!r}; expected one of {list(F_DIVERGENCES)}")
    if f_divergence != "reverse_kl" and not set(types) <= _F_DIVERGENCE_TYPES:
        bad = sorted(set(types) - _F_DIVERGENCE_TYPES)
        raise ValueError(f"f_divergence={f_divergence!r} is only defined for {sorted(_F_DIVERGENCE_TYPES)}, not {bad}")
    if has_pair_weights and set(types) & _SORTING_TYPES:
        raise ValueError("pair_weights (WPO) cannot be used with aot/aot_unpaired: sorting misaligns the weights")
    if "sft" in types and not has_sft:
        raise ValueError("loss_type 'sft' needs sft_logps and sft_normalizer")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    ipo_length_normalize: bool = True,
    pair_weights: Tensor | None = None,
    sft_logps: Tensor | None = None,
    sft_normalizer: float | Tensor | None = None,
    normalizer: Normalizer,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO and its variants on summed sequence log-probs (docs/LOSSES.md §4.1-4.3); the unit is the pair.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: `[P]` summed completion log-probs π_c, π_r, ρ_c, ρ_r
            (LD-DPO: reduce both policy and reference with `ld_sequence_logps` first).
        loss_type: a name of `DPO_LOSSES` or `"sft"`, or a list of them (MPO: `Σ_k w_k·L_k`).
        loss_weights: one weight per loss type (default 1 each).
        beta: β. label_smoothing: ε (cDPO for sigmoid/aot*, noise rate for robust, target for exo_pair).
        f_divergence: a name of `F_DIVERGENCES`, scoring log-ratios before Δ; f_alpha: α of `alpha_divergence`.
        discopop_tau: τ of `discopop`.
        chosen_lengths, rejected_lengths: `[P]` completion token counts; needed by `sigmoid_norm` and normalised `ipo`.
        ipo_length_normalize: IPO on per-token scores (TRL) or on sums (ORLHF).
        pair_weights: `[P]` multipliers of every per-pair term (WPO: `w_c·w_r` from `wpo_weights`).
        sft_logps: `[P]` summed chosen log-probs (not LD-reduced), for `sft`; any shape is summed.
        sft_normalizer: the chosen token count that turns `−Σ sft_logps` into a token-mean NLL.
        normalizer: number of pairs (float, 0-dim tensor, or "local").

    Returns:
        `(loss, metrics)`: 0-dim fp32 loss; §4.3 reward metrics from raw log-ratios, plus `loss/<type>` for lists.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    _check_dpo_args(
        types,
        weights,
        beta,
        label_smoothing,
        f_divergence,
        pair_weights is not None,
        sft_logps is not None and sft_normalizer is not None,
    )
    needs_lengths = "sigmoid_norm" in types or ("ipo" in types and ipo_length_normalize)
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("sigmoid_norm and length-normalised ipo need chosen_lengths and rejected_lengths")

    pc, pr, rc, rr = _as_pairs(
        ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
    )
    h_c, h_r = pc - rc, pr - rr
    score = F_DIVERGENCES[f_divergence]
    exp_cap = 11.0 if policy_chosen.dtype == torch.float16 else 80.0
    # Lengths are >= 1 by contract; clamping keeps an empty completion from dividing by zero (as TRL does).
    lengths = (chosen_lengths, rejected_lengths)
    n_c, n_r = (None if n is None else n.to(pc.device).float().clamp_min(1.0) for n in lengths)
    terms = PairTerms(
        policy_chosen=pc,
        policy_rejected=pr,
        ref_chosen=rc,
        ref_rejected=rr,
        h_c=h_c,
        h_r=h_r,
        s_c=score(h_c, f_alpha, exp_cap),
        s_r=score(h_r, f_alpha, exp_cap),
        n_c=n_c,
        n_r=n_r,
        beta=beta,
        eps=label_smoothing,
        discopop_tau=discopop_tau,
        ipo_length_normalize=ipo_length_normalize,
    )
    pw = None if pair_weights is None else pair_weights.to(pc.device).float()

    loss = pc.new_zeros(())
    parts: dict[str, Tensor] = {}
    for name, weight in zip(types, weights, strict=True):
        if name == "sft":  # one batch-level NLL term, not a per-pair loss, so WPO weights do not apply
            part = normalize(-sft_logps.float().sum(), sft_normalizer, None)
        else:
            per_pair = DPO_LOSSES[name](terms)
            if pw is not None:
                per_pair = per_pair * pw
            part = normalize(per_pair.sum(), normalizer, pc.numel())
        loss = loss + weight * part
        parts[f"loss/{name}"] = part.detach()

    metrics = _reward_metrics(beta * h_c.detach(), beta * h_r.detach(), pc, pr)
    if len(types) > 1:
        metrics.update(parts)
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# Reference-free (§4.4)
# --------------------------------------------------------------------------------------------------------------------


def simpo_loss(
    chosen_mean_logps: Tensor,
    rejected_mean_logps: Tensor,
    *,
    beta: float = 0.1,
    margin: float = 0.5,
    label_smoothing: float = 0.0,
    normalizer: Normalizer,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO: `x = β(π̄_c − π̄_r) − margin`, `L = −(1−ε)logσ(x) − ε·logσ(−x)`; the unit is the pair.

    Args:
        chosen_mean_logps, rejected_mean_logps: `[P]` token-mean completion log-probs π̄.
        margin: γ in logit units (TRL `simpo_gamma`; OI's `gamma_beta_ratio` is `margin/β`).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    c, r = _as_pairs(("chosen_mean_logps", "rejected_mean_logps"), chosen_mean_logps, rejected_mean_logps)
    per_pair = _cdpo(beta * (c - r) - margin, label_smoothing)
    loss = normalize(per_pair.sum(), normalizer, c.numel())
    return loss, _reward_metrics(beta * c.detach(), beta * r.detach(), c, r)


CPO_LOSSES: dict[str, Callable[[Tensor, float, float, float], Tensor]] = {
    "sigmoid": lambda d, beta, eps, margin: _cdpo(beta * d, eps),
    "hinge": lambda d, beta, eps, margin: F.relu(1.0 - beta * d),
    "ipo": lambda d, beta, eps, margin: (d - 1.0 / (2.0 * beta)) ** 2,
    "simpo": lambda d, beta, eps, margin: _cdpo(beta * d - margin, eps),
}
"""CPO per-pair losses, name -> `(d, β, ε, margin) -> [P]` with `d = r_c − r_r`."""


def cpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    margin: float = 0.5,
    alpha: float = 0.0,
    nll: Tensor | None = None,
    nll_coef: float = 1.0,
    normalizer: Normalizer,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CPO: DPO forms on `d = π_c − π_r` without a reference, plus `nll_coef·nll`; the unit is the pair.

    Args:
        policy_chosen, policy_rejected: `[P]` log-probs; TRL passes token means for ipo/simpo, sums otherwise.
        loss_type: a name of `CPO_LOSSES`. margin: SimPO γ (only `simpo`).
        alpha: AlphaPO; when ≠0 rewards are `r = −expm1(−α·π)/α` (= (1 − p^{−α})/α) instead of π.
        nll: 0-dim chosen token-mean NLL, already normalised by the caller; None adds nothing.

    Metrics: rewards are `β·r` (β·π when α=0), as in TRL.
    """
    if loss_type not in CPO_LOSSES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {list(CPO_LOSSES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    c, r = _as_pairs(("policy_chosen", "policy_rejected"), policy_chosen, policy_rejected)
    if alpha != 0.0:
        c, r = -torch.expm1(-alpha * c) / alpha, -torch.expm1(-alpha * r) / alpha
    per_pair = CPO_LOSSES[loss_type](c - r, beta, label_smoothing, margin)
    loss = normalize(per_pair.sum(), normalizer, c.numel())
    metrics = _reward_metrics(beta * c.detach(), beta * r.detach(), policy_chosen, policy_rejected)
    if nll is not None:
        loss = loss + nll_coef * nll.float()
        metrics["nll"] = nll.detach().float()
    return loss, metrics


def log1mexp(x: Tensor) -> Tensor:
    """`log(1 − e^x)` for x ≤ 0: `log(−expm1 x)` near 0, `log1p(−e^x)` below −ln 2.

    Each branch is evaluated only on inputs in its own range, so the unused branch cannot put NaN in the gradient.
    """
    cut = -math.log(2.0)
    near = x > cut
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, cut))),
        torch.log1p(-torch.exp(torch.where(near, cut, x))),
    )


def orpo_loss(
    chosen_mean_logps: Tensor,
    rejected_mean_logps: Tensor,
    nll: Tensor,
    *,
    beta: float = 0.1,
    normalizer: Normalizer,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO: `L = nll − β·Σ logσ(lo)/D` with log-odds ratio `lo = (π̄_c − π̄_r) − (log1mexp π̄_c − log1mexp π̄_r)`.

    Args:
        chosen_mean_logps, rejected_mean_logps: `[P]` token-mean log-probs (< 0).
        nll: 0-dim chosen token-mean NLL, already normalised by the caller.
        normalizer: number of pairs for the odds-ratio term.
    """
    c, r = _as_pairs(("chosen_mean_logps", "rejected_mean_logps"), chosen_mean_logps, rejected_mean_logps)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    log_sig = F.logsigmoid(log_odds)
    loss = nll.float() - beta * normalize(log_sig.sum(), normalizer, c.numel())
    metrics = _reward_metrics(beta * c.detach(), beta * r.detach(), c, r)
    denom = max(c.numel(), 1)
    metrics["nll"] = nll.detach().float()
    metrics["log_odds_ratio"] = log_sig.detach().sum() / denom
    metrics["log_odds_chosen"] = log_odds.detach().sum() / denom
    return loss, metrics


_UNPAIRED = frozenset(
    {"kto_loss", "kto_reference_point", "mismatched_completions", "kto_weight_ratio", "bco_loss", "BCOState"}
)


def __getattr__(name: str) -> object:
    # PEP 562 re-export: the unpaired losses import helpers from here, so a top-level import would be circular.
    if name in _UNPAIRED:
        from alignkit.losses import unpaired

        return getattr(unpaired, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
