"""Aggregation of per-token policy losses and the masked ops they need (LOSSES.md §1, §2, §7.5).

Every mode returns ``Σ(unit terms) / normalizer``. For a fixed normaliser the value is linear in ``L``, so
summing the losses of K micro-batches (each divided by the same global D) reproduces the full-batch loss and
gradient exactly; ``"local"`` is the convenience (and inexact) per-call count.

The ``_masked_*`` helpers are private stand-ins for ``alignkit.logprobs`` (masked_sum, masked_mean,
masked_var, whiten, count_tokens, count_sequences); they use ``torch.where`` so NaN/inf in masked slots can
neither reach the value nor the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Normalizer = float | int | Tensor | Literal["local"]

__all__ = ["AGGREGATIONS", "Normalizer", "aggregate"]


# ---------------------------------------------------------------------------------------------------------------
# masked ops (private; switch to alignkit.logprobs once it lands)
# ---------------------------------------------------------------------------------------------------------------


def _fp(x: Tensor) -> Tensor:
    """Upcast half precisions to fp32; keep fp32/fp64 as they are (fp64 only ever comes from tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def _bool(m: Tensor) -> Tensor:
    return m if m.dtype == torch.bool else m != 0


def _masked_sum(x: Tensor, m: Tensor, dim: int | None = None) -> Tensor:
    """``Σ m·x`` over ``dim`` (all dims if None); masked slots are dropped, not multiplied by 0."""
    x = torch.where(_bool(m), _fp(x), torch.zeros((), dtype=_fp(x).dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def _count(m: Tensor, dim: int | None = None) -> Tensor:
    m = _bool(m).float()
    return m.sum() if dim is None else m.sum(dim)


def _masked_mean(x: Tensor, m: Tensor, dim: int | None = None) -> Tensor:
    """``Σ m·x / max(Σ m, 1)``."""
    return _masked_sum(x, m, dim) / _count(m, dim).clamp(min=1.0)


def _masked_var(x: Tensor, m: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar masked variance ``Σ m(x−μ)² / (Σ m − 1)`` (or ``/Σ m``); 0 when fewer than two entries."""
    mu = _masked_mean(x, m)
    n = _count(m)
    denom = (n - 1.0) if unbiased else n
    return _masked_sum((_fp(x) - mu) ** 2, m) / denom.clamp(min=1.0)


def _whiten(
    x: Tensor,
    m: Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[Tensor | float, Tensor | float] | None = None,
) -> Tensor:
    """``(x−μ)·rsqrt(var+eps)`` over the masked entries (μ added back when ``shift_mean=False``); 0 where masked.

    ``stats=(μ, var)`` injects batch-global statistics (micro-batching, DP) instead of the local ones.
    """
    if stats is None:
        mu, var = _masked_mean(x, m), _masked_var(x, m)
    else:
        mu, var = (torch.as_tensor(s, dtype=_fp(x).dtype, device=x.device) for s in stats)
    out = (_fp(x) - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu
    return torch.where(_bool(m), out, torch.zeros((), dtype=out.dtype, device=x.device))


def _count_tokens(m: Tensor) -> Tensor:
    """Number of unmasked slots (0-dim fp32)."""
    return _count(m)


def _count_sequences(m: Tensor, exclude_empty: bool = False) -> Tensor:
    """Number of rows of ``m [B,T]``; with ``exclude_empty`` only rows with at least one unmasked slot."""
    if exclude_empty:
        return _bool(m).any(-1).float().sum()
    return torch.tensor(float(m.shape[0]), device=m.device)


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


def _check_normalizer(normalizer: Normalizer) -> None:
    if isinstance(normalizer, str):
        if normalizer != "local":
            raise ValueError(f'normalizer must be a number, a 0-dim tensor or "local", got {normalizer!r}')
    elif isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError("normalizer tensor must be 0-dim")
    elif not normalizer > 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")


def _divide(total: Tensor, normalizer: Normalizer, local: Tensor | None) -> Tensor:
    """``total / D`` with D the normaliser, or the local count for ``"local"``."""
    _check_normalizer(normalizer)
    if isinstance(normalizer, str):
        if local is None:
            raise ValueError("this mode has no local count; pass a numeric normalizer (e.g. n_seqs * L_max / W)")
        normalizer = local
    return total / torch.as_tensor(normalizer, dtype=total.dtype, device=total.device)


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
    return _divide(total, normalizer, local)
