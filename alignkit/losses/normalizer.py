"""The explicit normaliser every loss takes (docs/LOSSES.md §1): `Σ(unit terms) / normalizer`.

Pass the count of the loss's unit (token, sequence, pair, example) over all micro-batches of the optimizer
step, divided by the world size when the data-parallel backend averages gradients; sum the micro-batch losses.
The gradient is then exactly the full-batch gradient. `"local"` divides by this call's own count (convenient,
inexact under gradient accumulation or data parallelism).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Normalizer = float | int | Tensor | Literal["local"]


def normalize(total: Tensor, normalizer: Normalizer, local_count: int | Tensor | None) -> Tensor:
    """`total / normalizer`, or `total / max(local_count, 1)` for `"local"`.

    Args:
        total: 0-dim sum of unit terms.
        normalizer: a positive number, a 0-dim tensor (e.g. an all-reduced count), or `"local"`.
        local_count: the number of units in this call; `None` when the loss has no local count.
    """
    if isinstance(normalizer, str):
        if normalizer != "local":
            raise ValueError(f"normalizer must be a number, a 0-dim tensor or 'local', got {normalizer!r}")
        if local_count is None:
            raise ValueError("normalizer='local' is not available here: pass the count explicitly")
        denom = torch.as_tensor(local_count, dtype=torch.float32, device=total.device).clamp_min(1.0)
        return total / denom.to(total.dtype)
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"a tensor normalizer must be 0-dim, got shape {tuple(normalizer.shape)}")
        return total / normalizer.to(device=total.device, dtype=total.dtype)
    if isinstance(normalizer, bool) or not isinstance(normalizer, int | float):
        raise ValueError(f"normalizer must be a number, a 0-dim tensor or 'local', got {type(normalizer).__name__}")
    if not normalizer > 0:  # also rejects NaN
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return total / float(normalizer)
