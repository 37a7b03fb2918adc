"""Advantage estimators (docs/LOSSES.md §7.1): GRPO, RLOO, REINFORCE++ and its group baseline.

All run under ``no_grad`` and return ``(advantages, metrics)``. Rewards are ``[N]`` or ``[N,K]`` (K reward
functions); NaN (or ``None`` in a Python list) means "this reward does not apply". A row where every reward is
NaN is *unscorable*: it is left out of every mean and std and gets advantage 0. Groups are contiguous blocks of
``group_size`` rows or are labelled by ``group_index [N]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from alignkit.ops import as_bool, count_tokens, masked_mean, whiten

__all__ = [
    "ADVANTAGES",
    "grpo_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "turn_advantages",
]

Rewards = Tensor | Sequence[float | None] | Sequence[Sequence[float | None]]


def _as_rewards(R: Rewards) -> Tensor:
    if isinstance(R, Tensor):
        return R if R.dtype in (torch.float32, torch.float64) else R.float()

    def num(v: float | None) -> float:
        return float("nan") if v is None else float(v)

    return torch.tensor([[num(v) for v in r] if isinstance(r, Sequence) else num(r) for r in R])


def _combine(R: Rewards, reward_weights: Tensor | Sequence[float] | None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(R_k [N,K], R [N] = nansum_k w_k R_k with unscorable rows NaN, scorable [N] bool)``."""
    Rk = _as_rewards(R)
    if Rk.dim() == 1:
        Rk = Rk.unsqueeze(1)
    if Rk.dim() != 2:
        raise ValueError(f"rewards must be [N] or [N,K], got {tuple(Rk.shape)}")
    w = torch.ones(Rk.shape[1], dtype=Rk.dtype, device=Rk.device)
    if reward_weights is not None:
        w = torch.as_tensor(reward_weights, dtype=Rk.dtype, device=Rk.device)
        if w.shape != (Rk.shape[1],):
            raise ValueError(f"reward_weights must have shape [{Rk.shape[1]}], got {tuple(w.shape)}")
    scorable = ~torch.isnan(Rk).all(dim=1)
    total = torch.where(torch.isnan(Rk), 0.0, Rk * w).sum(1)
    return Rk, torch.where(scorable, total, float("nan")), scorable


def _group_ids(n: int, group_size: int | None, group_index: Tensor | None, device: torch.device) -> tuple[Tensor, int]:
    """Group id per row ``[N]`` (0..n_groups−1) and n_groups."""
    if (group_size is None) == (group_index is None):
        raise ValueError("pass exactly one of group_size or group_index")
    if group_index is not None:
        if group_index.shape != (n,):
            raise ValueError(f"group_index must have shape [{n}], got {tuple(group_index.shape)}")
        uniq, gid = torch.unique(group_index.to(device), return_inverse=True)
        return gid, uniq.numel()
    if group_size < 1 or n % group_size:
        raise ValueError(f"N={n} rows do not split into groups of {group_size}")
    return torch.arange(n, device=device) // group_size, n // group_size


