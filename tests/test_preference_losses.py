"""Tests for alignkit.losses.preference / unpaired (docs/LOSSES.md §4, §5, §9 items 1-10, 31, 32)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from alignkit.losses.preference import (
    DPO_LOSSES,
    F_DIVERGENCES,
    LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    ld_sequence_logps,
    log1mexp,
    normalize,
    orpo_loss,
    simpo_loss,
    wpo_weights,
)
from alignkit.losses.unpaired import (
    BCOState,
    bco_loss,
    kto_loss,
    kto_reference_point,
    kto_weight_ratio,
    mismatched_completions,
    update_bco_state,
)
from alignkit.ops import split_pairs
from tests.conftest import close

PROPS = settings(max_examples=40, deadline=None)
ATOL, RTOL = 1e-5, 1e-4
REF_TYPES = [t for t in DPO_LOSSES if t not in ("aot", "aot_unpaired")]  # decomposable per pair
F_OK = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"]


pytestmark = pytest.mark.usefixtures("one_thread")


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def pairs(draw, lo=-12.0, hi=12.0, min_p=1, max_p=6):
    """Random (π_c, π_r, ρ_c, ρ_r, n_c, n_r), P pairs; log-probs are −20 + U[lo, hi], so h spans [lo−hi, hi−lo]."""
    p = draw(st.integers(min_p, max_p))
    cols = [torch.tensor(draw(st.lists(floats(lo, hi), min_size=p, max_size=p))) - 20.0 for _ in range(4)]
    lens = [torch.tensor(draw(st.lists(st.integers(1, 9), min_size=p, max_size=p))) for _ in range(2)]
    return (*cols, *lens)


def type_kwargs(t, eps=None):
    """Arguments a type needs to be valid (ε where required, lengths always)."""
    if eps is None:
        eps = {"exo_pair": 1e-3, "robust": 0.1}.get(t, 0.0)
    return {"loss_type": t, "label_smoothing": eps}


def per_pair(t, pc, pr, rc, rr, nc, nr, **kw):
    """Per-pair loss vector via normalizer=1 on one pair at a time."""
    out = [
        dpo_loss(
            pc[i : i + 1],
            pr[i : i + 1],
            rc[i : i + 1],
            rr[i : i + 1],
            chosen_lengths=nc[i : i + 1],
            rejected_lengths=nr[i : i + 1],
            normalizer=1.0,
            **type_kwargs(t, kw.pop("label_smoothing", None)),
            **kw,
        )[0]
        for i in range(pc.numel())
    ]
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# Float64 reference of every §4.1 row, written from the table, and its agreement with dpo_loss
# ----------------------------------------------------------------------------------------------------------------

SCORES64 = {
    "reverse_kl": lambda h, a: h,
    "forward_kl": lambda h, a: 1 - torch.exp(-h),
    "js_divergence": lambda h, a: math.log(2) + F.logsigmoid(h),
    "alpha_divergence": lambda h, a: h if abs(a - 1) < 1e-6 else (torch.exp((a - 1) * h) - 1) / (a - 1),
}


def reference64(t, pc, pr, rc, rr, nc, nr, *, beta, eps, tau=0.05, ipo_norm=True, f="reverse_kl", a=0.5):
    pc, pr, rc, rr, nc, nr = (x.double() for x in (pc, pr, rc, rr, nc, nr))
    hc, hr = pc - rc, pr - rr
    sc, sr = SCORES64[f](hc, a), SCORES64[f](hr, a)
    d = sc - sr
    ls, sig = F.logsigmoid, torch.sigmoid
    cdpo = lambda z: -(1 - eps) * ls(z) - eps * ls(-z)
    if t == "sigmoid":
        return cdpo(beta * d)
    if t == "hinge":
        return torch.clamp(1 - beta * d, min=0)
    if t == "ipo":
        dd = sc / nc - sr / nr if ipo_norm else d
        return (dd - 1 / (2 * beta)) ** 2
    if t == "exo_pair":
        # log q and log(1-q) as logsigmoid(±z): the naive log(1 - q) is -inf once q rounds to 1 in float64
        z = beta * d
        q = sig(z)
        return q * (ls(z) - math.log(1 - eps)) + (1 - q) * (ls(-z) - math.log(eps))
    if t == "nca_pair":
        return -ls(beta * hc) - 0.5 * ls(-beta * hc) - 0.5 * ls(-beta * hr)
    if t == "robust":
        return (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    if t == "bco_pair":
        return -ls(beta * hc) - ls(-beta * hr)
    if t == "sppo_hard":
        return (hc - 1 / (2 * beta)) ** 2 + (hr + 1 / (2 * beta)) ** 2
    if t == "aot":
        return cdpo(beta * (torch.sort(pc - pr).values - torch.sort(rc - rr).values))
    if t == "aot_unpaired":
        return cdpo(beta * (torch.sort(hc).values - torch.sort(hr).values))
    if t == "apo_zero":
        return (1 - sig(beta * hc)) + sig(beta * hr)
    if t == "apo_down":
        return sig(beta * hc) + (1 - sig(beta * (hc - hr)))
    if t == "discopop":
        z = beta * d
        g = sig(z / tau)
        return (1 - g) * (-ls(z)) + g * torch.exp(-z)
    if t == "sigmoid_norm":
        return -ls(beta * (sc / nc - sr / nr))
    raise AssertionError(t)


@PROPS
@given(pairs(lo=-3.0, hi=3.0), floats(0.05, 1.0), floats(0.0, 0.4), st.booleans())
def test_every_type_matches_float64_table(batch, beta, eps, ipo_norm):
    pc, pr, rc, rr, nc, nr = batch
    for t in DPO_LOSSES:
        e = max(eps, 1e-3) if t == "exo_pair" else eps
        got, _ = dpo_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=t,
            beta=beta,
            label_smoothing=e,
            chosen_lengths=nc,
            rejected_lengths=nr,
            ipo_length_normalize=ipo_norm,
            normalizer="local",
        )
        want = reference64(t, pc, pr, rc, rr, nc, nr, beta=beta, eps=e, ipo_norm=ipo_norm).mean()
        close(got, want, atol=1e-4)


@PROPS
@given(pairs(lo=-3.0, hi=3.0), floats(0.05, 1.0), st.sampled_from(list(F_DIVERGENCES)), floats(0.2, 1.8))
def test_f_divergence_scores_match_float64_table(batch, beta, f, a):
    pc, pr, rc, rr, nc, nr = batch
    for t in F_OK:
        eps = 1e-3 if t == "exo_pair" else 0.1 if t == "robust" else 0.0
        kw = {"chosen_lengths": nc, "rejected_lengths": nr, "f_divergence": f, "f_alpha": a}
        got, _ = dpo_loss(pc, pr, rc, rr, loss_type=t, beta=beta, label_smoothing=eps, normalizer="local", **kw)
        want = reference64(t, pc, pr, rc, rr, nc, nr, beta=beta, eps=eps, f=f, a=a).mean()
        close(got, want, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# §9 properties 1-8
# ----------------------------------------------------------------------------------------------------------------


@PROPS
@given(pairs(), floats(1e-3, 10.0), st.integers(0, 2**16))
def test_p1_sigmoid_is_log2_at_zero_margin(batch, beta, seed):
    torch.manual_seed(seed)
    pc, _, rc, _, _, _ = batch
    shift = torch.randn(pc.shape)  # rejected side has the same log-ratio, so Δ = 0
    loss, m = dpo_loss(pc, pc + shift, rc, rc + shift, beta=beta, normalizer="local")
    close(loss, math.log(2))
    _, m = dpo_loss(pc, pc, rc, rc, beta=beta, normalizer="local")
    close(m["rewards/accuracies"], 0.0)  # exact ties count as wrong


@PROPS
@given(pairs(), floats(0.01, 2.0))
def test_p2_sigmoid_antisymmetry(batch, beta):
    pc, pr, rc, rr, _, _ = batch
    fwd, _ = dpo_loss(pc, pr, rc, rr, beta=beta, normalizer=1.0)
    bwd, _ = dpo_loss(pr, pc, rr, rc, beta=beta, normalizer=1.0)
    close(bwd - fwd, beta * ((pc - rc) - (pr - rr)).sum(), atol=1e-4)


def grads(t, pc, pr, rc, rr, nc, nr, **kw):
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss, _ = dpo_loss(pc, pr, rc, rr, loss_type=t, chosen_lengths=nc, rejected_lengths=nr, normalizer=1.0, **kw)
    gc, gr = torch.autograd.grad(loss, (pc, pr))
    return gc, gr


@PROPS
@given(pairs(lo=-4.0, hi=4.0), floats(0.05, 1.0))
def test_p3_gradient_signs_always(batch, beta):
    for t, eps in [("sigmoid", 0.0), ("robust", 0.2), ("bco_pair", 0.0), ("apo_zero", 0.0)]:
        gc, gr = grads(t, *batch, beta=beta, label_smoothing=eps)
        assert (gc < 0).all() and (gr > 0).all(), t


def _sign_iff(grad_c, grad_r, condition, gap):
    """∂L/∂π_c < 0 < ∂L/∂π_r exactly where `condition` holds (away from the boundary, |gap| > 1e-3)."""
    ok = gap.abs() > 1e-3
    assert torch.equal((grad_c < 0)[ok], condition[ok])
    assert torch.equal((grad_r > 0)[ok], condition[ok])


@PROPS
@given(pairs(lo=-4.0, hi=4.0), floats(0.05, 1.0), floats(0.01, 0.45))
def test_p3_gradient_signs_conditional(batch, beta, eps):
    pc, pr, rc, rr, nc, nr = batch
    d = (pc - rc) - (pr - rr)
    threshold = math.log((1 - eps) / eps)
    _sign_iff(*grads("sigmoid", *batch, beta=beta, label_smoothing=eps), beta * d < threshold, beta * d - threshold)
    dn = (pc - rc) / nc - (pr - rr) / nr
    _sign_iff(*grads("ipo", *batch, beta=beta), dn < 1 / (2 * beta), dn - 1 / (2 * beta))
    _sign_iff(*grads("hinge", *batch, beta=beta), beta * d < 1, beta * d - 1)
    gc, gr = grads("nca_pair", *batch, beta=beta)
    hc = beta * (pc - rc)
    ok = (hc - math.log(2)).abs() > 1e-3
    assert torch.equal((gc < 0)[ok], (hc < math.log(2))[ok]) and (gr > 0).all()


def on_grid(x, step=2.0**-12):
    """`x` rounded to multiples of `step`: sums and differences of a few such values below 2^8 in magnitude need at
    most 20 significant bits, so fp32 computes them exactly."""
    return torch.round(x / step) * step


@PROPS
@given(pairs(), floats(0.05, 1.0), st.sampled_from(list(F_DIVERGENCES)), st.integers(0, 2**16))
@example(  # found by random exploration: an fp32 ulp of h at log-probs -20 is e^6 times larger in the forward-KL score
    batch=(torch.full((3,), -20.0), torch.full((3,), -20.0), torch.tensor([-14.0, -20.0, -20.0]),
           torch.tensor([-14.0, -20.0, -20.0]), torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long)),
    beta=1.0,
    f="forward_kl",
    seed=0,
)  # fmt: skip
def test_p4_invariant_to_per_side_offsets(batch, beta, f, seed):
    # The loss reads π and ρ only through h = π − ρ, so an offset per side (the f-DPO β·log Z(x)) cancels exactly,
    # in exact arithmetic. In fp32 the shifted input π + c is itself rounded: near |π| = 30 that moves h by an ulp
    # (~4e-6), which a forward-KL score 1 − e^{−h} multiplies by e^{−h} (up to e^24). The claim is tested where it
    # is exact: log-probs and offsets on a dyadic grid, so π + c and every log-ratio are exact in fp32, h does not
    # move, and neither may the loss.
    torch.manual_seed(seed)
    pc, pr, rc, rr = (on_grid(x) for x in batch[:4])
    nc, nr = batch[4:]
    cc, cr = on_grid(torch.randn(pc.shape) * 5), on_grid(torch.randn(pc.shape) * 5)
    for t in REF_TYPES:
        if f != "reverse_kl" and t not in F_OK:
            continue
        kw = {**type_kwargs(t), "beta": beta, "f_divergence": f, "chosen_lengths": nc, "rejected_lengths": nr}
        a, _ = dpo_loss(pc, pr, rc, rr, normalizer=1.0, **kw)
        b, _ = dpo_loss(pc + cc, pr + cr, rc + cc, rr + cr, normalizer=1.0, **kw)
        close(a, b)


@PROPS
@given(pairs(), floats(0.05, 1.0), floats(0.0, 0.45))
def test_p5_reductions(batch, beta, eps):
    pc, pr, rc, rr, nc, nr = batch
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=beta, normalizer=1.0)
    close(dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", normalizer=1.0)[0], plain)
    # aot* on one pair have nothing to sort: they are cDPO
    for i in range(pc.numel()):
        one = [x[i : i + 1] for x in (pc, pr, rc, rr)]
        cdpo, _ = dpo_loss(*one, beta=beta, label_smoothing=eps, normalizer=1.0)
        for t in ("aot", "aot_unpaired"):
            close(dpo_loss(*one, beta=beta, label_smoothing=eps, loss_type=t, normalizer=1.0)[0], cdpo)


@PROPS
@given(st.integers(1, 4), st.integers(1, 10), st.integers(1, 10), floats(0.0, 1.0), st.integers(0, 2**16))
def test_p5_ld_dpo_reductions(b, tc, tr, alpha, seed):
    torch.manual_seed(seed)
    t = max(tc, tr)
    lc, lr = torch.randn(b, t), torch.randn(b, t)
    mc = torch.arange(t) < torch.randint(1, tc + 1, (b, 1))
    mr = torch.arange(t) < torch.randint(1, tr + 1, (b, 1))
    nc, nr = mc.sum(-1), mr.sum(-1)
    plain_c = torch.where(mc, lc, 0).sum(-1)
    close(ld_sequence_logps(lc, mc, nr, alpha=1.0), plain_c)  # α = 1
    close(ld_sequence_logps(lc, mc, nc, alpha=alpha), plain_c)  # equal lengths
    # independent loop: first min(n_c, n_r) tokens at weight 1, the rest at α, on both sides of the pair
    for lp, m, n, other in ((lc, mc, nc, nr), (lr, mr, nr, nc)):
        got = ld_sequence_logps(lp, m, other, alpha=alpha)
        for i in range(b):
            s = min(int(n[i]), int(other[i]))
            close(got[i], lp[i, :s].sum() + alpha * lp[i, s : int(n[i])].sum())


def test_ld_dpo_uses_token_rank_not_position():
    # left-padded row: the completion starts at slot 2, so the shared prefix is slots 2..3 for other length 2
    lp = torch.tensor([[9.0, 9.0, -1.0, -2.0, -3.0, -4.0]])
    m = torch.tensor([[0, 0, 1, 1, 1, 1]]).bool()
    close(ld_sequence_logps(lp, m, torch.tensor([2]), alpha=0.5), torch.tensor([-3.0 + 0.5 * -7.0]))
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_sequence_logps(lp, m, torch.tensor([2]), alpha=1.5)


@PROPS
@given(pairs(), floats(0.05, 1.0))
def test_p6_ipo_zero_at_target(batch, beta):
    _, pr, rc, rr, nc, nr = batch
    # choose π_c so that Δ̃ = 1/(2β) exactly
    pc = rc + nc * ((pr - rr) / nr + 1 / (2 * beta))
    loss, _ = dpo_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=nc, rejected_lengths=nr, normalizer=1)
    close(loss, 0.0, atol=1e-3)
    off, _ = dpo_loss(
        pc + nc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=nc, rejected_lengths=nr, normalizer=1
    )
    assert off > 0.5
    ones = torch.ones_like(nc)
    a = dpo_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=ones, rejected_lengths=ones, normalizer=1)
    b = dpo_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, ipo_length_normalize=False, normalizer=1)
    close(a[0], b[0])


@PROPS
@given(st.lists(floats(-20.0, 20.0), min_size=2, max_size=12, unique=True), floats(0.2, 1.8))
def test_p7_f_scores_zero_at_zero_and_increasing(hs, alpha):
    h = torch.tensor(sorted(hs), dtype=torch.float64)
    h = h[torch.cat([torch.tensor([True]), h.diff() > 1e-3])]
    for name, f in F_DIVERGENCES.items():
        close(f(torch.zeros((), dtype=torch.float64), alpha, 80.0), 0.0, atol=1e-12)
        s = f(h, alpha, 80.0)
        assert (s.diff() > 0).all(), name
    hh = h.clamp(-5, 5)
    close(F_DIVERGENCES["alpha_divergence"](hh, 1.0 + 1e-7, 80.0), hh, atol=1e-5)  # fallback branch
    close(F_DIVERGENCES["alpha_divergence"](hh, 1.0 + 1e-5, 80.0), hh, atol=1e-3)  # the limit itself


def test_alpha_divergence_clamps_the_exponent_by_dtype():
    s32 = F_DIVERGENCES["alpha_divergence"](torch.tensor([400.0]), 1.5, 80.0)
    close(s32, torch.tensor([math.expm1(80.0) / 0.5]))
    # fp16 inputs cap (α−1)·h at 11: h_c = 30 gives s_c = expm1(11)/0.5 instead of expm1(15)/0.5
    zero, minus30 = torch.tensor([0.0], dtype=torch.float16), torch.tensor([-30.0], dtype=torch.float16)
    kw = {"f_divergence": "alpha_divergence", "f_alpha": 1.5, "beta": 1e-6, "normalizer": 1.0}
    loss16, _ = dpo_loss(zero, zero, minus30, zero, **kw)
    close(loss16, -F.logsigmoid(torch.tensor(1e-6 * math.expm1(11.0) / 0.5)))
    loss32, _ = dpo_loss(zero.float(), zero.float(), minus30.float(), zero.float(), **kw)
    close(loss32, -F.logsigmoid(torch.tensor(1e-6 * math.expm1(15.0) / 0.5)))


@PROPS
@given(pairs(), floats(0.05, 1.0), st.lists(floats(0.0, 3.0), min_size=3, max_size=3))
def test_p8_mpo_is_weighted_sum(batch, beta, w):
    pc, pr, rc, rr, nc, nr = batch
    sft = pc * 0.5
    kw = {"beta": beta, "chosen_lengths": nc, "rejected_lengths": nr, "sft_logps": sft, "sft_normalizer": 7.0}
    types = ["sigmoid", "bco_pair", "sft"]
    total, m = dpo_loss(pc, pr, rc, rr, loss_type=types, loss_weights=w, normalizer="local", **kw)
    parts = [dpo_loss(pc, pr, rc, rr, loss_type=t, normalizer="local", **kw)[0] for t in types]
    close(total, sum(wk * lk for wk, lk in zip(w, parts)))
    close(parts[2], -sft.sum() / 7.0)  # sft: added once, own normaliser
    for t, lk in zip(types, parts):
        close(m[f"loss/{t}"], lk)
    close(dpo_loss(pc, pr, rc, rr, loss_type=types, normalizer="local", **kw)[0], sum(parts))  # default weights 1


# ----------------------------------------------------------------------------------------------------------------
# Modifiers, metrics, micro-batching, NaN safety, errors
# ----------------------------------------------------------------------------------------------------------------


@PROPS
@given(pairs(), floats(0.05, 1.0), st.integers(0, 2**16))
def test_wpo_weights_scale_each_pair(batch, beta, seed):
    torch.manual_seed(seed)
    pc, pr, rc, rr, nc, nr = batch
    p, t = pc.numel(), 7
    lp = torch.randn(2 * p, t).clamp(max=-0.01).requires_grad_()
    lssp = -torch.rand(2 * p, t)
    m = torch.arange(t) < torch.randint(1, t + 1, (2 * p, 1))
    w = wpo_weights(lp, lssp, m)
    assert not w.requires_grad
    want = torch.stack([(lp[i, m[i]] - lssp[i, m[i]]).mean().exp() for i in range(2 * p)])
    close(w, want.detach())
    wc, wr = split_pairs(w)
    for t_ in REF_TYPES:
        kw = type_kwargs(t_)
        loss, _ = dpo_loss(
            pc,
            pr,
            rc,
            rr,
            pair_weights=wc * wr,
            beta=beta,
            chosen_lengths=nc,
            rejected_lengths=nr,
            normalizer=1.0,
            **kw,
        )
        unweighted = per_pair(t_, pc, pr, rc, rr, nc, nr, beta=beta)
        close(loss, (unweighted * wc * wr).sum(), atol=1e-4)


def test_sft_term_is_not_scaled_by_pair_weights():
    pc, pr, rc, rr = (torch.tensor([-5.0, -6.0]),) * 4
    a, _ = dpo_loss(pc, pr, rc, rr, loss_type="sft", sft_logps=pc, sft_normalizer=4.0, normalizer=2.0)
    b, _ = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type="sft",
        sft_logps=pc,
        sft_normalizer=4.0,
        normalizer=2.0,
        pair_weights=torch.tensor([0.1, 0.2]),
    )
    close(a, b)
    close(a, 11.0 / 4.0)


@PROPS
@given(pairs(min_p=2, max_p=8), floats(0.05, 1.0), st.data(), st.integers(0, 2**16))
def test_micro_batches_with_global_normalizer_are_exact(batch, beta, data, seed):
    torch.manual_seed(seed)
    pc, pr, rc, rr, nc, nr = batch
    p = pc.numel()
    cut = data.draw(st.integers(1, p - 1))
    pw = torch.rand(p) + 0.5
    for t in REF_TYPES + [["sigmoid", "sft"]]:
        kw = {**type_kwargs(t if isinstance(t, str) else "sigmoid"), "loss_type": t, "beta": beta, "normalizer": p}
        full_in = [x.clone().requires_grad_() for x in (pc, pr)]
        full, _ = dpo_loss(
            *full_in,
            rc,
            rr,
            chosen_lengths=nc,
            rejected_lengths=nr,
            pair_weights=pw,
            sft_logps=full_in[0],
            sft_normalizer=float(nc.sum()),
            **kw,
        )
        g_full = torch.autograd.grad(full, full_in)
        parts_in = [x.clone().requires_grad_() for x in (pc, pr)]
        total = 0.0
        for sl in (slice(0, cut), slice(cut, p)):
            part, _ = dpo_loss(
                parts_in[0][sl],
                parts_in[1][sl],
                rc[sl],
                rr[sl],
                chosen_lengths=nc[sl],
                rejected_lengths=nr[sl],
                pair_weights=pw[sl],
                sft_logps=parts_in[0][sl],
                sft_normalizer=float(nc.sum()),
                **kw,
            )
            total = total + part
        g_parts = torch.autograd.grad(total, parts_in)
        close(total, full, atol=1e-4)
        for a, b in zip(g_parts, g_full):
            close(a, b)


def test_aot_is_not_micro_batch_decomposable():
    pc, pr = torch.tensor([-1.0, -9.0, -4.0, -2.0]), torch.tensor([-8.0, -1.0, -3.0, -7.0])
    rc, rr = torch.tensor([-3.0, -2.0, -6.0, -1.0]), torch.tensor([-2.0, -5.0, -1.0, -4.0])
    full, _ = dpo_loss(pc, pr, rc, rr, loss_type="aot", normalizer=4.0)
    halves = sum(
        dpo_loss(pc[s], pr[s], rc[s], rr[s], loss_type="aot", normalizer=4.0)[0] for s in (slice(0, 2), slice(2, 4))
    )
    assert not torch.allclose(full, halves)


def test_nan_at_masked_slots_changes_nothing():
    t = 6
    lp = torch.randn(4, t)
    m = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]).bool()
    dirty = torch.where(m, lp, torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(t) % 3])
    outs = []
    for x in (torch.where(m, lp, 0.0), dirty):
        x = x.clone().requires_grad_()
        seq = ld_sequence_logps(x, m, torch.tensor([2, 3, 9, 1]), alpha=0.3)
        lc, lr = split_pairs(seq)
        loss, _ = dpo_loss(lc, lr, lc.detach() + 1, lr.detach() - 1, normalizer=2.0)
        (g,) = torch.autograd.grad(loss, x)
        w = wpo_weights(x, torch.where(m, -1.0, math.nan), m)
        outs.append((loss, g, w))
    (l0, g0, w0), (l1, g1, w1) = outs
    assert torch.isfinite(l1) and torch.isfinite(g1).all() and torch.isfinite(w1).all()
    close(l0, l1)
    close(g0, g1)
    close(w0, w1)
    assert (g1[~m] == 0).all()


@PROPS
@given(pairs(), floats(0.05, 1.0))
def test_reward_metrics(batch, beta):
    pc, pr, rc, rr, nc, nr = batch
    _, m = dpo_loss(pc, pr, rc, rr, beta=beta, f_divergence="forward_kl", normalizer="local")
    rcw, rrw = beta * (pc - rc), beta * (pr - rr)  # raw log-ratios, not f-scores
    close(m["rewards/chosen"], rcw.mean())
    close(m["rewards/rejected"], rrw.mean())
    close(m["rewards/margins"], (rcw - rrw).mean())
    close(m["rewards/accuracies"], (rcw > rrw).float().mean())
    close(m["logps/chosen"], pc.mean())
    close(m["logps/rejected"], pr.mean())
    close(m["n_pairs"], float(pc.numel()))


def test_normalizer_forms():
    total = torch.tensor(6.0)
    close(normalize(total, 3, None), 2.0)
    close(normalize(total, torch.tensor(4.0), None), 1.5)
    close(normalize(total, "local", 2), 3.0)
    close(normalize(total, "local", 0), 6.0)  # empty local batch: loss is 0/1, never NaN
    for bad in ("global", 0, -1.0, math.nan, torch.ones(2), True, None):
        with pytest.raises(ValueError):
            normalize(total, bad, 1)
    with pytest.raises(ValueError, match="local"):
        normalize(total, "local", None)
    p = torch.tensor([-1.0])
    with pytest.raises(TypeError):
        dpo_loss(p, p, p, p)  # normalizer is a required keyword


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "robust", "label_smoothing": 0.5}, "robust"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "exo_pair"),
        ({"loss_type": "nca_pair", "f_divergence": "forward_kl"}, "f_divergence"),
        ({"loss_type": ["sigmoid", "aot"], "f_divergence": "js_divergence"}, "f_divergence"),
        ({"f_divergence": "chi2"}, "f_divergence"),
        ({"loss_type": "sft"}, "sft"),
        ({"loss_type": "sft", "sft_logps": torch.tensor([-1.0])}, "sft"),
        ({"loss_type": "aot", "pair_weights": torch.ones(1)}, "pair_weights"),
        ({"loss_type": ["sigmoid", "aot_unpaired"], "pair_weights": torch.ones(1)}, "pair_weights"),
        ({"loss_type": "dpo"}, "unknown"),
        ({"loss_type": []}, "at least one"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_type": "sigmoid_norm"}, "lengths"),
        ({"loss_type": "ipo"}, "lengths"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"beta": 0.0}, "beta"),
    ],
)
def test_dpo_errors(kwargs, match):
    p = torch.tensor([-1.0])
    with pytest.raises(ValueError, match=match):
        dpo_loss(p, p, p, p, normalizer=1.0, **kwargs)


def test_unpaired_losses_are_reexported_from_preference():
    from alignkit.losses import preference, unpaired

    names = ("kto_loss", "kto_reference_point", "mismatched_completions", "kto_weight_ratio", "bco_loss", "BCOState")
    for name in names:
        assert getattr(preference, name) is getattr(unpaired, name)
    with pytest.raises(AttributeError):
        preference.not_a_loss  # noqa: B018


def test_shape_errors_and_split_pairs():
    with pytest.raises(ValueError, match=r"\[P\]"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), normalizer=1.0)
    with pytest.raises(ValueError, match=r"\[P\]"):
        dpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), normalizer=1.0)
    x = torch.arange(6.0).view(6, 1)
    c, r = split_pairs(x)
    assert c.flatten().tolist() == [0, 1, 2] and r.flatten().tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="even"):
        split_pairs(torch.zeros(3))


def test_documented_sigmoid_label_smoothing_is_cdpo():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    z = 0.1 * 2.0
    got, _ = dpo_loss(pc, pr, rc, rr, label_smoothing=0.2, normalizer=1.0)
    close(got, -(0.8 * F.logsigmoid(torch.tensor(z)) + 0.2 * F.logsigmoid(torch.tensor(-z))))


# ----------------------------------------------------------------------------------------------------------------
# Reference-free: SimPO, CPO (+AlphaPO), ORPO — property 31
# ----------------------------------------------------------------------------------------------------------------


@PROPS
@given(pairs(lo=-1.0, hi=1.0), floats(0.05, 3.0), floats(0.0, 0.4), floats(0.0, 2.0))
def test_p31_simpo_equals_cpo(batch, beta, eps, margin):
    c, r = batch[0] / 10, batch[1] / 10  # mean log-probs around −2
    s0, _ = simpo_loss(c, r, beta=beta, margin=0.0, label_smoothing=eps, normalizer="local")
    c0, _ = cpo_loss(c, r, beta=beta, label_smoothing=eps, nll=None, normalizer="local")
    close(s0, c0)
    s, ms = simpo_loss(c, r, beta=beta, margin=margin, label_smoothing=eps, normalizer="local")
    cs, _ = cpo_loss(c, r, loss_type="simpo", beta=beta, margin=margin, label_smoothing=eps, normalizer="local")
    close(s, cs)
    x = beta * (c.double() - r.double()) - margin
    close(s, (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean())
    close(ms["rewards/chosen"], beta * c.mean())


@PROPS
@given(pairs(lo=-1.0, hi=1.0), floats(0.05, 1.0), floats(-1.0, 1.0))
def test_cpo_types_and_alphapo(batch, beta, alpha):
    c, r = batch[0] / 20, batch[1] / 20
    nll = torch.tensor(0.7)
    if abs(alpha) < 1e-3:
        alpha = 0.0
    rw = (lambda x: (1 - torch.exp(x.double()) ** -alpha) / alpha) if alpha else (lambda x: x.double())
    d = rw(c) - rw(r)
    want = {
        "sigmoid": -F.logsigmoid(beta * d),
        "hinge": torch.relu(1 - beta * d),
        "ipo": (d - 1 / (2 * beta)) ** 2,
        "simpo": -F.logsigmoid(beta * d - 0.5),
    }
    for t, w in want.items():
        got, m = cpo_loss(c, r, loss_type=t, beta=beta, alpha=alpha, nll=nll, nll_coef=0.3, normalizer="local")
        close(got, w.mean() + 0.3 * 0.7)
        close(m["rewards/chosen"], beta * rw(c).mean())
    with pytest.raises(ValueError, match="loss_type"):
        cpo_loss(c, r, loss_type="robust", normalizer=1.0)


@PROPS
@given(st.lists(floats(-40.0, -1e-4), min_size=1, max_size=20))
def test_log1mexp_matches_float64_and_has_finite_grads(xs):
    x = torch.tensor(xs).requires_grad_()
    y = log1mexp(x)
    want = torch.log(-torch.expm1(x.detach().double()))
    close(y, want, rtol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()


@PROPS
@given(pairs(lo=-1.0, hi=1.0), floats(0.05, 1.0))
def test_p31_orpo_log_odds_antisymmetric_and_formula(batch, beta):
    c, r = batch[0] / 10, batch[1] / 10
    nll = torch.tensor(1.3)
    loss, m = orpo_loss(c, r, nll, beta=beta, normalizer="local")
    _, m_sw = orpo_loss(r, c, nll, beta=beta, normalizer="local")
    close(m["log_odds_chosen"], -m_sw["log_odds_chosen"])
    cd, rd = c.double(), r.double()
    lo = (cd - rd) - (torch.log1p(-cd.exp()) - torch.log1p(-rd.exp()))
    close(m["log_odds_chosen"], lo.mean())
    close(loss, 1.3 - beta * F.logsigmoid(lo).mean())


# ----------------------------------------------------------------------------------------------------------------
# KTO (property 9) and BCO (property 10)
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def unpaired(draw, min_n=1, max_n=8):
    n = draw(st.integers(min_n, max_n))
    pi = torch.tensor(draw(st.lists(floats(-10, 10), min_size=n, max_size=n))) - 30
    rho = torch.tensor(draw(st.lists(floats(-10, 10), min_size=n, max_size=n))) - 30
    des = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return pi, rho, des


@PROPS
@given(unpaired(), floats(0.05, 1.0), floats(0.0, 3.0), floats(0.1, 3.0), floats(0.1, 3.0))
def test_p9_kto(batch, beta, z0, wd, wu):
    pi, rho, des = batch
    h = (pi - rho).double()
    loss, m = kto_loss(
        pi, rho, des, kl_ref_point=z0, beta=beta, desirable_weight=wd, undesirable_weight=wu, normalizer="local"
    )
    want = torch.where(des, wd * (1 - torch.sigmoid(beta * (h - z0))), wu * (1 - torch.sigmoid(beta * (z0 - h))))
    close(loss, want.mean())
    close(m["kl"], z0)
    # at h = z0 the desirable loss is λ_D / 2
    at, _ = kto_loss(
        rho + z0, rho, torch.ones_like(des), kl_ref_point=z0, beta=beta, desirable_weight=wd, normalizer="local"
    )
    close(at, wd / 2)
    # apo_zero_unpaired ignores z0
    a0, _ = kto_loss(pi, rho, des, kl_ref_point=None, beta=beta, loss_type="apo_zero_unpaired", normalizer=1.0)
    a1, _ = kto_loss(pi, rho, des, kl_ref_point=z0 + 5, beta=beta, loss_type="apo_zero_unpaired", normalizer=1.0)
    close(a0, a1)
    close(a0, torch.where(des, 1 - torch.sigmoid(beta * h), torch.sigmoid(beta * h)).sum())


@PROPS
@given(unpaired(), floats(0.05, 0.5))
def test_kto_gradient_signs_and_detached_reference_point(batch, beta):
    pi, rho, des = batch
    pi = pi.clone().requires_grad_()
    z0 = torch.tensor(0.3, requires_grad=True)
    loss, _ = kto_loss(pi, rho, des, kl_ref_point=z0, beta=beta, normalizer=1.0)
    (g,) = torch.autograd.grad(loss, pi)
    assert (g[des] < 0).all() and (g[~des] > 0).all()
    assert not torch.autograd.grad(loss, z0, allow_unused=True)[0]  # z0 receives no gradient


def test_kto_reference_point_helpers():
    pol, ref = torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-2.0, -6.0, -5.5])
    s, n = kto_reference_point(pol, ref)
    close(s, 1.5)
    close(n, 3.0)
    idx = mismatched_completions(4)
    assert idx.tolist() == [1, 2, 3, 0]
    assert mismatched_completions(4, shift=-1).tolist() == [3, 0, 1, 2]  # TRL's rotation
    with pytest.raises(ValueError):
        mismatched_completions(1)
    with pytest.raises(ValueError):
        mismatched_completions(3, shift=3)
    assert kto_weight_ratio(1.0, 1.0, 30, 20) == pytest.approx(1.5)
    assert kto_weight_ratio(2.0, 3.0, 10, 5) == pytest.approx(20 / 15)
    with pytest.raises(ValueError):
        kto_weight_ratio(1.0, 1.0, 3, 0)
    with pytest.raises(ValueError, match="kl_ref_point"):
        kto_loss(pol, ref, torch.tensor([True, False, True]), kl_ref_point=None, normalizer=1.0)
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(pol, ref, torch.tensor([True, False, True]), kl_ref_point=0.0, loss_type="bco", normalizer=1.0)


@PROPS
@given(
    st.lists(floats(-5, 5), min_size=0, max_size=6),
    st.lists(floats(-5, 5), min_size=0, max_size=6),
    st.lists(floats(-5, 5), min_size=0, max_size=6),
)
def test_p10_bco_state_is_cumulative_mean(a, b, c):
    s = BCOState.initial()
    for chunk in (a, b, c):
        x = torch.tensor(chunk)
        s = update_bco_state(s, x.sum(), torch.tensor(float(x.numel())))
    union = torch.tensor(a + b + c)
    s_union = update_bco_state(BCOState.initial(), union.sum(), torch.tensor(float(union.numel())))
    close(s.mean, s_union.mean, atol=1e-4)
    close(s.count, float(len(a + b + c)))
    close(s.mean, union.double().mean() if union.numel() else 0.0, atol=1e-4)


@PROPS
@given(unpaired(min_n=2), unpaired(min_n=2), floats(0.05, 1.0))
def test_bco_update_then_use(b1, b2, beta):
    st0 = BCOState.initial()
    _, m1, st1 = bco_loss(*b1, st0, beta=beta, normalizer="local")
    r1 = beta * (b1[0] - b1[1]).double()
    close(m1["delta"], r1.mean(), atol=1e-4)  # the first batch already uses its own mean
    loss2, m2, st2 = bco_loss(*b2, st1, beta=beta, normalizer="local")
    r2 = beta * (b2[0] - b2[1]).double()
    delta = torch.cat([r1, r2]).mean()
    close(m2["delta"], delta, atol=1e-4)
    close(st2.count, float(r1.numel() + r2.numel()))
    x = r2 - delta
    close(loss2, torch.where(b2[2], -F.logsigmoid(x), -F.logsigmoid(-x)).mean(), atol=1e-4)
    # eval: no update, δ = stored mean
    _, m_eval, st_eval = bco_loss(*b2, st2, beta=beta, update_state=False, normalizer=1.0)
    close(m_eval["delta"], st2.mean)
    assert st_eval is st2


@PROPS
@given(unpaired(min_n=2), floats(0.05, 1.0), st.data(), st.integers(0, 2**16))
def test_unpaired_micro_batches_are_exact(batch, beta, data, seed):
    torch.manual_seed(seed)
    pi, rho, des = batch
    n = pi.numel()
    cut = data.draw(st.integers(1, n - 1))
    udm = torch.rand(n) + 0.5
    state = BCOState(torch.tensor(0.2), torch.tensor(5.0))
    r = beta * (pi - rho)
    global_stats = (r.sum(), torch.tensor(float(n)))
    full_kto, _ = kto_loss(pi, rho, des, kl_ref_point=0.4, beta=beta, normalizer=float(n))
    full_bco, _, full_state = bco_loss(pi, rho, des, state, beta=beta, udm_weights=udm, normalizer=float(n))
    kto_sum, bco_sum = 0.0, 0.0
    for sl in (slice(0, cut), slice(cut, n)):
        kto_sum = kto_sum + kto_loss(pi[sl], rho[sl], des[sl], kl_ref_point=0.4, beta=beta, normalizer=n)[0]
        part, _, new_state = bco_loss(
            pi[sl], rho[sl], des[sl], state, beta=beta, batch_stats=global_stats, udm_weights=udm[sl], normalizer=n
        )
        bco_sum = bco_sum + part
        close(new_state.mean, full_state.mean)
    close(kto_sum, full_kto)
    close(bco_sum, full_bco)


def test_bco_udm_weights_scale_only_undesirable():
    pi, rho = torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-3.5, -3.0, -5.0])
    des = torch.tensor([True, False, False])
    st0 = BCOState(torch.tensor(0.1), torch.tensor(10.0))
    base, _, _ = bco_loss(pi, rho, des, st0, update_state=False, normalizer=1.0)
    w = torch.tensor([7.0, 2.0, 0.5])
    weighted, _, _ = bco_loss(pi, rho, des, st0, update_state=False, udm_weights=w, normalizer=1.0)
    x = 0.1 * (pi - rho) - 0.1
    terms = torch.stack([-F.logsigmoid(x[0]), -F.logsigmoid(-x[1]), -F.logsigmoid(-x[2])])
    close(base, terms.sum())
    close(weighted, terms[0] + 2.0 * terms[1] + 0.5 * terms[2])


# ----------------------------------------------------------------------------------------------------------------
# Property 32: metrics are detached tensors, no host sync
# ----------------------------------------------------------------------------------------------------------------


def test_p32_metrics_detached_and_no_item(monkeypatch):
    def boom(self):
        raise AssertionError("Tensor.item called inside a loss")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    g = lambda *s: (torch.randn(*s) - 5).requires_grad_()
    pc, pr, rc, rr, n = g(3), g(3), torch.randn(3) - 5, torch.randn(3) - 5, torch.tensor([2, 3, 4])
    outs = [
        dpo_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=list(LOSS_TYPES),
            label_smoothing=0.1,
            chosen_lengths=n,
            rejected_lengths=n,
            sft_logps=pc,
            sft_normalizer=torch.tensor(9.0),
            normalizer="local",
        ),
        simpo_loss(pc / 5, pr / 5, normalizer="local"),
        cpo_loss(pc / 5, pr / 5, alpha=0.5, nll=pc.mean(), normalizer=torch.tensor(3.0)),
        orpo_loss(pc / 5, pr / 5, -pc.mean(), normalizer="local"),
        kto_loss(pc, rc, torch.tensor([True, False, True]), kl_ref_point=torch.tensor(0.1), normalizer="local"),
        bco_loss(pc, rc, torch.tensor([True, False, True]), BCOState.initial(), normalizer="local")[:2],
    ]
    for loss, metrics in outs:
        assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
        assert metrics
        for k, v in metrics.items():
            assert isinstance(v, torch.Tensor) and not v.requires_grad, k
        loss.backward()


def test_bf16_inputs_give_fp32_loss():
    x = torch.tensor([-3.0, -4.0], dtype=torch.bfloat16)
    loss, _ = dpo_loss(x, x - 1, x, x, normalizer="local")
    assert loss.dtype == torch.float32
    close(loss, -F.logsigmoid(torch.tensor(0.1)), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Learning: a few Adam steps of sigmoid DPO on a tiny random Llama separate chosen from rejected
# ----------------------------------------------------------------------------------------------------------------


def _sequence_logps(model, ids, mask):
    """Summed completion log-probs, naive: log_softmax over the vocab, gather the next token."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    tok = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.where(mask[:, 1:], tok, 0.0).sum(-1)


@pytest.mark.slow
def test_learning_dpo_separates_chosen_from_rejected():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    policy = transformers.LlamaForCausalLM(cfg)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    p, prompt_len, comp_len = 4, 4, 6
    prompts = torch.randint(3, 48, (p, prompt_len))
    chosen, rejected = torch.randint(3, 48, (p, comp_len)), torch.randint(3, 48, (p, comp_len))
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt_len:] = True
    mask[[1, 5], -2:] = False  # a couple of shorter completions (right padding)
    with torch.no_grad():
        ref_c, ref_r = split_pairs(_sequence_logps(ref, ids, mask))

    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        pol_c, pol_r = split_pairs(_sequence_logps(policy, ids, mask))
        loss, m = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1, normalizer="local")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.detach(), m))
    first_loss, first = history[0]
    close(first_loss, math.log(2))  # policy = reference at step 0
    close(first["rewards/margins"], 0.0)
    with torch.no_grad():
        pol_c, pol_r = split_pairs(_sequence_logps(policy, ids, mask))
        final_loss, final = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1, normalizer="local")
    assert final["rewards/margins"] > 0.5
    assert final["rewards/accuracies"] == 1.0
    assert final_loss < 0.5 * math.log(2)
