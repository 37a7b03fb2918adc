"""Distillation losses (docs/LOSSES.md §8): forward KL, reverse KL and the generalized JSD(β) (TRL convention).

    loss, metrics = generalized_jsd_loss(student_logits, teacher_logits, m, beta=0.5, normalizer=n_step_tokens)
    loss, metrics = chunked_generalized_jsd_loss(h_s, W_s, h_t, W_t, m, beta=0.5, normalizer=n_step_tokens)
    loss, metrics = sparse_divergence_loss(student_logits, topk_ids, topk_logps, m, normalizer=n_step_tokens)

Per token, with ``p = softmax(z_S/τ)`` (student), ``q = softmax(z_T/τ)`` (teacher) and ``M = βq + (1−β)p``:
``β=0``: ``KL(q‖p)`` (forward); ``β=1``: ``KL(p‖q)`` (reverse); else ``β·KL(q‖M) + (1−β)·KL(p‖M)``. The endpoints are
*defined* (JSD_β → 0 as β → 0 or 1); no τ² factor (TRL). The teacher never receives a gradient.

Reductions (``level``): ``"token"`` = ``Σ_t m_t·D_t / normalizer`` (unit: token); ``"sequence"`` = each sequence's
masked token-mean, summed over sequences, ``/ normalizer`` (unit: sequence). ``token_weights`` gives any other
per-token weighting (``Σ m·w·D / normalizer``, e.g. per-document means of packed rows). Pass the unit count of the
whole optimizer step as ``normalizer`` (÷ world size under DDP/FSDP) and sum the micro-batch losses; ``"local"``
divides by this call's own count.

The per-token math (:func:`divergence_terms`, :func:`divergence_grad`) is kept apart from the tiling engine
(:func:`chunked_token_divergence`), which computes the divergence from both models' final hidden states and heads
over token x vocab tiles and never builds ``[N,V]`` logits.

Nothing here calls ``.item()``, synchronises with the host or runs a collective; metrics are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.normalizer import Normalizer, normalize
from alignkit.ops import as_bool, count_sequences, count_tokens, masked_mean

__all__ = [
    "DEFAULT_TOKEN_CHUNK",
    "LEVELS",
    "chunked_generalized_jsd_loss",
    "chunked_token_divergence",
    "divergence_grad",
    "divergence_terms",
    "forward_kl_loss",
    "generalized_jsd_loss",
    "jsd_upper_bound",
    "reverse_kl_loss",
    "sequence_token_weights",
    "sparse_divergence_loss",
    "token_divergence",
]

Metrics = dict[str, Tensor]
Level = Literal["token", "sequence"]
LEVELS = ("token", "sequence")
#: Tokens per tile of the chunked engine (as ``alignkit.logprobs``): 1024 x 32k fp32 tiles are 128 MB each.
DEFAULT_TOKEN_CHUNK = 1024
#: TRL's clamp of the top-k log-mass before the tail bucket ``log(1 − Σ_K p)`` (keeps the tail finite).
TAIL_LOG_SUM_MAX = -1e-7
_NEG_INF = float("-inf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least (divergence math is fp32); fp64 stays fp64 so that tests can compare exactly.
    return torch.promote_types(dtype, torch.float32)


def _check(beta: float, temperature: float, level: str) -> None:
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def _common_vocab(v_student: int, v_teacher: int, vocab_size: int | None) -> int:
    """The number of leading vocabulary columns both models are compared on (TRL #2215: padded heads differ)."""
    common = min(v_student, v_teacher)
    if vocab_size is None:
        return common
    if not 0 < vocab_size <= common:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {common}] (student width {v_student}, teacher width {v_teacher})"
        )
    return int(vocab_size)


def jsd_upper_bound(beta: float) -> float:
    """The maximum of the per-token generalized JSD: ``−β ln β − (1−β) ln(1−β)`` (ln 2 at β=½, 0 at the ends).

    Only for β in (0,1); the KL endpoints are unbounded.
    """
    return -sum(b * math.log(b) for b in (beta, 1.0 - beta) if b > 0)


# ----------------------------------------------------------------------------------------------------------
# Per-token math (plain functions; the tiling engine below calls them on tiles)
# ----------------------------------------------------------------------------------------------------------