def _group_stats(x: Tensor, gid: Tensor, n_groups: int, unbiased: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NaN-aware per-group stats of ``x [N,K]``: ``(mean, std, count, flat)``, each ``[G,K]``.

    ``flat`` marks groups with no spread to normalise: all present values equal, or fewer than two of them.
    Flat groups get exactly 0 advantage, instead of ``(R−μ)/eps`` round-off.
    """
    valid = ~torch.isnan(x)
    zeros = x.new_zeros(n_groups, x.shape[1])
    cnt = zeros.index_add(0, gid, valid.to(x.dtype))
    mean = zeros.index_add(0, gid, torch.where(valid, x, 0.0)) / cnt.clamp(min=1.0)
    dev = torch.where(valid, x - mean[gid], 0.0)
    var = zeros.index_add(0, gid, dev * dev) / (cnt - 1.0 if unbiased else cnt).clamp(min=1.0)
    idx = gid.unsqueeze(1).expand_as(x)
    hi = torch.full_like(zeros, -math.inf).scatter_reduce(0, idx, torch.where(valid, x, -math.inf), "amax")
    lo = torch.full_like(zeros, math.inf).scatter_reduce(0, idx, torch.where(valid, x, math.inf), "amin")
    return mean, var.sqrt(), cnt, (hi == lo) | (cnt < 2)


def _reward_metrics(R: Tensor, scorable: Tensor, gid: Tensor, n_groups: int) -> dict[str, Tensor]:
    _, std, cnt, flat = _group_stats(R.unsqueeze(1), gid, n_groups, True)
    present = cnt[:, 0] > 0
    return {
        "reward_mean": masked_mean(torch.nan_to_num(R), scorable),
        # TRL's names and quantities: the mean within-group std (the spread GRPO learns from) and the groups (with
        # any scorable row) that carry no learning signal: σ=0 or a single scorable member
        "reward_std": masked_mean(std[:, 0], present),
        "frac_reward_zero_std": masked_mean(flat[:, 0].to(R.dtype), present),
        "n_unscorable": (~scorable).sum().to(R.dtype),
    }


@torch.no_grad()
def grpo_advantages(
    R: Rewards,
    *,
    group_size: int | None = None,
    group_index: Tensor | None = None,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
    unbiased: bool = True,
    reward_weights: Tensor | Sequence[float] | None = None,
    multi_reward: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group-relative advantages (TRL 1.16 semantics).

    Args:
        R: ``[N]`` or ``[N,K]`` rewards; NaN/None = not applicable, all-NaN rows are unscorable (A=0).
        group_size / group_index: contiguous groups of G rows, or a ``[N]`` group label per row.
        scale: ``group`` ÷(group std+eps); ``batch`` ÷(batch std+eps) with the group mean (TRL "PPO-Lite");
            ``none`` mean-only (Dr.GRPO).
        unbiased: Bessel-corrected stds (TRL). Singleton groups get A=0.
        multi_reward: ``sum_then_normalize`` (weighted nansum, then the above) or ``normalize_then_sum`` (GDPO:
            z-score each reward within its group, weighted sum, then z-score over the batch; ``scale`` unused).

    Returns:
        ``A [N]`` and metrics ``reward_mean, reward_std`` (mean within-group std), ``frac_reward_zero_std``,
        ``n_unscorable``.
    """
    Rk, Rsum, scorable = _combine(R, reward_weights)
    gid, n_groups = _group_ids(Rk.shape[0], group_size, group_index, Rk.device)
    if multi_reward == "sum_then_normalize":
        mean, std, _, flat = _group_stats(Rsum.unsqueeze(1), gid, n_groups, unbiased)
        centered = Rsum - mean[gid, 0]
        if scale == "group":
            A = centered / (std[gid, 0] + eps)
        elif scale == "batch":
            _, bstd, _, _ = _group_stats(Rsum.unsqueeze(1), torch.zeros_like(gid), 1, unbiased)
            A = centered / (bstd[0, 0] + eps)
        elif scale == "none":
            A = centered
        else:
            raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
        A = torch.where(scorable & ~flat[gid, 0], A, 0.0)
    elif multi_reward == "normalize_then_sum":
        w = Rk.new_ones(Rk.shape[1]) if reward_weights is None else torch.as_tensor(reward_weights).to(Rk)
        mean, std, _, flat = _group_stats(Rk, gid, n_groups, unbiased)
        z = torch.where(~torch.isnan(Rk) & ~flat[gid], (Rk - mean[gid]) / (std[gid] + eps), 0.0)
        S = torch.where(scorable, (z * w).sum(1), float("nan")).unsqueeze(1)
        bmean, bstd, _, bflat = _group_stats(S, torch.zeros_like(gid), 1, unbiased)
        A = torch.where(scorable & ~bflat[0, 0], (S[:, 0] - bmean[0, 0]) / (bstd[0, 0] + eps), 0.0)
    else:
        raise ValueError(f"multi_reward must be 'sum_then_normalize' or 'normalize_then_sum', got {multi_reward!r}")
    return A, _reward_metrics(Rsum, scorable, gid, n_groups)


@torch.no_grad()
def rloo_advantages(
    R: Rewards,
    *,
    group_size: int | None = None,
    group_index: Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-4,
    reward_weights: Tensor | Sequence[float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Leave-one-out advantages ``A_i = R_i − Σ_{j≠i} R_j / (n_s−1)`` over the n_s scorable group members.

    Rows of groups with ``n_s ≤ 1`` and unscorable rows get 0. ``normalize`` z-scores the remaining rows over the
    batch (``(A−mean)/(std+eps)``, unbiased std, TRL ``normalize_advantages``). Returns ``A [N]`` and metrics.
    """
    _, Rsum, scorable = _combine(R, reward_weights)
    gid, n_groups = _group_ids(Rsum.shape[0], group_size, group_index, Rsum.device)
    zeros = Rsum.new_zeros(n_groups)
    cnt = zeros.index_add(0, gid, scorable.to(Rsum.dtype))[gid]
    total = zeros.index_add(0, gid, torch.nan_to_num(Rsum))[gid]
    ok = scorable & (cnt >= 2)
    A = torch.where(ok, Rsum - (total - torch.nan_to_num(Rsum)) / (cnt - 1.0).clamp(min=1.0), 0.0)
    if normalize:
        x = torch.where(ok, A, float("nan")).unsqueeze(1)
        mean, std, _, flat = _group_stats(x, torch.zeros_like(gid), 1, True)
        A = torch.where(ok & ~flat[0, 0], (A - mean[0, 0]) / (std[0, 0] + eps), 0.0)
    return A, _reward_metrics(Rsum, scorable, gid, n_groups)


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: Tensor,
    m: Tensor,
    *,
    gamma: float = 1.0,
    stats: tuple[Tensor | float, Tensor | float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE++: discounted returns ``G_t = r_t + γ·G_{t+1}`` (reset outside ``m``), whitened over the batch.

    Args:
        token_rewards: ``[B,T]`` per-token rewards (outcome reward on the last token, KL shaping elsewhere).
        m: ``[B,T]`` mask; masked slots neither receive nor pass on return.
        stats: ``(mean, var)`` of the returns over the whole step, when micro-batching (else local stats).

    Returns:
        ``A [B,T]`` (0 where masked) and metrics ``return_mean, n_tokens``.
    """
    mb = as_bool(m)
    r = torch.where(mb, _as_rewards(token_rewards), 0.0)
    G = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(mb[:, t], r[:, t] + gamma * running, 0.0)
        G[:, t] = running
    A = whiten(G, mb, stats=stats)
    return A, {"return_mean": masked_mean(G, mb), "n_tokens": count_tokens(mb).float()}


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    R: Rewards,
    m: Tensor,
    *,
    group_size: int | None = None,
    group_index: Tensor | None = None,
    stats: tuple[Tensor | float, Tensor | float] | None = None,
    reward_weights: Tensor | Sequence[float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE++-baseline (verl/ORLHF): ``R − μ_g`` broadcast over the tokens, then token-weighted whitening.

    Singleton groups use μ=0 (verl). Unscorable rows get 0 and stay out of the whitening statistics.
    Returns ``A [B,T]`` (0 where masked) and metrics.
    """
    _, Rsum, scorable = _combine(R, reward_weights)
    gid, n_groups = _group_ids(Rsum.shape[0], group_size, group_index, Rsum.device)
    mean, _, cnt, _ = _group_stats(Rsum.unsqueeze(1), gid, n_groups, True)
    mu = torch.where(cnt[gid, 0] > 1, mean[gid, 0], 0.0)
    score = torch.nan_to_num(Rsum - mu).unsqueeze(1).expand(-1, m.shape[1])
    mm = as_bool(m) & scorable.unsqueeze(1)
    A = whiten(score, mm, stats=stats)
    metrics = _reward_metrics(Rsum, scorable, gid, n_groups)
    metrics["n_tokens"] = count_tokens(mm).float()
    return A, metrics


#: name -> advantage estimator; every one returns ``(advantages, metrics)``.
@torch.no_grad()
def turn_advantages(
    turn_rewards: Tensor, *, group_size: int | None = None, group_index: Tensor | None = None, eps: float = 1e-4
) -> tuple[Tensor, dict[str, Tensor]]:
    """Turn-level advantages of multi-turn rollouts whose turns are scored one by one (docs/LOSSES.md §7.1).

    ``turn_rewards [N,T]``: rollout i's reward for its assistant turn t (NaN where the rollout has no turn t).
    Each turn's return is the sum of the rewards from it to the end, ``g_{i,t} = Σ_{t'≥t} r_{i,t'}``; it is
    normalised over every turn of the rollout's group, ``A_{i,t} = (g_{i,t} − μ_g)/(σ_g + eps)`` (σ_g the unbiased
    std over the group's present turns; a group with fewer than two turns or no spread gives 0). Absent turns get 0.
    The loops add ``turn_advantage_coef · A_{i,t}`` to the outcome advantage of every token of turn t.
    Returns ``(A [N,T], metrics)``.
    """
    r = _as_rewards(turn_rewards)
    if r.dim() != 2:
        raise ValueError(f"turn_rewards must be [N, T], got shape {tuple(r.shape)}")
    present = ~torch.isnan(r)
    # reward-to-go over the present turns: a reversed cumulative sum with absent turns as 0
    g = torch.flip(torch.cumsum(torch.flip(torch.where(present, r, 0.0), [1]), 1), [1])
    g = torch.where(present, g, torch.nan)
    gid, n_groups = _group_ids(r.shape[0], group_size, group_index, r.device)
    flat_gid = gid.unsqueeze(1).expand_as(r).reshape(-1)
    mean, std, _, flat = _group_stats(g.reshape(-1, 1), flat_gid, n_groups, True)
    mu, sigma, flat_row = mean[gid, 0].unsqueeze(1), std[gid, 0].unsqueeze(1), flat[gid, 0].unsqueeze(1)
    A = torch.where(present & ~flat_row, (g - mu) / (sigma + eps), 0.0)
    n = present.sum().clamp(min=1)
    return A, {"turn_advantage_abs_mean": (A.abs() * present).sum() / n, "turn_return_mean": torch.nansum(g) / n}


ADVANTAGES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}
