"""Distillation losses (docs/LOSSES.md §8; properties §9 items 22, 24, 28, 30, 32).

References here are written independently of ``alignkit.losses.distill``: divergences in probability space
(``M = βq + (1−β)p`` as a probability, then ``log``), full logits from ``h Wᵀ + b`` in fp64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.losses import (
    chunked_generalized_jsd_loss,
    forward_kl_loss,
    generalized_jsd_loss,
    reverse_kl_loss,
    sparse_divergence_loss,
)
from alignkit.losses.distill import (
    chunked_token_divergence,
    divergence_grad,
    jsd_upper_bound,
    sequence_token_weights,
    token_divergence,
)
from tests.conftest import close

ATOL, RTOL = 1e-5, 1e-4
PROP = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**31 - 1)
betas = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.01, 0.99))
inner_betas = st.floats(0.01, 0.99)
taus = st.one_of(st.just(1.0), st.floats(0.3, 3.0))
levels = st.sampled_from(["token", "sequence"])


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------------------------


def div_from_probs(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token divergence from probabilities (student p, teacher q), summed over the last dim; 0·log 0 = 0."""

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    if beta == 0.0:
        return kl(q, p)
    if beta == 1.0:
        return kl(p, q)
    mix = beta * q + (1 - beta) * p
    return beta * kl(q, mix) + (1 - beta) * kl(p, mix)


def naive_div(zs: torch.Tensor, zt: torch.Tensor, beta: float, tau: float = 1.0) -> torch.Tensor:
    return div_from_probs(torch.softmax(zs / tau, -1), torch.softmax(zt / tau, -1), beta)


def naive_loss(zs, zt, m, beta, tau, D, level="token"):
    d = torch.where(m, naive_div(zs, zt, beta, tau), 0.0)
    if level == "token":
        return d.sum() / D
    n = m.sum(-1).clamp(min=1)
    return (d.sum(-1) / n).sum() / D


def logits_batch(seed: int, B: int, T: int, V: int, *, scale: float = 2.0, p_mask: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    m = torch.rand(B, T, generator=g) > p_mask
    m[0, 0] = True
    return zs, zt, m


@st.composite
def shapes(draw, max_b=4, max_t=5, min_v=2, max_v=12):
    return draw(st.integers(1, max_b)), draw(st.integers(1, max_t)), draw(st.integers(min_v, max_v))


def grad_wrt(loss, x):
    return torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)[0]


# ---------------------------------------------------------------------------------------------------------------
# full logits: values (§9.30)
# ---------------------------------------------------------------------------------------------------------------


