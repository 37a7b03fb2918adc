"""Tests for alignkit.losses.reward (docs/LOSSES.md §6; §9 items 11, 12, 32)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.data.prm import prm_labels
from alignkit.losses.reward import (
    STEP_AGGREGATIONS,
    aggregate_step_scores,
    bradley_terry_loss,
    prm_loss,
    reward_loss,
)
from tests.conftest import close

PROPS = settings(max_examples=40, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def reward_pairs(draw, lo=-20.0, hi=20.0, min_p=1, max_p=8):
    p = draw(st.integers(min_p, max_p))
    rc = torch.tensor(draw(st.lists(floats(lo, hi), min_size=p, max_size=p)))
    rr = torch.tensor(draw(st.lists(floats(lo, hi), min_size=p, max_size=p)))
    return rc, rr


# ----------------------------------------------------------------------------------------------------------------
# Bradley-Terry (property 11)
# ----------------------------------------------------------------------------------------------------------------


@PROPS
@given(reward_pairs(), floats(-3.0, 3.0), floats(0.0, 0.5))
def test_p11_bradley_terry(pair, margin, coef):
    rc, rr = pair
    x = (rc - rr).double()
    loss, m = bradley_terry_loss(rc, rr, normalizer="local")
    close(loss, torch.log1p(torch.exp(-x)).mean())  # −logσ(x) = log1p(e^{−x}) ("LogExp")
    # a margin m is the same as shifting r_c by −m
    shifted, _ = bradley_terry_loss(rc - margin, rr, normalizer="local")
    close(bradley_terry_loss(rc, rr, margin=margin, normalizer="local")[0], shifted)
    per_pair_margin = torch.full_like(rc, margin)
    close(bradley_terry_loss(rc, rr, margin=per_pair_margin, normalizer="local")[0], shifted)
    # ties cost log 2
    close(bradley_terry_loss(rc, rc, normalizer="local")[0], math.log(2))
    # centering penalty
    centred, _ = bradley_terry_loss(rc, rr, center_coef=coef, normalizer="local")
    close(centred, loss + coef * ((rc.double() + rr.double()) ** 2).mean(), rtol=2e-4)
    close(m["accuracy"], (rc > rr).double().mean())
    close(m["margin"], x.mean())
    close(m["rewards/chosen"], rc.mean())
    close(m["rewards/rejected"], rr.mean())
    assert reward_loss is bradley_terry_loss


@PROPS
@given(reward_pairs(lo=-8.0, hi=8.0))
def test_bradley_terry_gradient_signs(pair):
    rc, rr = (t.clone().requires_grad_() for t in pair)
    loss, _ = bradley_terry_loss(rc.unsqueeze(-1), rr.unsqueeze(-1), normalizer=1.0)  # [P,1] heads accepted
    gc, gr = torch.autograd.grad(loss, (rc, rr))
    assert (gc < 0).all() and (gr > 0).all()


def test_bradley_terry_extreme_gaps_are_finite():
    rc = torch.tensor([200.0, -200.0], requires_grad=True)
    loss, _ = bradley_terry_loss(rc, torch.zeros(2), normalizer="local")
    (g,) = torch.autograd.grad(loss, rc)
    close(loss, 100.0)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2, 2), torch.zeros(2, 2), normalizer=1.0)
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3), normalizer=1.0)


@PROPS
@given(reward_pairs(min_p=2), st.data())
def test_bradley_terry_micro_batches_exact(pair, data):
    rc, rr = pair
    p = rc.numel()
    cut = data.draw(st.integers(1, p - 1))
    full, _ = bradley_terry_loss(rc, rr, center_coef=0.01, normalizer=p)
    parts = sum(
        bradley_terry_loss(rc[s], rr[s], center_coef=0.01, normalizer=p)[0] for s in (slice(0, cut), slice(cut, p))
    )
    close(parts, full)


# ----------------------------------------------------------------------------------------------------------------
# PRM labels and loss
# ----------------------------------------------------------------------------------------------------------------


def test_prm_labels_placement():
    # prompt of 3, steps of 2 and 1 tokens, separator of 2: [p p p | s s S S | s S S]
    labels = prm_labels([2, 1], sep_len=2, prompt_len=3, step_labels=[1, 0])
    assert labels.tolist() == [-100] * 6 + [1] + [-100] * 2 + [0]
    last = prm_labels([2, 1], sep_len=2, prompt_len=3, step_labels=[1, 0], train_on_last_step_only=True)
    assert last.tolist() == [-100] * 9 + [0]
    cut = prm_labels([2, 1], sep_len=2, prompt_len=3, step_labels=[1, 0], max_len=9)  # 2nd separator truncated
    assert cut.tolist() == [-100] * 6 + [1] + [-100] * 2
    assert prm_labels([0, 3], sep_len=1, prompt_len=0, step_labels=[True, False]).tolist() == [1, -100, -100, -100, 0]
    for bad in (
        dict(step_token_counts=[1], step_labels=[1, 0]),
        dict(step_token_counts=[0], step_labels=[1], sep_len=0),
        dict(step_token_counts=[2], step_labels=[2]),
        dict(step_token_counts=[2], step_labels=[1], sep_len=-1),
    ):
        kw = {"sep_len": 1, "prompt_len": 2, **bad}
        with pytest.raises(ValueError):
            prm_labels(**kw)


@PROPS
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1)), min_size=1, max_size=6),
    st.integers(1, 3),
    st.integers(0, 5),
    st.one_of(st.none(), st.integers(0, 40)),
)
def test_prm_labels_properties(steps, sep_len, prompt_len, max_len):
    counts, values = [c for c, _ in steps], [v for _, v in steps]
    labels = prm_labels(counts, sep_len, prompt_len, values, max_len=max_len)
    full = prompt_len + sum(c + sep_len for c in counts)
    assert labels.numel() == (full if max_len is None else min(full, max_len))
    pos, end = [], prompt_len
    for c in counts:
        end += c + sep_len
        pos.append(end - 1)  # last token of step + separator
    kept = [(p, v) for p, v in zip(pos, values) if p < labels.numel()]
    assert (labels != -100).nonzero().flatten().tolist() == [p for p, _ in kept]
    assert [int(labels[p]) for p, _ in kept] == [v for _, v in kept]
    assert (labels[:prompt_len] == -100).all()


@st.composite
def prm_batch(draw):
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, 2, generator=g) * 3
    labels = torch.randint(0, 2, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.5] = -100
    soft = torch.rand(b, t, generator=g)
    return logits, labels, soft


@PROPS
@given(prm_batch())
def test_prm_loss_hard_and_soft(batch):
    logits, labels, soft = batch
    valid = labels != -100
    n = int(valid.sum())
    loss, m = prm_loss(logits, labels, normalizer="local")
    ce = F.cross_entropy(logits.reshape(-1, 2).double(), labels.reshape(-1), ignore_index=-100, reduction="sum")
    close(loss, ce / max(n, 1))
    close(m["n_steps"], float(n))
    pred = logits.argmax(-1)
    close(m["accuracy"], ((pred == labels) & valid).sum() / max(n, 1))
    # soft labels: target [1−q, q]; q ∈ {0, 1} reproduces the hard loss
    close(prm_loss(logits, labels, soft_labels=labels.clamp_min(0).float(), normalizer="local")[0], loss)
    got, _ = prm_loss(logits, labels, soft_labels=soft, normalizer=1.0)
    lp = torch.log_softmax(logits.double(), -1)
    want = -((1 - soft.double()) * lp[..., 0] + soft.double() * lp[..., 1])
    close(got, want[valid].sum())


def test_prm_loss_ignores_nan_at_unlabelled_positions():
    logits = torch.randn(2, 5, 2)
    labels = torch.tensor([[-100, 1, -100, 0, -100], [0, -100, -100, -100, 1]])
    dirty = logits.clone()
    dirty[labels == -100] = torch.tensor([math.nan, math.inf])
    out = []
    for x in (logits, dirty):
        x = x.clone().requires_grad_()
        loss, _ = prm_loss(x, labels, soft_labels=torch.full((2, 5), 0.7), normalizer=4.0)
        (g,) = torch.autograd.grad(loss, x)
        out.append((loss, g))
    close(out[0][0], out[1][0])
    close(out[0][1], out[1][1])
    assert (out[1][1][labels == -100] == 0).all()


@PROPS
@given(prm_batch(), st.data())
def test_prm_loss_micro_batches_exact(batch, data):
    logits, labels, _ = batch
    b = logits.shape[0]
    if b < 2:
        return
    cut = data.draw(st.integers(1, b - 1))
    d = torch.tensor(7.0)
    full, _ = prm_loss(logits, labels, normalizer=d)
    parts = (
        prm_loss(logits[:cut], labels[:cut], normalizer=d)[0] + prm_loss(logits[cut:], labels[cut:], normalizer=d)[0]
    )
    close(parts, full)


def test_prm_loss_errors():
    with pytest.raises(ValueError, match="2 classes"):
        prm_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.long), normalizer=1.0)
    with pytest.raises(ValueError, match="match"):
        prm_loss(torch.zeros(2, 3, 2), torch.zeros(2, 4, dtype=torch.long), normalizer=1.0)
    with pytest.raises(ValueError, match="soft_labels"):
        prm_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.long), soft_labels=torch.zeros(3), normalizer=1.0)
    with pytest.raises(ValueError, match="normalizer"):
        prm_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.long), normalizer="global")


# ----------------------------------------------------------------------------------------------------------------
# Step aggregation (property 12)
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def step_scores(draw):
    n, k = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    s = torch.tensor(draw(st.lists(floats(1e-3, 1.0), min_size=n * k, max_size=n * k))).view(n, k)
    m = torch.tensor(draw(st.lists(st.booleans(), min_size=n * k, max_size=n * k))).view(n, k)
    return s, m


@PROPS
@given(step_scores())
def test_p12_aggregation_order_and_values(batch):
    s, m = batch
    agg = {how: aggregate_step_scores(s, m, how) for how in STEP_AGGREGATIONS}
    for i in range(s.shape[0]):
        v = s[i][m[i]].double()
        if v.numel() == 0:
            assert all(torch.isnan(a[i]) for a in agg.values())
            continue
        close(agg["min"][i], v.min())
        close(agg["prod"][i], v.prod())
        close(agg["mean"][i], v.mean())
        close(agg["last"][i], v[-1])
        close(agg["geo_mean"][i], v.log().mean().exp())
        tol = 1e-6
        assert agg["prod"][i] <= agg["min"][i] + tol
        assert agg["min"][i] <= agg["geo_mean"][i] + tol
        assert agg["geo_mean"][i] <= agg["mean"][i] + tol
        assert agg["mean"][i] <= v.max() + tol
        assert v.min() - tol <= agg["last"][i] <= v.max() + tol


@PROPS
@given(step_scores())
def test_aggregation_log_space_matches(batch):
    s, m = batch
    for how in STEP_AGGREGATIONS:
        plain = aggregate_step_scores(s, m, how)
        logged = aggregate_step_scores(s.log(), m, how, log_space=True)
        torch.testing.assert_close(logged.exp(), plain, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_aggregation_masked_garbage_and_errors():
    s = torch.tensor([[0.9, 0.5, 0.7], [0.3, 0.8, 0.6]])
    m = torch.tensor([[True, False, True], [False, True, False]])
    dirty = torch.where(m, s, torch.tensor(math.nan))
    for how in STEP_AGGREGATIONS:
        out = []
        for x in (s, dirty):
            x = x.clone().requires_grad_()
            y = aggregate_step_scores(x, m, how)
            (g,) = torch.autograd.grad(y.sum(), x)
            out.append((y, g))
        close(out[0][0], out[1][0])
        close(out[0][1], out[1][1])
        assert torch.isfinite(out[1][1]).all() and (out[1][1][~m] == 0).all(), how
    assert aggregate_step_scores(s, m, "last").tolist() == pytest.approx([0.7, 0.8])
    assert torch.isnan(aggregate_step_scores(s, torch.zeros_like(m), "mean")).all()
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_step_scores(s, m, "max")
    with pytest.raises(ValueError, match="match"):
        aggregate_step_scores(s, m[:, :2], "min")


# ----------------------------------------------------------------------------------------------------------------
# Property 32
# ----------------------------------------------------------------------------------------------------------------


def test_p32_metrics_detached_and_no_item(monkeypatch):
    def boom(self):
        raise AssertionError("Tensor.item called inside a loss")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    rc, rr = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    logits = torch.randn(2, 5, 2, requires_grad=True)
    labels = torch.tensor([[-100, 1, -100, 0, 1], [0, -100, -100, -100, 1]])
    for loss, metrics in (
        bradley_terry_loss(rc, rr, margin=torch.rand(4), center_coef=0.1, normalizer="local"),
        prm_loss(logits, labels, normalizer="local"),
        prm_loss(logits, labels, soft_labels=torch.rand(2, 5), normalizer=torch.tensor(3.0)),
    ):
        assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad
        for k, v in metrics.items():
            assert isinstance(v, torch.Tensor) and not v.requires_grad, k
        loss.backward()
