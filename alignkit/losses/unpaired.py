"""Unpaired preference losses: KTO (and APO-zero unpaired) and BCO (docs/LOSSES.md §5).

Shapes: `N` examples; `policy`, `ref` are `[N]` summed completion log-probs, `desirable` is `bool[N]`. The unit is the
example. Batch-global quantities (KTO's reference point z₀, BCO's running reward mean) are inputs or explicit state,
never collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.normalizer import Normalizer, normalize

__all__ = [
    "KTO_LOSSES",
    "BCOState",
    "kto_loss",
    "kto_reference_point",
    "mismatched_completions",
    "kto_weight_ratio",
    "bco_loss",
    "update_bco_state",
]


def _as_examples(policy: Tensor, ref: Tensor, desirable: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if policy.dim() != 1 or ref.shape != policy.shape or desirable.shape != policy.shape:
        raise ValueError(
            f"policy, ref and desirable must be [N] tensors of one shape, got "
            f"{tuple(policy.shape)}, {tuple(ref.shape)}, {tuple(desirable.shape)}"
        )
    return policy.float(), ref.float(), desirable.to(policy.device).bool()


@torch.no_grad()
def _side_metrics(rewards: Tensor, logps: Tensor, desirable: Tensor) -> dict[str, Tensor]:
    """Local per-side means (0 for an empty side) with their counts, so ranks can weight-average them."""
    n_d = desirable.sum().float()
    n_u = (~desirable).sum().float()
    mean_d = lambda x: torch.where(desirable, x, 0.0).sum() / n_d.clamp_min(1.0)
    mean_u = lambda x: torch.where(desirable, 0.0, x).sum() / n_u.clamp_min(1.0)
    return {
        "rewards/chosen": mean_d(rewards),
        "rewards/rejected": mean_u(rewards),
        "rewards/margins": mean_d(rewards) - mean_u(rewards),
        "logps/chosen": mean_d(logps),
        "logps/rejected": mean_u(logps),
        "n_desirable": n_d,
        "n_undesirable": n_u,
    }


# --------------------------------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------------------------------

# name -> (β·h, β·z₀) -> (desirable term, undesirable term), both [N]; σ(−x) is 1−σ(x) without cancellation.
KTO_LOSSES: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "kto": lambda bh, bz: (torch.sigmoid(bz - bh), torch.sigmoid(bh - bz)),
    "apo_zero_unpaired": lambda bh, bz: (torch.sigmoid(-bh), torch.sigmoid(bh)),
}


def kto_loss(
    policy: Tensor,
    ref: Tensor,
    desirable: Tensor,
    *,
    kl_ref_point: float | Tensor | None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    normalizer: Normalizer,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO: desirable `λ_D(1 − σ(β(h − z₀)))`, undesirable `λ_U(1 − σ(β(z₀ − h)))`, `h = π − ρ`.

    Args:
        policy, ref: `[N]` summed log-probs. desirable: `bool[N]` labels.
        kl_ref_point: z₀, the global mean of `kto_reference_point` sums, clamped ≥ 0 (detached here);
            may be None for `apo_zero_unpaired`, which ignores it.
        loss_type: a name of `KTO_LOSSES`.
        normalizer: number of examples (float, 0-dim tensor or "local").
    """
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {list(KTO_LOSSES)}")
    if loss_type == "kto" and kl_ref_point is None:
        raise ValueError("loss_type='kto' needs kl_ref_point (z0); see kto_reference_point")
    pi, rho, des = _as_examples(policy, ref, desirable)
    h = pi - rho
    z0 = torch.as_tensor(0.0 if kl_ref_point is None else kl_ref_point, dtype=torch.float32, device=h.device)
    z0 = z0.detach()
    loss_d, loss_u = KTO_LOSSES[loss_type](beta * h, beta * z0)
    per_example = torch.where(des, desirable_weight * loss_d, undesirable_weight * loss_u)
    loss = normalize(per_example.sum(), normalizer, h.numel())
    metrics = _side_metrics(beta * h.detach(), pi.detach(), des)
    metrics["kl"] = z0.clone()
    return loss, metrics


@torch.no_grad()
def kto_reference_point(policy_mismatched: Tensor, ref_mismatched: Tensor) -> tuple[Tensor, Tensor]:
    """Local pieces of KTO's z₀ over mismatched pairs `(x_i, y_{i+1 mod N})`: `(Σ(π′ − ρ′), count)`.

    The caller all-reduces both, divides, clamps at ≥ 0 and passes the result as `kl_ref_point` (exact, whereas
    TRL averages per-rank means).

    Args:
        policy_mismatched, ref_mismatched: `[M]` summed log-probs of the mismatched completions.

    Returns:
        Two 0-dim fp32 tensors, the sum of log-ratios and their count.
    """
    if policy_mismatched.shape != ref_mismatched.shape:
        raise ValueError("policy_mismatched and ref_mismatched must have one shape")
    diff = policy_mismatched.float() - ref_mismatched.float()
    return diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)


