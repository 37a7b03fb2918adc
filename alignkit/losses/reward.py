"""Reward-model losses: Bradley-Terry for outcome RMs, token classification for process RMs (docs/LOSSES.md §6).

Shapes: `P` pairs, `K` steps. Losses return `(loss, metrics)` with `loss = Σ(unit terms)/normalizer` (0-dim fp32)
and detached metric tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.logprobs import IGNORE_INDEX
from alignkit.losses.normalizer import Normalizer, normalize

__all__ = [
    "bradley_terry_loss",
    "reward_loss",
    "prm_loss",
    "STEP_AGGREGATIONS",
    "aggregate_step_scores",
]


def _pair_rewards(rewards: Tensor, name: str) -> Tensor:
    """Accept `[P]` or a reward head's `[P,1]` output; return `[P]` fp32."""
    if rewards.dim() == 2 and rewards.shape[-1] == 1:
        rewards = rewards.squeeze(-1)
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be [P] or [P,1], got {tuple(rewards.shape)}")
    return rewards.float()


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: float | Tensor | None = None,
    center_coef: float | None = None,
    normalizer: Normalizer,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry: `L = Σ −logσ(r_c − r_r − m)/D + c·Σ(r_c + r_r)²/D`; the unit is the pair.

    `−logσ(x)` is computed as `softplus(−x)`, i.e. the "LogExp" form `log1p(e^{r_r − r_c})`.

    Args:
        chosen_rewards, rejected_rewards: `[P]` (or `[P,1]`) scalar rewards.
        margin: optional required gap m, a float or `[P]` tensor.
        center_coef: optional c of the reward-centering penalty.
        normalizer: number of pairs (float, 0-dim tensor or "local").

    Metrics: `accuracy` (ties count 0), `margin` (mean r_c − r_r), `rewards/chosen`, `rewards/rejected`, `n_pairs`.
    """
    r_c = _pair_rewards(chosen_rewards, "chosen_rewards")
    r_r = _pair_rewards(rejected_rewards, "rejected_rewards")
    if r_c.shape != r_r.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(r_c.shape)} vs {tuple(r_r.shape)}")
    x = r_c - r_r
    if margin is not None:
        x = x - (margin.to(x.device).float() if isinstance(margin, Tensor) else margin)
    n = r_c.numel()
    loss = normalize(F.softplus(-x).sum(), normalizer, n)
    if center_coef:
        loss = loss + center_coef * normalize(((r_c + r_r) ** 2).sum(), normalizer, n)
    with torch.no_grad():
        denom = max(n, 1)
        metrics = {
            "accuracy": (r_c > r_r).float().sum() / denom,
            "margin": (r_c - r_r).sum() / denom,
            "rewards/chosen": r_c.sum() / denom,
            "rewards/rejected": r_r.sum() / denom,
            "n_pairs": torch.tensor(float(n), device=r_c.device),
        }
    return loss, metrics


reward_loss = bradley_terry_loss


# --------------------------------------------------------------------------------------------------------------------
# Process reward models
# --------------------------------------------------------------------------------------------------------------------


def prm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    normalizer: Normalizer,
    soft_labels: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Two-class cross-entropy at labelled step positions; the unit is the labelled step.

    Args:
        logits: `[..., 2]` class logits (LM-head PRMs pass `logits[..., [neg_id, pos_id]]`), read without shift.
        labels: `[...]` 0/1 at labelled positions, −100 elsewhere (see `alignkit.data.prm.prm_labels`).
        soft_labels: optional `[...]` probabilities q of "correct"; the target becomes `[1 − q, q]` (ORLHF).
        normalizer: number of labelled steps (float, 0-dim tensor or "local").

    Metrics: `accuracy` (argmax vs label, or vs q > ½), `nll` (local mean), `n_steps`.
    """
    if logits.shape[-1] != 2:
        raise ValueError(f"prm_loss expects 2 classes in the last dim, got {logits.shape[-1]}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape[:-1])}")
    if soft_labels is not None and soft_labels.shape != labels.shape:
        raise ValueError(f"soft_labels {tuple(soft_labels.shape)} must match labels {tuple(labels.shape)}")
    valid = labels != IGNORE_INDEX
    # Zero unlabelled logits before log_softmax so NaN/inf padding reaches neither the loss nor the gradient.
    logp = F.log_softmax(torch.where(valid.unsqueeze(-1), logits.float(), 0.0), dim=-1)
    if soft_labels is None:
        target = torch.where(valid, labels, 0).long()
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        positive = target == 1
    else:
        q = torch.where(valid, soft_labels.float(), 0.0)
        nll = -((1.0 - q) * logp[..., 0] + q * logp[..., 1])
        positive = q > 0.5
    per_step = torch.where(valid, nll, 0.0)
    n_steps = valid.sum()
    loss = normalize(per_step.sum(), normalizer, n_steps)
    with torch.no_grad():
        denom = n_steps.clamp_min(1).float()
        correct = valid & ((logp[..., 1] > logp[..., 0]) == positive)
        metrics = {
            "accuracy": correct.sum() / denom,
            "nll": per_step.detach().sum() / denom,
            "n_steps": n_steps.float(),
        }
    return loss, metrics


def _last_valid(log_s: Tensor, m: Tensor, n: Tensor) -> Tensor:
    idx = torch.where(m, torch.arange(m.shape[-1], device=m.device), -1).amax(-1).clamp_min(0)
    return log_s.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


STEP_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "min": lambda log_s, m, n: torch.where(m, log_s, math.inf).amin(-1),
    "prod": lambda log_s, m, n: torch.where(m, log_s, 0.0).sum(-1),
    "mean": lambda log_s, m, n: torch.logsumexp(torch.where(m, log_s, -math.inf), -1) - n.log(),
    "last": _last_valid,
    "geo_mean": lambda log_s, m, n: torch.where(m, log_s, 0.0).sum(-1) / n,
}
"""Step-score aggregations in log space, name -> `(log s [...,K], mask [...,K], n valid [...]) -> log score [...]`."""


def aggregate_step_scores(s: Tensor, step_mask: Tensor, how: str, *, log_space: bool = False) -> Tensor:
    """Trajectory score from per-step PRM scores `s_k = softmax(logits_k)[1]`.

    `how`: `min`, `prod = exp Σ log s`, `mean`, `last` (last valid step), `geo_mean = exp mean log s`.
    Computed in log space; rows with no valid step are NaN (unscorable, §7.1).

    Args:
        s: `[..., K]` step scores in [0, 1], or their logs if `log_space`.
        step_mask: `[..., K]` valid steps; masked entries may hold anything.
        how: a name of `STEP_AGGREGATIONS`.
        log_space: inputs are log-scores and the result is the log of the aggregate.

    Returns:
        `[...]` fp32 scores (log-scores if `log_space`).
    """
    if how not in STEP_AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {how!r}; expected one of {list(STEP_AGGREGATIONS)}")
    if s.shape != step_mask.shape:
        raise ValueError(f"s {tuple(s.shape)} and step_mask {tuple(step_mask.shape)} must match")
    m = step_mask.bool()
    # Replace masked entries before the log so padding cannot produce NaN values or gradients.
    log_s = torch.where(m, s.float(), 0.0) if log_space else torch.where(m, s.float(), 1.0).log()
    n = m.sum(-1)
    out = STEP_AGGREGATIONS[how](log_s, m, n.clamp_min(1).float())
    out = torch.where(n > 0, out, math.nan)
    return out if log_space else out.exp()
