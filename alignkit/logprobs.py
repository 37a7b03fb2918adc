"""The per-token log-prob kernel (docs/LOSSES.md §2): aligned ``ℓ[B,T]`` (slot t = log p(y_t | y_<t)).

* :func:`token_logps` from full logits you already have;
* :func:`chunked_token_logps` from final hidden states and the LM-head weight, never building ``[N,V]``
  (Design A: an autograd Function that recomputes logit tiles in backward).

Running a model over batches (padded, packed, shared-prompt) is :mod:`alignkit.scoring`; masked reductions are
:mod:`alignkit.ops`. Nothing here calls ``.item()`` or synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100
EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logp", "is_top1")
# Rows of full logits upcast to fp32 at a time in token_logps: 1024 x 152k vocab is ~0.6 GB transient.
_ROW_CHUNK = 1024
# Tokens per tile in the chunked head. On CPU, 1024 x 32k fp32 tiles (128 MB) keep the matmuls efficient
# while staying far below full logits; lower it (or set vocab_chunk) for very large vocabularies.
DEFAULT_TOKEN_CHUNK = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least (bf16-rounded logit tiles bias training); fp64 stays fp64 so gradcheck works.
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Full-logits path
# ----------------------------------------------------------------------------------------------------------


class _RowLogps(torch.autograd.Function):
    """``ℓ_r = z_r[y_r] − lse(z_r)`` for rows of ``logits[R,V]`` with ``z = logits/τ``, row-chunked in fp32.

    Saves only ``logits`` (no copy), targets and the per-row max and log-sum (kept apart so ``z − lse`` loses
    no precision at large logits); backward recomputes the softmax per row chunk, so no full fp32 copy of the
    logits ever exists. Rows with ``valid=False`` give 0 and receive exactly 0 gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, valid: Tensor, temperature: float) -> Tensor:
        cdtype = _compute_dtype(logits.dtype)
        rows = logits.shape[0]
        new = lambda: torch.zeros(rows, dtype=cdtype, device=logits.device)
        out, row_max, log_s = new(), new(), new()
        safe_t = torch.where(valid, targets, 0)
        for s in range(0, rows, _ROW_CHUNK):
            sl = slice(s, s + _ROW_CHUNK)
            z = logits[sl].to(cdtype) / temperature
            row_max[sl] = z.amax(-1)
            zy = z.gather(1, safe_t[sl, None]).squeeze(1) - row_max[sl]
            log_s[sl] = z.sub_(row_max[sl, None]).exp_().sum(-1).log()
            out[sl] = zy - log_s[sl]
            del z
        ctx.save_for_backward(logits, safe_t, valid, row_max, log_s)
        ctx.temperature = temperature
        return torch.where(valid, out, 0.0)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, safe_t, valid, row_max, log_s = ctx.saved_tensors
        g = torch.where(valid, grad_out.to(log_s.dtype), 0.0)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], _ROW_CHUNK):
            sl = slice(s, s + _ROW_CHUNK)
            z = logits[sl].to(log_s.dtype) / ctx.temperature
            G = z.sub_(row_max[sl, None]).sub_(log_s[sl, None]).exp_().mul_(-g[sl, None])  # −g·p
            G.scatter_add_(1, safe_t[sl, None], g[sl, None])  # +g·onehot
            G.masked_fill_(~valid[sl, None], 0.0)  # NaN/inf rows of ignored slots stay out
            grad[sl] = G.div_(ctx.temperature)
            del z, G
        return grad, None, None, None