def mismatched_completions(n: int, *, shift: int = 1, device: torch.device | str | None = None) -> Tensor:
    """Indices pairing prompt i with completion `(i + shift) mod n` for the KTO reference point.

    `shift=1` is the spec's `y_{i+1}`; TRL 1.16 rotates the other way (`shift=-1`). Any shift not ≡ 0 (mod n) gives
    every prompt a completion from another example.

    Returns:
        `[n]` long tensor: `completions[idx]` are the mismatched completions.
    """
    if n < 2:
        raise ValueError(f"mismatched completions need at least 2 examples, got {n}")
    if shift % n == 0:
        raise ValueError(f"shift {shift} maps every prompt to its own completion for n={n}")
    return (torch.arange(n, device=device) + shift) % n


def kto_weight_ratio(desirable_weight: float, undesirable_weight: float, n_desirable: int, n_undesirable: int) -> float:
    """`λ_D·n_D / (λ_U·n_U)`; the KTO paper recommends keeping it in [1, 4/3]."""
    denom = undesirable_weight * n_undesirable
    if denom <= 0:
        raise ValueError("kto_weight_ratio needs undesirable_weight > 0 and n_undesirable > 0")
    return desirable_weight * n_desirable / denom


# --------------------------------------------------------------------------------------------------------------------
# BCO
# --------------------------------------------------------------------------------------------------------------------


class BCOState(NamedTuple):
    """Running mean of BCO rewards `r = β(π − ρ)` over every example seen; 0-dim fp32 tensors."""

    mean: Tensor
    count: Tensor

    @classmethod
    def initial(cls, device: torch.device | str | None = None) -> BCOState:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))


@torch.no_grad()
def update_bco_state(state: BCOState, reward_sum: Tensor, count: Tensor) -> BCOState:
    """Fold a batch `(Σr, n_b)` into the running mean: `mean′ = mean + (r̄_b − mean)·n_b/(n + n_b)`."""
    mean, n = state.mean.float(), state.count.float()
    reward_sum = torch.as_tensor(reward_sum, dtype=torch.float32, device=mean.device)
    count = torch.as_tensor(count, dtype=torch.float32, device=mean.device)
    total = n + count
    # An empty batch (n_b = 0) leaves the state unchanged instead of dividing by zero.
    step = torch.where(count > 0, (reward_sum - mean * count) / torch.where(count > 0, total, 1.0), 0.0)
    return BCOState(mean + step, total)


def bco_loss(
    policy: Tensor,
    ref: Tensor,
    desirable: Tensor,
    state: BCOState,
    *,
    beta: float = 0.1,
    update_state: bool = True,
    batch_stats: tuple[Tensor, Tensor] | None = None,
    udm_weights: Tensor | None = None,
    normalizer: Normalizer,
) -> tuple[Tensor, dict[str, Tensor], BCOState]:
    """BCO: desirable `−logσ(r − δ)`, undesirable `−logσ(−(r − δ))`, `r = β(π − ρ)`, δ the running reward mean.

    Update, then use (TRL order): with `update_state`, the batch `(Σr, n_b)` — or the caller's all-reduced
    `batch_stats` — is folded into `state` first and δ is the new mean. Evaluation passes `update_state=False`.

    Args:
        policy, ref: `[N]` summed log-probs. desirable: `bool[N]`. state: running mean (`BCOState.initial()`).
        batch_stats: optional global `(Σr, count)`, replacing this batch's local statistics.
        udm_weights: optional `[N]` density-ratio weights scaling the undesirable terms (clamped by the caller).
        normalizer: number of examples (float, 0-dim tensor or "local").

    Returns:
        `(loss, metrics, new_state)`.
    """
    pi, rho, des = _as_examples(policy, ref, desirable)
    r = beta * (pi - rho)
    if update_state:
        stats = (r.detach().sum(), r.numel()) if batch_stats is None else batch_stats
        state = update_bco_state(state, *stats)
    delta = state.mean.detach().to(r.device).float()
    x = r - delta
    loss_u = -F.logsigmoid(-x)
    if udm_weights is not None:
        loss_u = loss_u * udm_weights.to(r.device).float()
    per_example = torch.where(des, -F.logsigmoid(x), loss_u)
    loss = normalize(per_example.sum(), normalizer, r.numel())
    metrics = _side_metrics(r.detach(), pi.detach(), des)
    metrics["delta"] = delta.clone()
    return loss, metrics, state