def _plogratio(la: Tensor, lb: Tensor, ok: Tensor) -> Tensor:
    """``e^{la}·(la − lb)`` where ``ok``, else exactly 0 (0·log 0 = 0), with no NaN in values or gradients.

    Both inputs are replaced before any arithmetic, so a −inf at a dropped slot never meets a 0 in a product.
    """
    la = torch.where(ok, la, 0.0)
    lb = torch.where(ok, lb, 0.0)
    return torch.where(ok, la.exp() * (la - lb), 0.0)


def _jsd_parts(ls: Tensor, lt: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(q·log(q/M), p·log(p/M), log M)`` elementwise, for β in (0,1); ``M = βq + (1−β)p`` in log space."""
    support = (ls > _NEG_INF) | (lt > _NEG_INF)
    # slots where both are −inf (outside a sparse support) are replaced, so logaddexp sees no (−inf, −inf) pair
    ls, lt = torch.where(support, ls, 0.0), torch.where(support, lt, 0.0)
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    kl_t = _plogratio(lt, lm, support & (lt > _NEG_INF))
    kl_s = _plogratio(ls, lm, support & (ls > _NEG_INF))
    return kl_t, kl_s, lm


def divergence_terms(student_logps: Tensor, teacher_logps: Tensor, beta: float) -> Tensor:
    """Elementwise terms whose sum over the last (vocab) dim is the per-token divergence.

    ``β=0``: ``q(log q − log p)``; ``β=1``: ``p(log p − log q)``; else ``β·q log(q/M) + (1−β)·p log(p/M)``.
    Entries at −inf (probability 0) contribute exactly 0 where the formula gives 0·log 0, and get no NaN gradient.

    Args:
        student_logps, teacher_logps: ``[..., V]`` normalised log-probs (log-softmax of the tempered logits).
        beta: in [0, 1].

    Returns:
        ``[..., V]`` terms (differentiable w.r.t. both inputs).
    """
    ls, lt = student_logps, teacher_logps
    if beta == 0.0:
        return _plogratio(lt, ls, lt > _NEG_INF)
    if beta == 1.0:
        return _plogratio(ls, lt, ls > _NEG_INF)
    kl_t, kl_s, _ = _jsd_parts(ls, lt, beta)
    return beta * kl_t + (1.0 - beta) * kl_s


def token_divergence(student_logps: Tensor, teacher_logps: Tensor, beta: float) -> Tensor:
    """Per-token divergence ``[..., V] -> [...]``: :func:`divergence_terms` summed over the vocab."""
    return divergence_terms(student_logps, teacher_logps, beta).sum(-1)


def divergence_grad(student_logps: Tensor, teacher_logps: Tensor, beta: float, aux: Tensor | None = None) -> Tensor:
    """``∂D/∂z_v`` of the per-token divergence w.r.t. the student's tempered logits ``z = logits/τ``.

    With ``p, q`` the student / teacher distributions, ``M = βq + (1−β)p`` and the softmax Jacobian
    ``∂D/∂z_v = p_v(g_v − Σ_u p_u g_u)`` where ``g = ∂D/∂p``:

    * ``β=0`` (``D = Σ q log q − q log p``, ``g = −q/p``): ``p − q``;
    * ``β=1`` (``D = Σ p(log p − log q)``, ``g = log(p/q) + 1``): ``p(log p − log q − D)``;
    * β in (0,1): ``g_v = β q_v·(−(1−β)/M_v) + (1−β)(log(p_v/M_v) + 1 − (1−β)p_v/M_v) = (1−β) log(p_v/M_v)``
      (the ``M_v`` terms cancel), so ``∂D/∂z_v = (1−β) p_v (log(p_v/M_v) − KL(p‖M))``.

    Multiply by ``1/τ`` (and any logit scale) for the gradient w.r.t. raw logits. Entries with ``p_v = 0`` get 0.

    Args:
        student_logps, teacher_logps: ``[..., V]`` log-probs, or one vocab tile of them.
        aux: ``[...]`` the row statistic the formula needs, when only a tile is passed: ``D`` itself for β=1,
            ``KL(p‖M)`` for β in (0,1) (unused for β=0). ``None`` computes it over the last dim.
    """
    ls, lt = student_logps, teacher_logps
    alive = ls > _NEG_INF
    p = torch.where(alive, ls, _NEG_INF).exp()
    if beta == 0.0:
        return p - torch.where(lt > _NEG_INF, lt, _NEG_INF).exp()
    if beta == 1.0:
        if aux is None:
            aux = divergence_terms(ls, lt, 1.0).sum(-1)
        diff = torch.where(alive, ls, 0.0) - torch.where(alive, lt, 0.0)
        return torch.where(alive, p * (diff - aux[..., None]), 0.0)
    _, kl_s, lm = _jsd_parts(ls, lt, beta)
    if aux is None:
        aux = kl_s.sum(-1)
    diff = torch.where(alive, ls, 0.0) - torch.where(alive, lm, 0.0)
    return torch.where(alive, (1.0 - beta) * p * (diff - aux[..., None]), 0.0)


def _entropy(logps: Tensor) -> Tensor:
    """``−Σ p log p`` over the last dim (0·log 0 = 0)."""
    return -_plogratio(logps, torch.zeros_like(logps), logps > _NEG_INF).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------------------


def sequence_token_weights(mask: Tensor) -> Tensor:
    """Per-token weights ``m_t / max(Σ_t m_t, 1)`` over the last dim: ``Σ m·w·D`` is the sum of sequence means."""
    m = as_bool(mask).float()
    return m / m.sum(-1, keepdim=True).clamp(min=1.0)


def _reduce(
    per_token: Tensor,
    m: Tensor,
    level: str,
    token_weights: Tensor | None,
    normalizer: Normalizer,
) -> tuple[Tensor, Metrics]:
    """``Σ m·w·D / normalizer`` with w from ``level`` / ``token_weights``; returns the loss and the count metrics."""
    counts: Metrics = {"n_tokens": count_tokens(m).float()}
    if level == "sequence":
        if token_weights is not None:
            raise ValueError("pass either level='sequence' or token_weights, not both")
        if m.dim() < 2:
            raise ValueError(f"level='sequence' needs a [B,T] mask (or pass token_weights), got {tuple(m.shape)}")
        w = sequence_token_weights(m).to(per_token.dtype)
        local = count_sequences(m.reshape(-1, m.shape[-1]))
        counts["n_seqs"] = local.float()
        total = torch.where(m, per_token * w, 0.0).sum()
    elif token_weights is not None:
        w = torch.where(m, token_weights.to(per_token.dtype), 0.0)
        local = w.sum().clamp(min=1.0)
        total = torch.where(m, per_token * w, 0.0).sum()
    else:
        local = count_tokens(m)
        total = torch.where(m, per_token, 0.0).sum()
    return normalize(total, normalizer, local), counts


def _tempered(logits: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """``logits/τ`` in the compute dtype, with dropped rows replaced by 0 (NaN/inf padding never enters the math)."""
    x = torch.where(rows[..., None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    x = x.to(_compute_dtype(logits.dtype))
    return x if temperature == 1.0 else x / temperature


def _detached(metrics: Metrics) -> Metrics:
    return {k: v.detach() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# Full logits
# ----------------------------------------------------------------------------------------------------------


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: Normalizer,
    level: Level = "token",
    token_weights: Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Metrics]:
    """Generalized JSD(β) between student and teacher next-token distributions, from full logits.

    ``β=0`` is ``KL(p_T‖p_S)``, ``β=1`` is ``KL(p_S‖p_T)``, else ``β·KL(p_T‖M) + (1−β)·KL(p_S‖M)`` with
    ``M = β p_T + (1−β) p_S`` (TRL 1.16 ``GKDTrainer.generalized_jsd_loss``; ``normalizer="local"`` at token level
    is its ``reduction="batchmean"`` with labels, a number is its ``num_items_in_batch``). Math in fp32 (fp64 stays
    fp64); this path holds a few ``[B,T,V]`` fp32 tensors: use :func:`chunked_generalized_jsd_loss` for large V.

    Args:
        student_logits: ``[B,T,V_s]`` aligned logits (position t's next-token distribution), any float dtype.
        teacher_logits: ``[B,T,V_t]``; detached (no gradient ever reaches the teacher).
        mask: ``[B,T]`` bool or {0,1}: the distilled positions. Masked rows may hold NaN/inf.
        beta: in [0,1] (TRL convention: the teacher's weight in M; 0 = forward KL, 1 = reverse KL).
        temperature: τ > 0; both logits are divided by it (no τ² factor).
        normalizer: float, 0-dim tensor, or ``"local"`` (this call's token count, or row count at sequence level).
        level: ``"token"`` (unit: token) or ``"sequence"`` (each row's token mean; unit: sequence).
        token_weights: optional ``[B,T]`` per-token weights (``Σ m·w·D / normalizer``; ``"local"`` = ``Σ m·w``).
        vocab_size: compare the first ``vocab_size`` columns of both (default: the smaller width), for student
            and teacher heads padded to different sizes over the same tokenizer.

    Returns:
        ``(loss, metrics)``: 0-dim fp32 loss; detached metrics ``distill/divergence_mean`` (local token mean),
        ``distill/student_entropy``, ``distill/teacher_entropy`` (of the tempered distributions),
        ``distill/top1_agreement`` (arg-max match), ``n_tokens`` (and ``n_seqs`` at sequence level).
    """
    _check(beta, temperature, level)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.shape[:-1] != mask.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    V = _common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    m = as_bool(mask)
    ls = F.log_softmax(_tempered(student_logits[..., :V], m, temperature), dim=-1)
    lt = F.log_softmax(_tempered(teacher_logits.detach()[..., :V], m, temperature), dim=-1)
    d = torch.where(m, token_divergence(ls, lt, beta), 0.0)
    loss, counts = _reduce(d, m, level, token_weights, normalizer)
    with torch.no_grad():
        metrics = {
            "distill/divergence_mean": masked_mean(d, m),
            "distill/student_entropy": masked_mean(_entropy(ls), m),
            "distill/teacher_entropy": masked_mean(_entropy(lt), m),
            "distill/top1_agreement": masked_mean((ls.argmax(-1) == lt.argmax(-1)).float(), m),
            **counts,
        }
    return loss, _detached(metrics)


def forward_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    normalizer: Normalizer,
    level: Level = "token",
    token_weights: Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Metrics]:
    """``KL(p_T‖p_S)`` per token: :func:`generalized_jsd_loss` with ``beta=0``."""
    return generalized_jsd_loss(
        student_logits, teacher_logits, mask, beta=0.0, temperature=temperature, normalizer=normalizer,
        level=level, token_weights=token_weights, vocab_size=vocab_size,
    )  # fmt: skip


def reverse_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    normalizer: Normalizer,
    level: Level = "token",
    token_weights: Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Metrics]:
    """``KL(p_S‖p_T)`` per token: :func:`generalized_jsd_loss` with ``beta=1``."""
    return generalized_jsd_loss(
        student_logits, teacher_logits, mask, beta=1.0, temperature=temperature, normalizer=normalizer,
        level=level, token_weights=token_weights, vocab_size=vocab_size,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Sparse teacher (top-k log-probs, e.g. from a vLLM server)
# ----------------------------------------------------------------------------------------------------------


def _with_tail(logps: Tensor) -> Tensor:
    """Append the tail bucket ``log(1 − Σ_K p)`` (TRL ``_add_tail_bucket``: the log-sum clamped ≤ −1e-7)."""
    log_sum = torch.logsumexp(logps, dim=-1, keepdim=True).clamp(max=TAIL_LOG_SUM_MAX)
    return torch.cat([logps, torch.log(-torch.expm1(log_sum))], dim=-1)


def sparse_divergence_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logps: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    add_tail: bool = True,
    normalizer: Normalizer,
    level: Level = "token",
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """The divergence of :func:`generalized_jsd_loss` on the teacher's top-k support (TRL server distillation).

    The student's full log-softmax of ``logits/τ`` is gathered at the teacher's ids. ``add_tail`` (TRL default)
    appends the bucket ``log(1 − Σ_K p)`` (the log-sum clamped ≤ −1e-7) to both distributions, making K+1-way
    distributions; otherwise both are renormalised on the valid support. Then the same divergence with ``beta``.
    For β=0 this is TRL 1.16 ``ServerDistillationTrainer._compute_server_forward_kl_loss``; other β apply the same
    sparse divergence (TRL's ``_jsd_divergence`` with a support mask) to the top-k(+tail) distributions.

    Args:
        student_logits: ``[B,T,V]`` student logits (log-probs work too: log-softmax is idempotent at τ=1).
        teacher_topk_ids: ``[B,T,K]`` int64 teacher top-k token ids.
        teacher_topk_logps: ``[B,T,K]`` the teacher's log-probs of those ids, **already at temperature τ** (the
            server's ``temperature``; they are used as given). Slots with a −inf/NaN log-prob or an id outside
            ``[0,V)`` (e.g. −1 padding) are invalid and dropped; a row with no valid slot contributes 0.
        mask: ``[B,T]``; beta, temperature, normalizer, level, token_weights: as in :func:`generalized_jsd_loss`.

    Returns:
        ``(loss, metrics)``: ``distill/divergence_mean``, ``distill/teacher_topk_mass`` and
        ``distill/student_topk_mass`` (local token means of ``Σ_K`` probability), ``n_tokens`` (``n_seqs``).
    """
    _check(beta, temperature, level)
    if teacher_topk_ids.shape != teacher_topk_logps.shape or teacher_topk_ids.shape[:-1] != mask.shape:
        raise ValueError(
            f"shape mismatch: ids {tuple(teacher_topk_ids.shape)}, logps {tuple(teacher_topk_logps.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    if student_logits.shape[:-1] != mask.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} do not match mask {tuple(mask.shape)}")
    m = as_bool(mask)
    V = student_logits.shape[-1]
    cd = _compute_dtype(student_logits.dtype)
    lt_raw = teacher_topk_logps.detach().to(cd)
    valid = m[..., None] & (teacher_topk_ids >= 0) & (teacher_topk_ids < V) & (lt_raw > _NEG_INF)
    rows = valid.any(-1)
    z = _tempered(student_logits, rows, temperature)
    ls_k = z.gather(-1, torch.where(valid, teacher_topk_ids, 0)) - torch.logsumexp(z, dim=-1, keepdim=True)
    # Rows without any valid slot get a finite stand-in distribution (all slots selected, teacher 0), so that no
    # logsumexp over an all −inf row (NaN gradient) is ever formed; they are dropped below.
    dummy = ~rows[..., None]
    ls_k = torch.where(valid | dummy, ls_k, _NEG_INF)
    lt_k = torch.where(valid, lt_raw, torch.where(dummy, 0.0, _NEG_INF))
    if add_tail:
        ls_s, lt_s = _with_tail(ls_k), _with_tail(lt_k)
    else:
        ls_s = ls_k - torch.logsumexp(ls_k, dim=-1, keepdim=True)
        lt_s = lt_k - torch.logsumexp(lt_k, dim=-1, keepdim=True)
    d = torch.where(rows, token_divergence(ls_s, lt_s, beta), 0.0)
    loss, counts = _reduce(d, m, level, token_weights, normalizer)
    with torch.no_grad():
        metrics = {
            "distill/divergence_mean": masked_mean(d, m),
            "distill/teacher_topk_mass": masked_mean(torch.where(valid, lt_k, _NEG_INF).exp().sum(-1), m),
            "distill/student_topk_mass": masked_mean(torch.where(valid, ls_k, _NEG_INF).exp().sum(-1), m),
            **counts,
        }
    return loss, _detached(metrics)


# ----------------------------------------------------------------------------------------------------------
# Chunked engine: divergence from hidden states and heads, token x vocab tiles (Design A)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DistillCfg:
    beta: float
    s_factor: float  # student logit_scale / τ
    t_factor: float
    vocab: int
    token_chunk: int
    vocab_chunk: int


def _tile(h: Tensor, w: Tensor, b: Tensor | None, v0: int, cfg: _DistillCfg, factor: float) -> Tensor:
    """``factor·(h W[v0:v0+Vc]ᵀ + b)`` in the dtype of ``h``: ``[C,H] x [Vc,H] -> [C,Vc]``."""
    v1 = min(v0 + cfg.vocab_chunk, cfg.vocab)
    wt = w[v0:v1].to(h.dtype)
    z = h @ wt.T if b is None else torch.addmm(b[v0:v1].to(h.dtype), h, wt.T)
    return z if factor == 1.0 else z.mul_(factor)


class _OnlineLse:
    """Running max ``m``, ``Σ e^{z−m}``, ``Σ e^{z−m}·z`` and arg-max of rows seen tile by tile."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.max = torch.full((n,), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.sum = torch.zeros(n, dtype=dtype, device=device)
        self.xsum = torch.zeros(n, dtype=dtype, device=device)
        self.arg = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, z: Tensor, v0: int, others: Sequence[tuple[Tensor, Tensor]] = ()) -> None:
        """Fold tile ``z``; each ``(acc, x)`` in ``others`` accumulates ``Σ e^{z−m}·x`` with the same rescaling."""
        tmax, targ = z.max(1)
        self.arg = torch.where(tmax > self.max, targ + v0, self.arg)
        new = torch.maximum(self.max, tmax)
        alpha = (self.max - new).exp()
        e = (z - new[:, None]).exp()
        self.sum = self.sum * alpha + e.sum(1)
        self.xsum = self.xsum * alpha + torch.einsum("cv,cv->c", e, z)
        for acc, x in others:
            acc.mul_(alpha).add_(torch.einsum("cv,cv->c", e, x))
        self.max = new

    def lse(self) -> Tensor:
        return self.max + self.sum.log()


class _ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence from hidden states and heads; see :func:`chunked_token_divergence`."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, valid, cfg: _DistillCfg):  # noqa: ANN001, ANN205
        N = hs.shape[0]
        cd = _compute_dtype(torch.promote_types(hs.dtype, ws.dtype))
        dev = hs.device
        vec = lambda: torch.zeros(N, dtype=cd, device=dev)
        div, aux, lse_s, lse_t, ent_s, ent_t = (vec() for _ in range(6))
        top1 = torch.zeros(N, dtype=torch.bool, device=dev)
        # Dropped rows see a zero hidden state: their statistics stay finite even if the caller's row is NaN/inf.
        hs0, ht0 = torch.where(valid[:, None], hs, 0.0), torch.where(valid[:, None], ht, 0.0)
        starts = range(0, cfg.vocab, cfg.vocab_chunk)
        single = len(starts) == 1  # one vocab tile per token chunk: keep it for the second pass
        beta = cfg.beta
        for s in range(0, N, cfg.token_chunk):
            r = slice(s, s + cfg.token_chunk)
            h1, h2 = hs0[r].to(cd), ht0[r].to(cd)
            n = h1.shape[0]
            st, tt = _OnlineLse(n, cd, dev), _OnlineLse(n, cd, dev)
            gap_s, gap_t = torch.zeros(n, dtype=cd, device=dev), torch.zeros(n, dtype=cd, device=dev)
            kept = None
            for v0 in starts:
                zs, zt = _tile(h1, ws, bs, v0, cfg, cfg.s_factor), _tile(h2, wt, bt, v0, cfg, cfg.t_factor)
                gap = zt - zs
                # E_p[z_s − z_t] and E_q[z_t − z_s] give both KL endpoints in one pass (no second matmul).
                st.update(zs, v0, [(gap_s, gap.neg())] if beta == 1.0 else [])
                tt.update(zt, v0, [(gap_t, gap)] if beta == 0.0 else [])
                kept = (zs, zt) if single else None
                del gap
            ls0, lt0 = st.lse(), tt.lse()
            lse_s[r], lse_t[r] = ls0, lt0
            ent_s[r], ent_t[r] = ls0 - st.xsum / st.sum, lt0 - tt.xsum / tt.sum
            top1[r] = st.arg == tt.arg
            if beta == 0.0:
                div[r] = gap_t / tt.sum - lt0 + ls0
            elif beta == 1.0:
                div[r] = gap_s / st.sum - ls0 + lt0
                aux[r] = div[r]
            else:  # the mixture needs both normalisers: a second pass over the tiles
                d_acc, a_acc = torch.zeros(n, dtype=cd, device=dev), torch.zeros(n, dtype=cd, device=dev)
                for v0 in starts:
                    if kept is not None:
                        (zs, zt), kept = kept, None
                    else:
                        zs, zt = _tile(h1, ws, bs, v0, cfg, cfg.s_factor), _tile(h2, wt, bt, v0, cfg, cfg.t_factor)
                    kl_t, kl_s, _ = _jsd_parts(zs - ls0[:, None], zt - lt0[:, None], beta)
                    d_acc += (beta * kl_t + (1.0 - beta) * kl_s).sum(1)
                    a_acc += kl_s.sum(1)
                    del zs, zt, kl_t, kl_s
                div[r], aux[r] = d_acc, a_acc
            del kept
        ctx.cfg = cfg
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid, lse_s, lse_t, aux)
        ctx.mark_non_differentiable(ent_s, ent_t, top1)
        ctx.set_materialize_grads(False)
        zero = torch.zeros((), dtype=cd, device=dev)
        drop = lambda x: torch.where(valid, x, zero)
        return drop(div), drop(ent_s), drop(ent_t), top1 & valid

    @staticmethod
    def backward(ctx, g_div, _g_es, _g_et, _g_top1):  # noqa: ANN001, ANN205
        hs, ws, bs, ht, wt, bt, valid, lse_s, lse_t, aux = ctx.saved_tensors
        cfg: _DistillCfg = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_div is None or not (need_h or need_w or need_b):
            return (None,) * 8
        with torch.autocast(device_type=hs.device.type, enabled=False):
            cd = lse_s.dtype
            g = torch.where(valid, g_div.to(cd), 0.0) * cfg.s_factor  # dz/d(raw logits) = logit_scale/τ
            grad_h = torch.zeros(hs.shape, dtype=cd, device=hs.device) if need_h else None
            grad_w = torch.zeros(ws.shape, dtype=cd, device=ws.device) if need_w else None  # rows ≥ vocab stay 0
            grad_b = torch.zeros(bs.shape, dtype=cd, device=bs.device) if need_b else None
            hs0, ht0 = torch.where(valid[:, None], hs, 0.0), torch.where(valid[:, None], ht, 0.0)
            for s in range(0, hs.shape[0], cfg.token_chunk):
                r = slice(s, s + cfg.token_chunk)
                h1, h2 = hs0[r].to(cd), ht0[r].to(cd)
                for v0 in range(0, cfg.vocab, cfg.vocab_chunk):
                    v1 = min(v0 + cfg.vocab_chunk, cfg.vocab)
                    ls = _tile(h1, ws, bs, v0, cfg, cfg.s_factor).sub_(lse_s[r, None])
                    lt = _tile(h2, wt, bt, v0, cfg, cfg.t_factor).sub_(lse_t[r, None])
                    G = divergence_grad(ls, lt, cfg.beta, aux[r]).mul_(g[r, None])
                    del ls, lt
                    if grad_h is not None:
                        grad_h[r].addmm_(G, ws[v0:v1].to(cd))
                    if grad_w is not None:
                        grad_w[v0:v1].addmm_(G.T, h1)
                    if grad_b is not None:
                        grad_b[v0:v1] += G.sum(0)
                    del G
        cast = lambda x, like: None if x is None else x.to(like.dtype)
        return cast(grad_h, hs), cast(grad_w, ws), cast(grad_b, bs), None, None, None, None, None


def chunked_token_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    vocab_size: int | None = None,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = None,
) -> dict[str, Tensor]:
    """Per-token divergence (and entropies, top-1 agreement) from hidden states and LM heads, never building ``[N,V]``.

    Logits are ``z = logit_scale·(h Wᵀ + b)/τ`` for each model, over the first ``vocab_size`` rows of both heads.
    Design A, vocab-tiled (as ``alignkit.logprobs.chunked_token_logps``): for each chunk of ``token_chunk`` tokens,
    an online logsumexp over ``vocab_chunk`` tiles gives both log-normalisers, the arg-maxes, the entropies and, for
    β∈{0,1}, the divergence itself (``E_q[z_T−z_S] − lse_T + lse_S`` and its mirror); β in (0,1) takes a second pass
    over the tiles (skipped when one tile covers the vocabulary). Only the inputs and O(N) statistics are saved;
    backward recomputes each tile and applies :func:`divergence_grad` (exact, no autograd inside), accumulating
    ``grad_h += G·W`` and ``grad_W += Gᵀh`` in fp32. Transient memory is a few ``token_chunk·vocab_chunk`` tiles.

    Args:
        student_hidden: ``[..., H_s]`` final hidden states (after the final norm), aligned to the distilled tokens.
        student_weight: ``[V_s, H_s]`` LM-head weight; ``student_bias``: optional ``[V_s]``. These get gradients.
        teacher_hidden: ``[..., H_t]`` (same leading shape); ``teacher_weight``: ``[V_t, H_t]``; ``teacher_bias``:
            optional ``[V_t]``. Detached: the teacher never gets a gradient. H_t may differ from H_s.
        mask: ``[...]`` bool/{0,1} (default all): dropped rows read 0 (entropies too) and get exactly 0 gradient,
            even when their hidden rows hold NaN/inf.
        vocab_size: compared vocabulary (default ``min(V_s, V_t)``); rows of W_s past it get zero gradient.
        token_chunk, vocab_chunk: tile sizes (``vocab_chunk=None``: the whole vocabulary per tile).

    Returns:
        ``{"divergence": [...], "student_entropy": [...], "teacher_entropy": [...], "top1_agreement": [...] bool}``;
        only ``divergence`` is differentiable (w.r.t. student hidden, weight, bias). fp32 (fp64 for fp64 inputs).
    """
    _check(beta, temperature, "token")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead or (mask is not None and mask.shape != lead):
        raise ValueError(
            f"shape mismatch: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
            f"{tuple(teacher_hidden.shape)}, mask {None if mask is None else tuple(mask.shape)}"
        )
    if student_weight.shape[1] != student_hidden.shape[-1] or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError("each LM-head weight must be [V, H] with H the width of that model's hidden states")
    if token_chunk < 1 or (vocab_chunk is not None and vocab_chunk < 1):
        raise ValueError("token_chunk and vocab_chunk must be positive")
    V = _common_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size)
    cfg = _DistillCfg(
        beta=float(beta),
        s_factor=float(student_logit_scale) / float(temperature),
        t_factor=float(teacher_logit_scale) / float(temperature),
        vocab=V,
        token_chunk=int(token_chunk),
        vocab_chunk=V if vocab_chunk is None else min(int(vocab_chunk), V),
    )
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    valid = torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device) if mask is None else as_bool(mask).reshape(-1)
    tb = None if teacher_bias is None else teacher_bias.detach()
    # The engine picks its own (≥ fp32) dtype; a surrounding bf16 autocast must not round its tiles.
    with torch.autocast(device_type=hs.device.type, enabled=False):
        div, ent_s, ent_t, top1 = _ChunkedDivergence.apply(
            hs, student_weight, student_bias, ht, teacher_weight.detach(), tb, valid, cfg
        )
    out = {"divergence": div, "student_entropy": ent_s, "teacher_entropy": ent_t, "top1_agreement": top1}
    return {k: v.view(lead) for k, v in out.items()}


def chunked_generalized_jsd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: Normalizer,
    level: Level = "token",
    token_weights: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    vocab_size: int | None = None,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = None,
) -> tuple[Tensor, Metrics]:
    """:func:`generalized_jsd_loss` computed from hidden states and heads by :func:`chunked_token_divergence`.

    Same value and gradients as the full-logits loss on ``logits = h Wᵀ + b`` (TRL 1.16
    ``trainer.distillation_trainer._chunked_divergence_loss``: ``normalizer=num_items_in_batch``, or ``"local"``).

    Args:
        student_hidden, teacher_hidden: ``[B,T,H]`` (or ``[N,H]`` at token level); mask: the matching ``[B,T]``.
        level: ``"sequence"`` needs ``[B,T]`` leading dims; ``token_weights`` ``[B,T]``/``[N]`` any weighting.
        The other arguments are those of :func:`chunked_token_divergence` and :func:`generalized_jsd_loss`.

    Returns:
        ``(loss, metrics)`` with the metrics of :func:`generalized_jsd_loss`.
    """
    _check(beta, temperature, level)
    out = chunked_token_divergence(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, beta=beta, temperature=temperature,
        student_bias=student_bias, teacher_bias=teacher_bias, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale, vocab_size=vocab_size, token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
    )  # fmt: skip
    m = as_bool(mask)
    d = out["divergence"]
    loss, counts = _reduce(d, m, level, token_weights, normalizer)
    with torch.no_grad():
        metrics = {
            "distill/divergence_mean": masked_mean(d, m),
            "distill/student_entropy": masked_mean(out["student_entropy"], m),
            "distill/teacher_entropy": masked_mean(out["teacher_entropy"], m),
            "distill/top1_agreement": masked_mean(out["top1_agreement"].float(), m),
            **counts,
        }
    return loss, _detached(metrics)
