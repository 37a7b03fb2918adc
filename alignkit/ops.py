"""Masked tensor ops every loss, estimator and loop uses (docs/LOSSES.md §2).

Masked reductions drop masked slots with ``torch.where`` (never multiplication), so NaN/inf at masked slots
cannot leak into values or gradients. Half-precision inputs are upcast to fp32 (loss math is fp32); fp32 and
fp64 stay as they are. A mask may be bool or {0,1}. Nothing here calls ``.item()`` or synchronises with the host.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "as_float",
    "as_bool",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "whiten",
    "segment_sum",
    "sequence_logps",
    "count_tokens",
    "count_sequences",
    "split_pairs",
]


def as_float(x: Tensor) -> Tensor:
    """Upcast half precisions (and integers) to fp32; keep fp32/fp64 as they are (fp64 only comes from tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def as_bool(m: Tensor) -> Tensor:
    return m if m.dtype == torch.bool else m != 0


def _drop(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(as_bool(m), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _count(m: Tensor, dim: int | None = None) -> Tensor:
    return as_bool(m).sum() if dim is None else as_bool(m).sum(dim)


def masked_sum(x: Tensor, m: Tensor, dim: int | None = None) -> Tensor:
    """``Σ m·x`` over ``dim`` (all dims if None); masked slots are dropped, not multiplied."""
    x = _drop(as_float(x), m)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, m: Tensor, dim: int | None = None) -> Tensor:
    """``Σ m·x / max(Σ m, 1)`` over ``dim`` (all dims if None); an empty mask gives 0."""
    s = masked_sum(x, m, dim)
    return s / _count(m, dim).clamp(min=1).to(s.dtype)


def masked_var(x: Tensor, m: Tensor, unbiased: bool = True) -> Tensor:
    """Masked variance over all elements: ``Σ m(x−μ)² / (Σm − 1)`` (unbiased) or ``/ Σm``.

    The denominator is clamped at 1, so fewer than two valid elements give 0 instead of a host-side error.
    """
    x = as_float(x)
    mu = masked_mean(x, m)
    n = _count(m).to(x.dtype)
    denom = (n - 1 if unbiased else n).clamp(min=1)
    # Drop before subtracting: a NaN slot would otherwise send 0·NaN = NaN back through the square to μ.
    return masked_sum((_drop(x, m) - mu).square(), m) / denom


def whiten(
    x: Tensor,
    m: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[Tensor | float, Tensor | float] | None = None,
) -> Tensor:
    """``(x − μ)·rsqrt(var + eps)`` (``+ μ`` back if not ``shift_mean``); masked slots are 0.

    ``stats=(μ, var)`` injects batch-global values (computed by the caller across ranks / micro-batches);
    otherwise masked mean and unbiased variance of the tensor passed in.
    """
    x = as_float(x)
    if stats is not None:
        mu, var = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in stats)
    else:
        mu, var = masked_mean(x, m), masked_var(x, m)
    out = (_drop(x, m) - mu) * torch.rsqrt(var + eps)  # dropped first, so no NaN reaches var's gradient
    if not shift_mean:
        out = out + mu
    return _drop(out, m)


def segment_sum(x: Tensor, segment_ids: Tensor, n: int) -> Tensor:
    """Sum ``x`` per segment (e.g. per document of a packed row): ``[...] , [...] -> [n]``.

    Entries with a negative segment id (padding / masked) are dropped. Differentiable w.r.t. ``x``.
    """
    x, ids = x.reshape(-1), segment_ids.reshape(-1)
    keep = ids >= 0
    return x.new_zeros(n).index_add(0, torch.where(keep, ids, 0), _drop(x, keep))


def sequence_logps(logps: Tensor, m: Tensor, reduce: Literal["sum", "mean"] = "sum") -> Tensor:
    """Per-sequence reduction of aligned per-token log-probs: ``[B,T] -> [B]``.

    ``"sum"``: ``S = Σ_t m ℓ``; ``"mean"``: ``S / max(Σ_t m, 1)``. (LD-DPO's length-desensitised sum is
    ``alignkit.losses.preference.ld_sequence_logps``.)
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return masked_sum(logps, m, -1) if reduce == "sum" else masked_mean(logps, m, -1)


def count_tokens(m: Tensor) -> Tensor:
    """Number of valid tokens (0-dim int64) — the SFT / token-mean normaliser input before all-reduce."""
    return _count(m)


def count_sequences(m: Tensor, exclude_empty: bool = False) -> Tensor:
    """Number of rows of ``m[B,T]`` (0-dim int64); ``exclude_empty`` skips rows without any valid token."""
    if exclude_empty:
        return as_bool(m).any(-1).sum()
    return torch.tensor(m.shape[0], dtype=torch.long, device=m.device)


def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split a `[2P, ...]` batch laid out as `[chosen; rejected]` into two `[P, ...]` views."""
    if x.shape[0] % 2:
        raise ValueError(f"split_pairs needs an even leading dimension, got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]