@PROP
@given(seed=seeds, shape=shapes(), tau=taus, D=st.floats(0.5, 20.0), level=levels)
def test_endpoints_are_forward_and_reverse_kl(seed, shape, tau, D, level):
    zs, zt, m = logits_batch(seed, *shape)
    for beta, alias in ((0.0, forward_kl_loss), (1.0, reverse_kl_loss)):
        x = zs.clone().requires_grad_()
        loss, _ = generalized_jsd_loss(x, zt, m, beta=beta, temperature=tau, normalizer=D, level=level)
        y = zs.clone().requires_grad_()
        ref = naive_loss(y, zt, m, beta, tau, D, level)
        close(loss, ref)
        close(grad_wrt(loss, x), grad_wrt(ref, y))
        a, _ = alias(zs, zt, m, temperature=tau, normalizer=D, level=level)
        close(a, loss, atol=0, rtol=0)
    # explicitly: forward KL is KL(teacher || student), reverse is KL(student || teacher)
    p, q = torch.softmax(zs / tau, -1), torch.softmax(zt / tau, -1)
    fwd = (q * (q.log() - p.log())).sum(-1)
    close(generalized_jsd_loss(zs, zt, m, beta=0.0, temperature=tau, normalizer=1.0)[0], fwd[m].sum())
    rev = (p * (p.log() - q.log())).sum(-1)
    close(generalized_jsd_loss(zs, zt, m, beta=1.0, temperature=tau, normalizer=1.0)[0], rev[m].sum())


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, tau=taus, level=levels)
def test_matches_naive_mixture_values_and_grads(seed, shape, beta, tau, level):
    zs, zt, m = logits_batch(seed, *shape)
    x, y = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    loss, metrics = generalized_jsd_loss(x, zt, m, beta=beta, temperature=tau, normalizer=3.0, level=level)
    ref = naive_loss(y, zt, m, beta, tau, 3.0, level)
    close(loss, ref)
    close(grad_wrt(loss, x), grad_wrt(ref, y))
    close(metrics["distill/divergence_mean"], naive_div(zs, zt, beta, tau)[m].mean())
    p, q = torch.softmax(zs / tau, -1), torch.softmax(zt / tau, -1)
    close(metrics["distill/student_entropy"], -(p * p.log()).sum(-1)[m].mean())
    close(metrics["distill/teacher_entropy"], -(q * q.log()).sum(-1)[m].mean())
    close(metrics["distill/top1_agreement"], (zs.argmax(-1) == zt.argmax(-1))[m].double().mean())


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, tau=taus)
def test_swap_symmetry(seed, shape, beta, tau):
    """JSD_β(S,T) = JSD_{1−β}(T,S); at β=½ the loss is symmetric in (student, teacher)."""
    zs, zt, m = logits_batch(seed, *shape)
    a, _ = generalized_jsd_loss(zs, zt, m, beta=beta, temperature=tau, normalizer=1.0)
    b, _ = generalized_jsd_loss(zt, zs, m, beta=1.0 - beta, temperature=tau, normalizer=1.0)
    close(a, b)
    h1, _ = generalized_jsd_loss(zs, zt, m, beta=0.5, temperature=tau, normalizer=1.0)
    h2, _ = generalized_jsd_loss(zt, zs, m, beta=0.5, temperature=tau, normalizer=1.0)
    close(h1, h2)


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, scale=st.floats(0.1, 8.0))
def test_bounds_per_token(seed, shape, beta, scale):
    """``0 ≤ JSD_β ≤ −β ln β − (1−β) ln(1−β)`` (ln 2 at ½); the KL endpoints are ≥ 0."""
    zs, zt, _ = logits_batch(seed, *shape, scale=scale)
    d = token_divergence(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), beta)
    assert (d >= -1e-12).all()
    if 0 < beta < 1:
        assert (d <= jsd_upper_bound(beta) + 1e-12).all()
    assert jsd_upper_bound(0.5) == pytest.approx(math.log(2))
    # disjoint supports attain the bound
    big = torch.tensor([[0.0, -1e4], [-1e4, 0.0]], dtype=torch.float64)
    if 0 < beta < 1:
        dd = token_divergence(torch.log_softmax(big[0], -1), torch.log_softmax(big[1], -1), beta)
        close(dd, jsd_upper_bound(beta))


@PROP
@given(seed=seeds, shape=shapes(), beta=st.one_of(st.sampled_from([0.0, 1.0]), inner_betas), tau=taus)
def test_zero_iff_equal_distributions(seed, shape, beta, tau):
    zs, zt, m = logits_batch(seed, *shape)
    shift = torch.randn(zs.shape[:-1] + (1,), dtype=zs.dtype) * 5  # same distribution, shifted logits
    x = zs.clone().requires_grad_()
    loss, _ = generalized_jsd_loss(x, zs + shift, m, beta=beta, temperature=tau, normalizer=1.0)
    close(loss, 0.0, atol=1e-12, rtol=0)
    close(grad_wrt(loss, x), torch.zeros_like(zs), atol=1e-12, rtol=0)
    # different distributions give a strictly positive divergence
    d = token_divergence(torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1), beta)
    tv = 0.5 * (torch.softmax(zs / tau, -1) - torch.softmax(zt / tau, -1)).abs().sum(-1)
    assert (d[tv > 1e-2] > 0).all()


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, tau=st.floats(0.3, 3.0))
def test_temperature_divides_both_logits(seed, shape, beta, tau):
    zs, zt, m = logits_batch(seed, *shape)
    a, _ = generalized_jsd_loss(zs, zt, m, beta=beta, temperature=tau, normalizer=2.0)
    b, _ = generalized_jsd_loss(zs / tau, zt / tau, m, beta=beta, temperature=1.0, normalizer=2.0)
    close(a, b)  # no τ² factor
    # the gradient w.r.t. raw logits carries 1/τ
    x, y = zs.clone().requires_grad_(), (zs / tau).clone().requires_grad_()
    ga = grad_wrt(generalized_jsd_loss(x, zt, m, beta=beta, temperature=tau, normalizer=2.0)[0], x)
    gb = grad_wrt(generalized_jsd_loss(y, zt / tau, m, beta=beta, normalizer=2.0)[0], y)
    close(ga, gb / tau)


