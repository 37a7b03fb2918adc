"""Aggregation of per-token policy losses and the masked ops they need (LOSSES.md §1, §2, §7.5).

Every mode returns ``Σ(unit terms) / normalizer``. For a fixed normaliser the value is linear in ``L``, so
summing the losses of K micro-batches (each divided by the same global D) reproduces the full-batch loss and
gradient exactly; ``"local"`` is the convenience (and inexact) per-call count.

The ``_masked_*`` helpers wrap ``alignkit.logprobs``' masked ops with an fp32 upcast of half precisions and
float counts (``torch.where`` inside, so NaN/inf in masked slots reach neither the value nor the gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignkit.logprobs import count_sequences, count_tokens, masked_mean, masked_sum, whiten
from alignkit.losses.normalizer import Normalizer, normalize

__all__ = ["AGGREGATIONS", "Normalizer", "aggregate"]


# ---------------------------------------------------------------------------------------------------------------
# masked ops: fp32 wrappers over alignkit.logprobs
# ---------------------------------------------------------------------------------------------------------------


def _fp(x: Tensor) -> Tensor:
    """Upcast half precisions to fp32; keep fp32/fp64 as they are (fp64 only ever comes from tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def _bool(m: Tensor) -> Tensor:
    return m if m.dtype == torch.bool else m != 0


def _masked_sum(x: Tensor, m: Tensor, dim: int | None = None) -> Tensor:
    return masked_sum(_fp(x), _bool(m), dim)


def _masked_mean(x: Tensor, m: Tensor, dim: int | None = None) -> Tensor:
    return masked_mean(_fp(x), _bool(m), dim)


def _whiten(
    x: Tensor,
    m: Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[Tensor | float, Tensor | float] | None = None,
) -> Tensor:
    """`alignkit.logprobs.whiten` in fp32 (half precisions upcast); `stats=(μ, var)` injects global values."""
    x = _fp(x)
    if stats is not None:
        stats = tuple(torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in stats)
    return whiten(x, _bool(m), shift_mean=shift_mean, eps=eps, stats=stats)


def _count_tokens(m: Tensor) -> Tensor:
    """Number of unmasked slots (0-dim fp32)."""
    return count_tokens(_bool(m)).float()


def _count_sequences(m: Tensor, exclude_empty: bool = False) -> Tensor:
    """Number of rows of ``m [B,T]``; with ``exclude_empty`` only rows with at least one unmasked slot."""
    return count_sequences(_bool(m), exclude_empty=exclude_empty).float()


# ---------------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------------


def _token_terms(L: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    return _masked_sum(L, m), _count_tokens(m).clamp(min=1.0)


def _seq_mean_token_mean(L: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    return _masked_mean(L, m, dim=-1).sum(), _count_sequences(m).clamp(min=1.0)


def _seq_mean_token_sum(L: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    return _masked_sum(L, m), _count_sequences(m).clamp(min=1.0)


def _token_sum_constant(L: Tensor, m: Tensor) -> tuple[Tensor, None]:
    # A constant D is the whole point of this mode (Dr.GRPO), so there is no local count to fall back on.
    return _masked_sum(L, m), None


#: mode -> fn(L [B,T], m [B,T]) -> (Σ unit terms, local unit count for normalizer="local", or None if none).
AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]] = {
    "token_mean": _token_terms,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
    "token_sum_constant": _token_sum_constant,
}


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
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose from {sorted(AGGREGATIONS)}") from None
    if L.shape != m.shape:
        raise ValueError(f"L {tuple(L.shape)} and m {tuple(m.shape)} must have the same [B,T] shape")
    total, local = fn(L, m)
    if isinstance(normalizer, str) and local is None:
        raise ValueError("this mode has no local count; pass a numeric normalizer (e.g. n_seqs * L_max / W)")
    return normalize(total, normalizer, local)
