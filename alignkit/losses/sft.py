"""SFT losses (docs/LOSSES.md §3): masked NLL, DFT, label smoothing. The unit is the token.

    out = model_token_logps(model, input_ids, labels, extras=("mean_logp",))  # mean_logp only for smoothing
    loss, metrics = sft_loss(out["logps"], out["mask"], normalizer=n_step_tokens, mean_logp=out["mean_logp"])

Pass as ``normalizer`` the trained-token count of the whole optimizer step (all micro-batches; divided by the
world size under DDP/FSDP, which average gradients) and sum the micro-batch losses: the gradients then equal the
full-batch gradient. ``"local"`` divides by this micro-batch's own count (inexact under accumulation).

Packed rows (``[1,ΣL]``) need nothing special here: the caller masks each document's first token, and a
per-document value is ``segment_sum`` (``alignkit.logprobs``) of the per-token terms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignkit.losses.normalizer import Normalizer, normalize
from alignkit.ops import count_tokens, masked_mean


def _nll(ce: Tensor, logps: Tensor) -> Tensor:
    return ce


def _dft(ce: Tensor, logps: Tensor) -> Tensor:
    # Dynamic fine-tuning: each token's cross-entropy reweighted by its own probability, treated as a constant.
    return ce * logps.detach().exp()


#: kind -> fn(ce [B,T], ℓ [B,T]) -> per-token loss [B,T]; ce is the (smoothed) per-token cross-entropy.
SFT_KINDS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"nll": _nll, "dft": _dft}


def sft_loss(
    logps: Tensor,
    mask: Tensor,
    *,
    normalizer: Normalizer,
    kind: str = "nll",
    label_smoothing: float = 0.0,
    mean_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    is_top1: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level SFT loss ``Σ_t m_t·L_t / normalizer``.

    Per token, with ``ce_t = (1−ε)(−ℓ_t) − ε·u_t`` (``u_t = mean_v log p_v``; ``ce_t = −ℓ_t`` when ε=0):
    ``nll``: ``L_t = ce_t``; ``dft``: ``L_t = ce_t·sg(e^{ℓ_t})``. ε-smoothing equals PyTorch's
    ``cross_entropy(label_smoothing=ε)`` (uniform over the vocabulary) without needing the full logits.

    Args:
        logps: ``[B,T]`` aligned log-probs of the labels; any value (NaN included) at masked slots.
        mask: ``[B,T]`` bool or {0,1}: the trained tokens.
        normalizer: float, 0-dim tensor, or ``"local"`` (this call's own token count).
        kind: a key of :data:`SFT_KINDS` (``"nll"``, ``"dft"``).
        label_smoothing: ε in [0,1); needs ``mean_logp``.
        mean_logp: ``[B,T]`` ``u_t`` (``extras=("mean_logp",)`` of the log-prob functions).
        entropy: optional ``[B,T]`` per-token entropy, reported only.
        is_top1: optional ``[B,T]`` bool (target is the arg-max), reported only.

    Returns:
        ``(loss, metrics)``: 0-dim fp32 loss; detached fp32 metrics ``nll`` (local token-mean −ℓ),
        ``n_tokens``, and ``entropy`` / ``token_accuracy`` (local token means) when those inputs are given.
    """
    if kind not in SFT_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {sorted(SFT_KINDS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing > 0 and mean_logp is None:
        raise ValueError("label_smoothing needs mean_logp (extras=('mean_logp',) in the log-prob functions)")
    m = mask.bool()
    # Inputs are dropped with where before any arithmetic: a NaN/inf masked slot would otherwise turn a zero
    # upstream gradient into 0·NaN = NaN inside a product (e.g. DFT's weight e^ℓ).
    lp = torch.where(m, logps.float(), 0.0)
    ce = -lp
    if label_smoothing > 0:
        ce = (1 - label_smoothing) * ce - label_smoothing * torch.where(m, mean_logp.float(), 0.0)
    per_token = SFT_KINDS[kind](ce, lp)
    loss = normalize(torch.where(m, per_token, 0.0).sum(), normalizer, count_tokens(m))

    with torch.no_grad():
        metrics = {"nll": masked_mean(-lp, m), "n_tokens": count_tokens(m).float()}
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.float(), m)
        if is_top1 is not None:
            metrics["token_accuracy"] = masked_mean(is_top1.float(), m)
    return loss, metrics