def test_temperature_changes_the_value():
    zs, zt, m = logits_batch(0, 2, 3, 7)
    a, _ = generalized_jsd_loss(zs, zt, m, beta=0.5, temperature=1.0, normalizer=1.0)
    b, _ = generalized_jsd_loss(zs, zt, m, beta=0.5, temperature=3.0, normalizer=1.0)
    assert b < a  # flatter distributions are closer


# ---------------------------------------------------------------------------------------------------------------
# masks, reductions, micro-batches, vocab padding (§9.22, 24)
# ---------------------------------------------------------------------------------------------------------------


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, tau=taus, level=levels)
def test_nan_inf_at_masked_rows_change_nothing(seed, shape, beta, tau, level):
    zs, zt, m = logits_batch(seed, *shape)
    bad_s = torch.where(m[..., None], zs, float("nan"))
    bad_t = torch.where(m[..., None], zt, float("inf"))
    x, y = zs.clone().requires_grad_(), bad_s.clone().requires_grad_()
    a, ma = generalized_jsd_loss(x, zt, m, beta=beta, temperature=tau, normalizer=2.0, level=level)
    b, mb = generalized_jsd_loss(y, bad_t, m, beta=beta, temperature=tau, normalizer=2.0, level=level)
    close(a, b, atol=0, rtol=0)
    gx, gy = grad_wrt(a, x), grad_wrt(b, y)
    assert torch.isfinite(gy).all()
    close(gx, gy, atol=0, rtol=0)
    assert (gy[~m] == 0).all()
    for k in ma:
        close(ma[k], mb[k], atol=0, rtol=0)


def test_neg_inf_logit_columns_are_handled():
    """A vocab entry at −inf (probability 0) contributes 0 and no NaN gradient (where p and q allow it)."""
    zs, zt, m = logits_batch(1, 2, 3, 6)
    zt = zt.clone()
    zt[..., 2] = float("-inf")  # teacher never emits token 2
    for beta in (0.0, 0.3, 0.5):  # reverse KL would be +inf when the student has mass there
        x = zs.clone().requires_grad_()
        loss, _ = generalized_jsd_loss(x, zt, m, beta=beta, normalizer=1.0)
        ref = naive_loss(zs, zt, m, beta, 1.0, 1.0)
        close(loss, ref)
        assert torch.isfinite(grad_wrt(loss, x)).all()
    both = zs.clone()
    both[..., 2] = float("-inf")
    for beta in (0.0, 0.3, 1.0):
        x = both.clone().requires_grad_()
        loss, _ = generalized_jsd_loss(x, zt, m, beta=beta, normalizer=1.0)
        close(loss, naive_loss(both, zt, m, beta, 1.0, 1.0))
        assert torch.isfinite(grad_wrt(loss, x)).all()


@PROP
@given(seed=seeds, shape=shapes(min_v=2), beta=betas, tau=taus, level=levels, k=st.integers(1, 3))
def test_microbatch_split_with_global_normalizer(seed, shape, beta, tau, level, k):
    B, T, V = shape
    zs, zt, m = logits_batch(seed, B + k, T, V)
    D = float(m.sum()) if level == "token" else float(m.shape[0])
    x = zs.clone().requires_grad_()
    full, _ = generalized_jsd_loss(x, zt, m, beta=beta, temperature=tau, normalizer=D, level=level)
    gfull = grad_wrt(full, x)
    y = zs.clone().requires_grad_()
    parts = [
        generalized_jsd_loss(y[i], zt[i], m[i], beta=beta, temperature=tau, normalizer=D, level=level)[0]
        for i in torch.tensor_split(torch.arange(B + k), k + 1)
    ]
    total = sum(parts)
    close(total, full)
    close(grad_wrt(total, y), gfull)
    # "local" is the local count
    loc, _ = generalized_jsd_loss(zs, zt, m, beta=beta, temperature=tau, normalizer="local", level=level)
    close(loc, full.detach())


