"""Aggregation of per-token policy losses, each mode with the normaliser it needs (docs/LOSSES.md §1, §7.5).

Every mode returns ``Σ(unit terms) / normalizer``. For a fixed normaliser the value is linear in ``L``, so
summing the losses of K micro-batches (each divided by the same global D) reproduces the full-batch loss and
gradient exactly; ``"local"`` is the convenience (and inexact) per-call count. Each registered
:class:`Aggregation` also owns its step normaliser: :func:`step_normalizer` gives the D of an optimizer step
from the mask of ALL its rows (sum it over ranks under data parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from alignkit.losses.normalizer import Normalizer, normalize
from alignkit.ops import count_sequences, count_tokens, masked_mean, masked_sum

__all__ = ["AGGREGATIONS", "Aggregation", "Normalizer", "aggregate", "step_normalizer"]


@dataclass(frozen=True)
class Aggregation:
    """One aggregation mode.

    ``terms(L [B,T], m [B,T]) -> (Σ unit terms, local unit count for normalizer="local", or None if none)``;
    ``step_normalizer(m [N,T] of the whole step, max_new_tokens) -> D`` (the unit count, at least 1).
    """

    terms: Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]
    step_normalizer: Callable[[Tensor, int], float]


def _token_terms(L: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    return masked_sum(L, m), count_tokens(m).float().clamp(min=1.0)


def _seq_mean_token_mean(L: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    return masked_mean(L, m, dim=-1).sum(), count_sequences(m).float().clamp(min=1.0)


def _seq_mean_token_sum(L: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    return masked_sum(L, m), count_sequences(m).float().clamp(min=1.0)


def _token_sum_constant(L: Tensor, m: Tensor) -> tuple[Tensor, None]:
    # A constant D is the whole point of this mode (Dr.GRPO), so there is no local count to fall back on.
    return masked_sum(L, m), None


def _tokens(m: Tensor, max_new_tokens: int) -> float:
    return float(int(count_tokens(m)))  # 0 when nothing counts: step_normalizer clamps after summing over ranks


def _sequences(m: Tensor, max_new_tokens: int) -> float:
    return float(m.shape[0])  # every row counts, empty (masked) ones too (TRL)


def _sequences_times_max_len(m: Tensor, max_new_tokens: int) -> float:
    return float(m.shape[0] * max_new_tokens)  # Dr.GRPO: n_seqs · L_max


#: mode -> :class:`Aggregation` (its per-call terms and its step normaliser).
AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": Aggregation(_token_terms, _tokens),
    "seq_mean_token_mean": Aggregation(_seq_mean_token_mean, _sequences),
    "seq_mean_token_sum": Aggregation(_seq_mean_token_sum, _sequences),
    "token_sum_constant": Aggregation(_token_sum_constant, _sequences_times_max_len),
}


def _mode(mode: str) -> Aggregation:
    try:
        return AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose from {sorted(AGGREGATIONS)}") from None


def step_count(mode: str, mask: Tensor, max_new_tokens: int = 0) -> float:
    """The unit count behind ``mode``'s normaliser for the rows in ``mask`` (tokens, sequences, or sequences x
    ``max_new_tokens``), unclamped: a rank's share of a step, to be summed over ranks before clamping."""
    return _mode(mode).step_normalizer(mask, max_new_tokens)


def step_normalizer(mode: str, mask: Tensor, max_new_tokens: int = 0) -> float:
    """The normaliser D of ``mode`` for one optimizer step: ``mask`` ``[N,T]`` covers ALL the step's rows (every
    micro-batch; rows that must not count, e.g. masked truncations, all False), at least 1. Under several ranks
    sum their :func:`step_count` and clamp the sum the same way (``max(total, 1)``)."""
    return max(step_count(mode, mask, max_new_tokens), 1.0)


def aggregate(L: Tensor, m: Tensor, *, mode: str, normalizer: Normalizer) -> Tensor:
    """Reduce a per-token loss to a 0-dim tensor.

    Args:
        L: ``[B,T]`` per-token loss (values in masked slots are ignored, even NaN/inf).
        m: ``[B,T]`` bool or {0,1} loss mask.
        mode: ``token_mean`` (Σ m·L / D, D≈tokens), ``seq_mean_token_mean`` (Σ_i mean_t L / D, D≈sequences),
            ``seq_mean_token_sum`` (Σ m·L / D, D≈sequences), ``token_sum_constant`` (Σ m·L / D, D constant).
        normalizer: D. Pass the global unit count of the optimizer step divided by W for averaging DP backends
            (N if the backend sums), the same for every micro-batch; ``"local"`` uses this call's count.

    Returns:
        0-dim loss, ``Σ(unit terms) / D``.
    """
    fn = _mode(mode).terms
    if L.shape != m.shape:
        raise ValueError(f"L {tuple(L.shape)} and m {tuple(m.shape)} must have the same [B,T] shape")
    total, local = fn(L, m)
    if isinstance(normalizer, str) and local is None:
        raise ValueError("this mode has no local count; pass a numeric normalizer (e.g. n_seqs * L_max / W)")
    return normalize(total, normalizer, local)