def token_logps(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Aligned per-token log-probs from full logits.

    Args:
        logits: ``[B,T,V]`` (any float dtype), position t predicting token t+1.
        labels: ``[B,T]`` token ids, ``ignore_index`` where not scored.
        temperature: τ; must equal the sampling temperature for rollout ratios to be unbiased.

    Returns:
        ``(ℓ, m)``, both ``[B,T]``: ``ℓ[:,t] = log softmax(logits[:,t−1]/τ)[labels[:,t]]`` in fp32, and the bool
        mask ``m`` (False at t=0 and at ignored labels, where ℓ is exactly 0 and gets no gradient).
    """
    B, T, V = logits.shape
    # Row (b,t) of the flat logits predicts labels[b,t+1]; the last row of each sequence predicts nothing.
    nxt = torch.cat([labels[:, 1:], labels.new_full((B, 1), ignore_index)], dim=1).reshape(-1)
    valid = nxt != ignore_index
    rows = _RowLogps.apply(logits.reshape(B * T, V), nxt, valid, float(temperature)).view(B, T)
    logps = torch.cat([rows.new_zeros(B, 1), rows[:, :-1]], dim=1)
    mask = torch.cat([valid.new_zeros(B, 1), valid.view(B, T)[:, :-1]], dim=1)
    return logps, mask


def entropy_from_logits(z: Tensor) -> Tensor:
    """Entropy of ``softmax(z)`` over the last dim, in fp32: ``H = lse(z) − Σ_v p_v z_v``.

    Autograd gives ``∂H/∂z_v = −p_v(z_v − E_p z)``. Vocab entries at −inf (p=0) are handled without NaN.
    Shapes: ``z[..., V] -> H[...]``.
    """
    z = z.to(_compute_dtype(z.dtype))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    pz = p * torch.where(p > 0, z, 0.0)
    return lse.squeeze(-1) - pz.sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Chunked LM head (Design A)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeadCfg:
    temperature: float
    logit_scale: float
    softcap: float | None
    token_chunk: int
    vocab_chunk: int
    entropy: bool
    sq: bool
    mean: bool
    keep_logits: bool  # keep every tile's logits from forward for backward instead of recomputing them


def _tile_logits(h: Tensor, w: Tensor, b: Tensor | None, cfg: _HeadCfg) -> Tensor:
    """``z = softcap(scale·(h Wᵀ + b)) / τ`` for one tile, in the compute dtype: ``[C,H] x [Vt,H] -> [C,Vt]``."""
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    if cfg.softcap is None:
        factor = cfg.logit_scale / cfg.temperature
        return z if factor == 1.0 else z.mul_(factor)
    if cfg.logit_scale != 1.0:
        z.mul_(cfg.logit_scale)
    return z.div_(cfg.softcap).tanh_().mul_(cfg.softcap / cfg.temperature)


def _tile_grad(
    z: Tensor,
    idx: Tensor,
    hit: Tensor,
    stats: dict[str, Tensor],
    grads: dict[str, Tensor],
    cfg: _HeadCfg,
    vocab: int,
) -> Tensor:
    """d(Σ_k g_k·out_k)/d(raw logits) for one tile; ``z`` is the tile's transformed logits (consumed).

    With p = softmax(z), q = softmax(2z):
    ``∂ℓ/∂z = onehot − p``, ``∂H/∂z = −p(z − E_p z)``, ``∂mean_logp/∂z = 1/V − p``, ``∂lsq/∂z = 2q − 2p``.
    Everything is computed from ``d = z − max`` so that large logits lose no precision (p = e^{d − log s}).
    """
    gl, gh, gm, gs = (grads.get(k) for k in ("logps", "entropy", "mean_logp", "log_sum_sq_probs"))
    coef = torch.zeros_like(stats["log_s"])
    for g, w in ((gl, 1.0), (gm, 1.0), (gs, 2.0)):
        if g is not None:
            coef = coef - w * g
    # Chain rule back to raw logits: z = c·tanh(s·raw/c)/τ  =>  dz/draw = s(1 − (τz/c)²)/τ.
    dz: Tensor | float = cfg.logit_scale / cfg.temperature
    if cfg.softcap is not None:
        dz = (z * (cfg.temperature / cfg.softcap)).square_().neg_().add_(1.0).mul_(dz)
    d = z.sub_(stats["max"][:, None])
    keep_d = gh is not None or gs is not None
    G = (d - stats["log_s"][:, None] if keep_d else d.sub_(stats["log_s"][:, None])).exp_()  # p
    if gh is not None:  # d − (E_p z − max) = z − E_p z
        G.mul_((d - stats["ez_rel"][:, None]).mul_(-gh[:, None]).add_(coef[:, None]))
    else:
        G.mul_(coef[:, None])
    if gs is not None:  # q = e^{2d − log Σ e^{2d}}
        G.add_((2 * d - stats["log_s2"][:, None]).exp_().mul_(2 * gs[:, None]))
    if gm is not None:
        G.add_(gm[:, None] / vocab)
    if gl is not None:
        G.scatter_add_(1, idx[:, None], torch.where(hit, gl, 0.0)[:, None])
    return G.mul_(dz)


class _ChunkedHeadLogps(torch.autograd.Function):
    """Online-logsumexp LM head over token x vocab tiles; see :func:`chunked_token_logps`."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cfg: _HeadCfg):
        N, V = hidden.shape[0], weight.shape[0]
        cd = _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        dev = hidden.device
        valid = (targets >= 0) & (targets < V)
        full = lambda v: torch.full((N,), v, dtype=cd, device=dev)
        # Running statistics relative to the running max m (finite start: no inf − inf before the first tile).
        run_max, run_sum, zy = full(torch.finfo(cd).min), full(0.0), full(0.0)  # m, Σ e^{z−m}, z_target
        run_pz = full(0.0) if cfg.entropy else None  # Σ e^{z−m}·(z−m)
        run_sq = full(0.0) if cfg.sq else None  # Σ e^{2(z−m)}
        run_z = full(0.0) if cfg.mean else None  # Σ z
        # Ignored rows see a zero hidden state: their statistics stay finite even if the caller's hidden row is
        # NaN/inf, so in backward their (zeroed) output grads give exactly 0, with no full-tile masking needed.
        h_all = torch.where(valid[:, None], hidden, 0.0)
        kept: list[Tensor] | None = [] if cfg.keep_logits else None
        # Vocab-outer loop: each weight tile is upcast once; running stats are O(N) vectors.
        for v0 in range(0, V, cfg.vocab_chunk):
            w = weight[v0 : v0 + cfg.vocab_chunk].to(cd)
            b = None if bias is None else bias[v0 : v0 + cfg.vocab_chunk].to(cd)
            for s in range(0, N, cfg.token_chunk):
                r = slice(s, s + cfg.token_chunk)
                z = _tile_logits(h_all[r].to(cd), w, b, cfg)
                if kept is not None:
                    kept.append(z.clone())  # z is consumed in place below
                idx = targets[r] - v0
                hit = (idx >= 0) & (idx < w.shape[0])
                zy[r] = torch.where(hit, z.gather(1, idx.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1), zy[r])
                if run_z is not None:
                    run_z[r] += z.sum(1)
                new_max = torch.maximum(run_max[r], z.amax(1))
                shift = run_max[r] - new_max
                alpha = shift.exp()
                d = z.sub_(new_max[:, None])  # z − m_new, in place
                e = d.exp() if run_pz is not None else d.exp_()  # entropy needs d alongside e
                if run_pz is not None:  # Σ e^{z−m'}(z−m') = α(Σ e^{z−m}(z−m) + (m−m')Σ e^{z−m}) + tile
                    run_pz[r] = alpha * (run_pz[r] + shift * run_sum[r]) + torch.einsum("cv,cv->c", e, d)
                if run_sq is not None:
                    run_sq[r] = run_sq[r] * alpha.square() + torch.einsum("cv,cv->c", e, e)
                run_sum[r] = run_sum[r] * alpha + e.sum(1)
                run_max[r] = new_max
                del z, d, e  # free this tile before the next one is allocated
        log_s = run_sum.log()  # lse = m + log_s, kept apart so that z − lse loses no precision
        stats = {"max": run_max, "log_s": log_s}
        outs = {"logps": (zy - run_max) - log_s, "is_top1": valid & (zy >= run_max)}
        if run_pz is not None:
            stats["ez_rel"] = run_pz / run_sum  # E_p z − m
            outs["entropy"] = log_s - stats["ez_rel"]
        if run_sq is not None:
            stats["log_s2"] = run_sq.log()
            outs["log_sum_sq_probs"] = stats["log_s2"] - 2 * log_s
        if run_z is not None:
            outs["mean_logp"] = (run_z / V - run_max) - log_s
        for k in list(outs):  # ignored rows read exactly 0
            if k != "is_top1":
                outs[k] = torch.where(valid, outs[k], 0.0)
        ctx.cfg, ctx.stat_keys, ctx.kept = cfg, tuple(stats), kept
        ctx.save_for_backward(hidden, weight, bias, targets, valid, *stats.values())
        ctx.mark_non_differentiable(outs["is_top1"])
        ctx.set_materialize_grads(False)
        # Unrequested extras come back as distinct empty tensors (autograd wants one tensor per output).
        return tuple(outs[k] if k in outs else hidden.new_empty(0, dtype=cd) for k in ("logps", *EXTRAS))

    @staticmethod
    def backward(ctx, g_logps, g_entropy, g_sq, g_mean, _g_top1):
        # fp32 tiles even when backward is called inside a bf16 autocast region (the kernel picks its own dtype)
        with torch.autocast(device_type=ctx.saved_tensors[0].device.type, enabled=False):
            return _ChunkedHeadLogps._backward(ctx, g_logps, g_entropy, g_sq, g_mean)

    @staticmethod
    def _backward(ctx, g_logps, g_entropy, g_sq, g_mean):  # noqa: ANN001, ANN205
        hidden, weight, bias, targets, valid, *stat_vals = ctx.saved_tensors
        cfg: _HeadCfg = ctx.cfg
        stats = dict(zip(ctx.stat_keys, stat_vals))
        N, V = hidden.shape[0], weight.shape[0]
        cd = stats["log_s"].dtype
        named = {"logps": g_logps, "entropy": g_entropy, "log_sum_sq_probs": g_sq, "mean_logp": g_mean}
        grads = {k: torch.where(valid, g.to(cd), 0.0) for k, g in named.items() if g is not None}
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(N, hidden.shape[1], dtype=cd, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        # Same zeroed rows as in forward (recomputed rather than saved: hidden is alive anyway).
        h_all = torch.where(valid[:, None], hidden, 0.0)
        kept, ctx.kept = ctx.kept, None  # used once: a second backward (retain_graph) recomputes the tiles
        tile = 0
        for v0 in range(0, V, cfg.vocab_chunk):
            w = weight[v0 : v0 + cfg.vocab_chunk].to(cd)
            b = None if bias is None else bias[v0 : v0 + cfg.vocab_chunk].to(cd)
            gw = None
            if need_w:  # accumulate straight into grad_w when it already has the compute dtype
                gw = grad_w[v0 : v0 + cfg.vocab_chunk] if grad_w.dtype == cd else torch.zeros_like(w)
                gw.zero_()
            gb = torch.zeros(w.shape[0], dtype=cd, device=w.device) if need_b else None
            for s in range(0, N, cfg.token_chunk):
                r = slice(s, s + cfg.token_chunk)
                h = h_all[r].to(cd)
                if kept is not None:
                    z, kept[tile] = kept[tile], None  # freed as it is consumed
                else:
                    z = _tile_logits(h, w, b, cfg)
                tile += 1
                idx = targets[r] - v0
                hit = (idx >= 0) & (idx < w.shape[0])
                G = _tile_grad(
                    z,
                    idx.clamp(0, w.shape[0] - 1),
                    hit,
                    {k: v[r] for k, v in stats.items()},
                    {k: v[r] for k, v in grads.items()},
                    cfg,
                    V,
                )
                if grad_h is not None:
                    grad_h[r].addmm_(G, w)
                if gw is not None:
                    gw.addmm_(G.T, h)
                if gb is not None:
                    gb += G.sum(0)
                del z, G  # free this tile before the next one is allocated
            if grad_w is not None and grad_w.dtype != cd:
                grad_w[v0 : v0 + cfg.vocab_chunk] = gw
            if grad_b is not None:
                grad_b[v0 : v0 + cfg.vocab_chunk] = gb
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None


def chunked_token_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = None,
    extras: tuple[str, ...] | list[str] = (),
    keep_logits_mb: float = 0.0,
) -> dict[str, Tensor]:
    """Log-probs of ``targets`` under the LM head, without materialising ``[N,V]`` logits.

    Logits are ``z = softcap(logit_scale·(hidden·Wᵀ + bias))/τ`` with ``softcap(x) = c·tanh(x/c)``.
    Forward keeps an online logsumexp over ``token_chunk x vocab_chunk`` tiles in (at least) fp32 and saves
    only ``hidden, weight, bias, targets`` and O(N) statistics; backward recomputes each tile (≈ +33% head
    FLOPs). Transient memory is a few ``token_chunk·vocab_chunk`` fp32 tiles (plus one fp32 copy of a weight
    tile when the weight is half precision, and an fp32 ``[N,H]`` accumulator for ``grad_hidden``).

    ``weight`` is an ordinary tensor: pass a tied embedding matrix and autograd accumulates both uses.

    Args:
        hidden: ``[N,H]`` final hidden states (after the final norm) of the positions to score.
        weight: ``[V,H]`` LM-head weight; ``bias``: optional ``[V]``.
        targets: ``[N]`` int64 token ids. Rows whose target is outside ``[0,V)`` (e.g. −100) are ignored: all
            their outputs are 0 and they get exactly zero gradient.
        extras: any of ``"entropy"`` (``lse z − E_p z``), ``"log_sum_sq_probs"`` (``lse 2z − 2 lse z``, WPO),
            ``"mean_logp"`` (``mean_v z − lse z``, label smoothing), ``"is_top1"`` (bool: the target attains the
            maximum logit). All float outputs are differentiable w.r.t. hidden, weight and bias.
        keep_logits_mb: when all ``N x V`` compute-dtype logits fit in this many MiB, forward keeps its tiles
            for backward instead of recomputing them (one head matmul of four saved, ~20% of the head's time);
            0 (default) always recomputes. The tiles are freed as backward consumes them.

    Returns:
        ``{"logps": [N], **{extra: [N]}}`` in fp32 (fp64 if the inputs are fp64).
    """
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)}; choose from {EXTRAS}")
    if temperature <= 0 or token_chunk < 1 or (vocab_chunk is not None and vocab_chunk < 1):
        raise ValueError("temperature, token_chunk and vocab_chunk must be positive")
    V = weight.shape[0]
    cfg = _HeadCfg(
        temperature=float(temperature),
        logit_scale=float(logit_scale),
        softcap=None if softcap is None else float(softcap),
        token_chunk=int(token_chunk),
        vocab_chunk=V if vocab_chunk is None else min(int(vocab_chunk), V),
        entropy="entropy" in extras,
        sq="log_sum_sq_probs" in extras,
        mean="mean_logp" in extras,
        keep_logits=torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad)
        and hidden.shape[0] * V * _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype)).itemsize
        <= keep_logits_mb * 2**20,
    )
    # The kernel computes in (at least) fp32 by itself; a surrounding bf16 autocast (precision=bf16-mixed) must not
    # round its logit tiles (docs/LOSSES.md: log-prob math in fp32).
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        outs = _ChunkedHeadLogps.apply(hidden, weight, bias, targets, cfg)
    named = dict(zip(("logps", *EXTRAS), outs))
    return {k: named[k] for k in ("logps", *extras)}