@PROP
@given(seed=seeds, shape=shapes(), beta=betas)
def test_sequence_level_is_sum_of_row_means(seed, shape, beta):
    zs, zt, m = logits_batch(seed, *shape)
    if m.shape[1] > 1:
        m[:, 0] = False  # some rows may be empty: they contribute 0
    loss, metrics = generalized_jsd_loss(zs, zt, m, beta=beta, normalizer=2.0, level="sequence")
    d = naive_div(zs, zt, beta)
    ref = sum(d[b][m[b]].mean() if m[b].any() else 0.0 for b in range(m.shape[0])) / 2.0
    close(loss, ref)
    assert metrics["n_seqs"] == m.shape[0]
    w = sequence_token_weights(m)
    tw, _ = generalized_jsd_loss(zs, zt, m, beta=beta, normalizer=2.0, token_weights=w)
    close(tw, loss)
    with pytest.raises(ValueError, match="either"):
        generalized_jsd_loss(zs, zt, m, beta=beta, normalizer=2.0, level="sequence", token_weights=w)


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, tau=taus, pad_s=st.integers(0, 3), pad_t=st.integers(0, 5))
def test_vocab_padding(seed, shape, beta, tau, pad_s, pad_t):
    """Heads padded to different widths over one tokenizer (TRL #2215): compare the first V columns."""
    B, T, V = shape
    zs, zt, m = logits_batch(seed, B, T, V)
    g = torch.Generator().manual_seed(seed + 1)
    ps = torch.cat([zs, torch.randn(B, T, pad_s, generator=g, dtype=zs.dtype) * 3], -1)
    pt = torch.cat([zt, torch.randn(B, T, pad_t, generator=g, dtype=zs.dtype) * 3], -1)
    ref, _ = generalized_jsd_loss(zs, zt, m, beta=beta, temperature=tau, normalizer=1.0)
    x = ps.clone().requires_grad_()
    got, _ = generalized_jsd_loss(x, pt, m, beta=beta, temperature=tau, normalizer=1.0, vocab_size=V)
    close(got, ref)
    assert (grad_wrt(got, x)[..., V:] == 0).all()
    if pad_s == 0 or pad_t == 0:  # the default is the smaller width
        dflt, _ = generalized_jsd_loss(ps, pt, m, beta=beta, temperature=tau, normalizer=1.0)
        close(dflt, ref)
    with pytest.raises(ValueError, match="vocab_size"):
        generalized_jsd_loss(ps, pt, m, beta=beta, normalizer=1.0, vocab_size=V + min(pad_s, pad_t) + 1)


def test_teacher_gets_no_gradient_and_bad_args():
    zs, zt, m = logits_batch(3, 2, 3, 5)
    x, t = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    loss, _ = generalized_jsd_loss(x, t, m, normalizer=1.0)
    gx, gt = torch.autograd.grad(loss, (x, t), allow_unused=True)
    assert gx is not None and gt is None
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(zs, zt, m, beta=1.5, normalizer=1.0)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(zs, zt, m, temperature=0.0, normalizer=1.0)
    with pytest.raises(ValueError, match="level"):
        generalized_jsd_loss(zs, zt, m, level="pair", normalizer=1.0)
    with pytest.raises(ValueError, match="normalizer"):
        generalized_jsd_loss(zs, zt, m, normalizer="global")
    with pytest.raises(ValueError, match="shape"):
        generalized_jsd_loss(zs, zt[:1], m, normalizer=1.0)


def test_half_precision_inputs_compute_in_fp32():
    zs, zt, m = logits_batch(4, 2, 3, 9)
    a, _ = generalized_jsd_loss(zs.bfloat16(), zt.bfloat16(), m, normalizer=1.0)
    b, _ = generalized_jsd_loss(zs.bfloat16().double(), zt.bfloat16().double(), m, normalizer=1.0)
    assert a.dtype == torch.float32 and a.dim() == 0
    close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# the gradient formula (used by the chunked engine) against autograd
# ---------------------------------------------------------------------------------------------------------------


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, n_tiles=st.integers(1, 4))
def test_divergence_grad_matches_autograd(seed, shape, beta, n_tiles):
    zs, zt, _ = logits_batch(seed, *shape)
    x = zs.clone().requires_grad_()
    d = naive_div(x, zt, beta)  # probability-space reference
    (auto,) = torch.autograd.grad(d.sum(), x)
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    close(divergence_grad(ls, lt, beta), auto, atol=1e-10, rtol=1e-8)
    # on vocab tiles, with the row statistic passed in
    aux = token_divergence(ls, lt, beta) if beta == 1.0 else None
    if 0 < beta < 1:
        mix = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        aux = (ls.exp() * (ls - mix)).sum(-1)
    tiles = [
        divergence_grad(a, b, beta, aux)
        for a, b in zip(torch.tensor_split(ls, n_tiles, -1), torch.tensor_split(lt, n_tiles, -1))
    ]
    close(torch.cat(tiles, -1), auto, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# chunked engine == full logits (§9.28-style)
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def head_batch(draw):
    seed = draw(seeds)
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    Hs, Ht = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    V = draw(st.integers(2, 40))
    pad_s, pad_t = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(seed)
    f = lambda *s, sc=1.0: torch.randn(*s, generator=g) * sc
    hs, ws = f(B, T, Hs), f(V + pad_s, Hs, sc=0.5)
    ht, wt = f(B, T, Ht), f(V + pad_t, Ht, sc=0.5)
    bs = f(V + pad_s) if draw(st.booleans()) else None
    bt = f(V + pad_t) if draw(st.booleans()) else None
    m = torch.rand(B, T, generator=g) > draw(st.floats(0.0, 0.6))
    vocab_size = V if (pad_s and pad_t) or draw(st.booleans()) else None
    return dict(hs=hs, ws=ws, bs=bs, ht=ht, wt=wt, bt=bt, m=m, vocab_size=vocab_size)


def full_logits(h, w, b, scale=1.0):
    z = h.double() @ w.double().T
    return (z if b is None else z + b.double()) * scale


@PROP
@given(
    hb=head_batch(),
    beta=betas,
    tau=taus,
    level=levels,
    token_chunk=st.integers(1, 8),
    vocab_chunk=st.one_of(st.none(), st.integers(1, 16)),
    scales=st.sampled_from([(1.0, 1.0), (0.5, 2.0)]),
)
def test_chunked_equals_full_values_and_grads(hb, beta, tau, level, token_chunk, vocab_chunk, scales):
    hs = hb["hs"].clone().requires_grad_()
    ws = hb["ws"].clone().requires_grad_()
    bs = None if hb["bs"] is None else hb["bs"].clone().requires_grad_()
    leaves = [t for t in (hs, ws, bs) if t is not None]
    loss, metrics = chunked_generalized_jsd_loss(
        hs, ws, hb["ht"], hb["wt"], hb["m"], beta=beta, temperature=tau, normalizer=3.0, level=level,
        student_bias=bs, teacher_bias=hb["bt"], student_logit_scale=scales[0], teacher_logit_scale=scales[1],
        vocab_size=hb["vocab_size"], token_chunk=token_chunk, vocab_chunk=vocab_chunk,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, leaves)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    r_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rh, rw = r_leaves[0], r_leaves[1]
    rb = r_leaves[2] if bs is not None else None
    zs = full_logits(rh, rw, rb, scales[0])
    zt = full_logits(hb["ht"], hb["wt"], hb["bt"], scales[1])
    ref, rmetrics = generalized_jsd_loss(
        zs, zt, hb["m"], beta=beta, temperature=tau, normalizer=3.0, level=level, vocab_size=hb["vocab_size"]
    )
    close(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, r_leaves)):
        close(g, r)
    for k in ("distill/divergence_mean", "distill/student_entropy", "distill/teacher_entropy", "n_tokens"):
        close(metrics[k], rmetrics[k])


@PROP
@given(hb=head_batch(), beta=betas, token_chunk=st.integers(1, 5), vocab_chunk=st.integers(1, 9))
def test_chunked_nan_rows_and_top1(hb, beta, token_chunk, vocab_chunk):
    m = hb["m"]
    hs = torch.where(m[..., None], hb["hs"], float("nan")).requires_grad_()
    ht = torch.where(m[..., None], hb["ht"], float("inf"))
    ws = hb["ws"].clone().requires_grad_()
    out = chunked_token_divergence(
        hs, ws, ht, hb["wt"], m, beta=beta, student_bias=hb["bs"], teacher_bias=hb["bt"],
        vocab_size=hb["vocab_size"], token_chunk=token_chunk, vocab_chunk=vocab_chunk,
    )  # fmt: skip
    gh, gw = torch.autograd.grad(out["divergence"].sum(), (hs, ws))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert (gh[~m] == 0).all() and (out["divergence"][~m] == 0).all()
    V = hb["vocab_size"] or min(hb["ws"].shape[0], hb["wt"].shape[0])
    assert (gw[V:] == 0).all()
    zs = full_logits(hb["hs"], hb["ws"], hb["bs"])[..., :V]
    zt = full_logits(hb["ht"], hb["wt"], hb["bt"])[..., :V]
    assert (out["top1_agreement"][m] == (zs.argmax(-1) == zt.argmax(-1))[m]).all()
    close(torch.where(m, out["divergence"], 0.0), torch.where(m, naive_div(zs, zt, beta), 0.0))


@PROP
@given(hb=head_batch(), beta=betas, k=st.integers(1, 3))
def test_chunked_microbatch_split_and_token_weights(hb, beta, k):
    hs, m = hb["hs"], hb["m"]
    kw = dict(beta=beta, student_bias=hb["bs"], teacher_bias=hb["bt"], vocab_size=hb["vocab_size"], token_chunk=3)
    ws = hb["ws"].clone().requires_grad_()
    D = float(m.sum().clamp(min=1))
    full, _ = chunked_generalized_jsd_loss(hs, ws, hb["ht"], hb["wt"], m, normalizer=D, **kw)
    gfull = grad_wrt(full, ws)
    parts = [
        chunked_generalized_jsd_loss(hs[:, i], ws, hb["ht"][:, i], hb["wt"], m[:, i], normalizer=D, **kw)[0]
        for i in torch.tensor_split(torch.arange(hs.shape[1]), k)
        if len(i)
    ]
    total = sum(parts)
    close(total, full)
    close(grad_wrt(total, ws), gfull)
    # flat [N,H] inputs with per-token sequence weights == level="sequence"
    seq, _ = chunked_generalized_jsd_loss(hs, ws, hb["ht"], hb["wt"], m, normalizer=2.0, level="sequence", **kw)
    w = sequence_token_weights(m).reshape(-1)
    flat, _ = chunked_generalized_jsd_loss(
        hs.reshape(-1, hs.shape[-1]), ws, hb["ht"].reshape(-1, hb["ht"].shape[-1]), hb["wt"], m.reshape(-1),
        normalizer=2.0, token_weights=w, **kw,
    )  # fmt: skip
    close(flat, seq)
    with pytest.raises(ValueError, match="sequence"):
        chunked_generalized_jsd_loss(
            hs.reshape(-1, hs.shape[-1]), ws, hb["ht"].reshape(-1, hb["ht"].shape[-1]), hb["wt"], m.reshape(-1),
            normalizer=2.0, level="sequence", **kw,
        )  # fmt: skip


def test_chunked_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(11, 4, generator=g, requires_grad=True)
    ht, wt = torch.randn(5, 3, generator=g, requires_grad=True), torch.randn(11, 3, generator=g, requires_grad=True)
    loss, _ = chunked_generalized_jsd_loss(hs, ws, ht, wt, torch.ones(5, dtype=torch.bool), normalizer=5.0)
    grads = torch.autograd.grad(loss, (hs, ws, ht, wt), allow_unused=True)
    assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None


def test_chunked_never_allocates_full_logits():
    """With small tiles no tensor of N·V elements (or more) is created in forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    N, H, V = 64, 8, 512
    tc, vc = 8, 64

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(N, H, generator=g, requires_grad=True), torch.randn(V, H, generator=g, requires_grad=True)
    ht, wt = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    m = torch.ones(N, dtype=torch.bool)
    for beta in (0.0, 0.5, 1.0):
        mode = Largest()
        with mode:
            loss, _ = chunked_generalized_jsd_loss(
                hs, ws, ht, wt, m, beta=beta, normalizer=1.0, token_chunk=tc, vocab_chunk=vc
            )
            loss.backward()
        # the largest tensors are the weight-sized gradient (V·H) and tiles (tc·vc); N·V never appears
        assert mode.largest <= max(V * H, tc * vc), mode.largest
        assert mode.largest < N * V


# ---------------------------------------------------------------------------------------------------------------
# sparse top-k teacher
# ---------------------------------------------------------------------------------------------------------------


def sparse_batch(seed, B, T, V, K, tau=1.0):
    zs, zt, m = logits_batch(seed, B, T, V)
    lt_full = torch.log_softmax(zt / tau, -1)
    lps, ids = lt_full.topk(K, -1)
    return zs, ids, lps, m


def naive_sparse(zs, ids, lps, m, beta, tau, add_tail, D):
    p = torch.softmax(zs / tau, -1).gather(-1, ids)
    q = lps.exp()
    if add_tail:  # TRL clamps the top-k mass at e^{−1e-7}, so the tail is never below ~1e-7
        cap = math.exp(-1e-7)
        p = torch.cat([p, 1 - p.sum(-1, keepdim=True).clamp(max=cap)], -1)
        q = torch.cat([q, 1 - q.sum(-1, keepdim=True).clamp(max=cap)], -1)
    else:
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    return torch.where(m, div_from_probs(p, q, beta), 0.0).sum() / D


@PROP
@given(seed=seeds, shape=shapes(min_v=3), beta=betas, tau=taus, add_tail=st.booleans(), data=st.data())
def test_sparse_matches_naive(seed, shape, beta, tau, add_tail, data):
    B, T, V = shape
    K = data.draw(st.integers(1, V - 1))
    zs, ids, lps, m = sparse_batch(seed, B, T, V, K, tau)
    x, y = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    loss, metrics = sparse_divergence_loss(
        x, ids, lps, m, beta=beta, temperature=tau, add_tail=add_tail, normalizer=2.0
    )
    ref = naive_sparse(y, ids, lps, m, beta, tau, add_tail, 2.0)
    close(loss, ref)
    close(grad_wrt(loss, x), grad_wrt(ref, y))
    close(metrics["distill/teacher_topk_mass"], lps.exp().sum(-1)[m].mean())


@PROP
@given(seed=seeds, shape=shapes(), beta=betas, tau=taus, level=levels)
def test_sparse_full_support_without_tail_equals_full(seed, shape, beta, tau, level):
    B, T, V = shape
    zs, zt, m = logits_batch(seed, B, T, V)
    g = torch.Generator().manual_seed(seed)
    ids = torch.argsort(torch.rand(B, T, V, generator=g), -1)  # any order of the whole vocabulary
    lps = torch.log_softmax(zt / tau, -1).gather(-1, ids)
    x, y = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    sp, _ = sparse_divergence_loss(
        x, ids, lps, m, beta=beta, temperature=tau, add_tail=False, normalizer=2.0, level=level
    )
    full, _ = generalized_jsd_loss(y, zt, m, beta=beta, temperature=tau, normalizer=2.0, level=level)
    close(sp, full)
    close(grad_wrt(sp, x), grad_wrt(full, y))


@PROP
@given(seed=seeds, shape=shapes(min_v=4), beta=betas, add_tail=st.booleans(), n_pad=st.integers(1, 3))
def test_sparse_invalid_slots_are_dropped(seed, shape, beta, add_tail, n_pad):
    """Padding slots (id −1 / log-prob −inf / NaN) and masked rows with garbage change nothing."""
    B, T, V = shape
    zs, ids, lps, m = sparse_batch(seed, B, T, V, 2)
    ref, _ = sparse_divergence_loss(zs, ids, lps, m, beta=beta, add_tail=add_tail, normalizer=1.0)
    pad_ids = torch.cat([ids, torch.full((B, T, n_pad), -1)], -1)
    pad_lps = torch.cat([lps, torch.full((B, T, n_pad), float("-inf"))], -1)
    pad_ids[..., -1] = 0  # an in-range id whose log-prob is NaN is invalid too
    pad_lps[..., -1] = float("nan")
    bad = torch.where(m[..., None], zs, float("nan")).requires_grad_()
    got, _ = sparse_divergence_loss(bad, pad_ids, pad_lps, m, beta=beta, add_tail=add_tail, normalizer=1.0)
    close(got, ref)
    g = grad_wrt(got, bad)
    assert torch.isfinite(g).all() and (g[~m] == 0).all()
    # a row whose slots are all invalid contributes 0 (and no NaN)
    none_ids = torch.full_like(ids, -1)
    x = zs.clone().requires_grad_()
    z, _ = sparse_divergence_loss(x, none_ids, lps, m, beta=beta, add_tail=add_tail, normalizer=1.0)
    assert z == 0 and (grad_wrt(z, x) == 0).all()


def test_sparse_tail_clamp_is_trl_convention():
    """With K=V the top-k mass is 1: the tail is log(1 − e^{−1e-7}) for both, finite, and the loss is finite."""
    zs, zt, m = logits_batch(5, 2, 3, 6)
    ids = torch.arange(6).expand(2, 3, 6)
    lps = torch.log_softmax(zt, -1)
    x = zs.clone().requires_grad_()
    loss, _ = sparse_divergence_loss(x, ids, lps, m, beta=0.0, add_tail=True, normalizer=1.0)
    full, _ = generalized_jsd_loss(zs, zt, m, beta=0.0, normalizer=1.0)
    assert torch.isfinite(grad_wrt(loss, x)).all()
    close(loss, full, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# metrics contract (§9.32)
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_detached_and_no_item(monkeypatch):
    def boom(self):
        raise AssertionError("Tensor.item called")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    zs, zt, m = (t.float() if t.is_floating_point() else t for t in logits_batch(6, 2, 4, 9))
    x = zs.requires_grad_()
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(2, 4, 5, generator=g, requires_grad=True), torch.randn(9, 5, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 4, 3, generator=g), torch.randn(9, 3, generator=g)
    ids = torch.topk(zt, 3, -1).indices
    lps = torch.log_softmax(zt, -1).gather(-1, ids)
    outs = []
    for level in ("token", "sequence"):
        for norm in (torch.tensor(5.0), "local", 3.0):
            for beta in (0.0, 0.4, 1.0):
                kw = dict(beta=beta, normalizer=norm, level=level)
                outs.append(generalized_jsd_loss(x, zt, m, temperature=0.7, **kw))
                outs.append(sparse_divergence_loss(x, ids, lps, m, **kw))
                outs.append(chunked_generalized_jsd_loss(hs, ws, ht, wt, m, token_chunk=3, vocab_chunk=4, **kw))
    sum(loss for loss, _ in outs).backward()
    for loss, metrics in outs:
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert metrics
        for k, v in metrics.items():
            assert isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0, k


def test_chunked_half_precision_and_default_mask():
    """bf16 heads and hidden states compute in fp32 (inside a bf16 autocast too); grads come back in bf16."""
    g = torch.Generator().manual_seed(7)
    hs, ws = torch.randn(6, 5, generator=g).bfloat16(), torch.randn(13, 5, generator=g).bfloat16()
    ht, wt = torch.randn(6, 4, generator=g).bfloat16(), torch.randn(13, 4, generator=g).bfloat16()
    x, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_token_divergence(x, w, ht, wt, beta=0.3, token_chunk=4, vocab_chunk=5)
    assert out["divergence"].dtype == torch.float32
    gx, gw = torch.autograd.grad(out["divergence"].sum(), (x, w))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    xf, wf = hs.float().requires_grad_(), ws.float().requires_grad_()
    ref = chunked_token_divergence(xf, wf, ht.float(), wt.float(), beta=0.3)
    close(out["divergence"], ref["divergence"])
    rx, rw = torch.autograd.grad(ref["divergence"].sum(), (xf, wf))
    close(gx, rx, atol=2e-2, rtol=2e-2)  # bf16 rounding of the returned gradients
    close(gw, rw, atol=2e-2, rtol=2e-2)
