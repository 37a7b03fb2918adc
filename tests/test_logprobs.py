"""Tests for alignkit.logprobs (docs/LOSSES.md §2; §9 items 24 and 28).

References are built from full logits (``log_softmax`` + gather) and compared with the row-chunked, the
vocab-tiled and the model-level paths: values and gradients for hidden, weight and bias.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from alignkit.logprobs import EXTRAS, chunked_token_logps, entropy_from_logits, token_logps
from alignkit.losses.preference import ld_sequence_logps
from alignkit.ops import (
    count_sequences,
    count_tokens,
    masked_mean,
    masked_sum,
    masked_var,
    segment_sum,
    sequence_logps,
    whiten,
)
from alignkit.scoring import model_token_logps

PROPS = settings(max_examples=40, deadline=None)
ATOL, RTOL = 1e-5, 1e-4
FLOAT_OUTS = ("logps", "entropy", "log_sum_sq_probs", "mean_logp")


pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def head_logits(h, W, b=None, *, tau=1.0, scale=1.0, softcap=None):
    z = h @ W.T if b is None else h @ W.T + b
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / tau


def naive_outputs(z, y):
    """All outputs from full logits ``z[N,V]``, written independently of the library (−Σ p log p etc.)."""
    lp = torch.log_softmax(z, dim=-1)
    valid = y >= 0
    keep = lambda x: torch.where(valid, x, 0.0)
    return {
        "logps": keep(lp.gather(1, y.clamp(min=0)[:, None]).squeeze(1)),
        "entropy": keep(-(lp.exp() * lp).sum(-1)),
        "log_sum_sq_probs": keep(torch.log((2 * lp).exp().sum(-1))),
        "mean_logp": keep(lp.mean(-1)),
        # ties count: the target attains the maximum (saturated softcaps give exact ties)
        "is_top1": valid & (z.gather(1, y.clamp(min=0)[:, None]).squeeze(1) >= z.max(-1).values),
    }


def clear_top1_rows(z, y):
    """Rows whose target is not within float noise of a tie for the maximum: is_top1 is decidable there."""
    zt = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    others = z.scatter(1, y.clamp(min=0)[:, None], float("-inf")).max(-1).values
    return (zt - others).abs() > 1e-5 * (1 + zt.abs())


def weighted_sum(outs, coefs):
    return sum((coefs[k] * outs[k]).sum() for k in FLOAT_OUTS if k in outs)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


# --------------------------------------------------------------------------------------------------------
# chunked_token_logps
# --------------------------------------------------------------------------------------------------------


@st.composite
def head_cases(draw):
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "N": draw(st.integers(1, 40)),
        "H": draw(st.integers(1, 12)),
        "V": draw(st.integers(2, 60)),
        "token_chunk": draw(st.integers(1, 48)),
        "vocab_chunk": draw(st.one_of(st.none(), st.integers(1, 64))),
        "tau": draw(st.floats(0.3, 2.0)),
        "scale": draw(st.sampled_from([1.0, 0.5, 1.7])),
        "softcap": draw(st.one_of(st.none(), st.floats(1.0, 30.0))),
        "bias": draw(st.booleans()),
        "extras": tuple(draw(st.lists(st.sampled_from(EXTRAS), unique=True))),
    }


@PROPS
@given(head_cases())
# saturated softcap (1.0) with scale 1.7: several logits round to exactly 1.0, and per-row tiles (token_chunk=1)
# round differently from the full matmul; is_top1 is compared only where it is decidable (found in CI)
@example(
    {
        "seed": 0,
        "N": 30,
        "H": 10,
        "V": 6,
        "token_chunk": 1,
        "vocab_chunk": None,
        "tau": 1.0,
        "scale": 1.7,
        "softcap": 1.0,
        "bias": False,
        "extras": ("entropy", "log_sum_sq_probs", "mean_logp", "is_top1"),
    }
)
# logits up to ~90 (tau 0.375, scale 1.7): the fp32 round-off of the logits, amplified by the entropy terms
# p·(z − E z), puts the full-logits fp32 h-gradient 4e-5 off the exact one (found by random exploration)
@example(
    {
        "seed": 0,
        "N": 37,
        "H": 12,
        "V": 36,
        "token_chunk": 1,
        "vocab_chunk": None,
        "tau": 0.375,
        "scale": 1.7,
        "softcap": None,
        "bias": True,
        "extras": ("entropy",),
    }
)
def test_chunked_matches_full_logits(case):
    # Tiling rows and vocab (online logsumexp) is an exact rewrite of the full-logits formulas, so on fp64 inputs the
    # two agree to fp64 round-off. In fp32 both carry the logits' rounding (~|h|·|W|·ε₃₂ each), which entropy and
    # gradients amplify by up to |z|; there the claim is that the chunked path is as accurate as the full-logits one:
    # its error against the fp64 values of the same inputs is within 8x the full-logits fp32 error (+ ATOL/RTOL).
    N = case["N"]
    y, out64, grads64, ref64, ref_grads64, z64 = _chunked_and_full(case, torch.float64)
    _, out32, grads32, ref32, ref_grads32, z32 = _chunked_and_full(case, torch.float32)
    for out, ref, z, dtype in ((out64, ref64, z64, torch.float64), (out32, ref32, z32, torch.float32)):
        assert set(out) == {"logps", *case["extras"]}
        for k, v in out.items():
            assert v.shape == (N,)
            if k == "is_top1":
                assert v.dtype == torch.bool and not v.requires_grad
                clear = clear_top1_rows(z, y)
                assert torch.equal(v[clear], ref[k][clear])
            else:
                assert v.dtype == dtype
    floats = [k for k in out64 if k != "is_top1"]
    for k in floats:
        close(out64[k], ref64[k], atol=1e-9, rtol=1e-7)
        as_accurate_as(out32[k], ref32[k], exact=ref64[k])
    for gc, gr in zip(grads64, ref_grads64):
        close(gc, gr, atol=1e-9, rtol=1e-7)
    for gc, gr, exact in zip(grads32, ref_grads32, ref_grads64):
        as_accurate_as(gc, gr, exact=exact)


def _chunked_and_full(case, dtype):
    """Targets, chunked outputs and parameter gradients of a random head, the same from full logits, and the logits,
    in `dtype`. The
    inputs are drawn in fp32 and cast, so the fp64 run holds the exact values of the fp32 run's inputs."""
    g = torch.Generator().manual_seed(case["seed"])
    N, H, V = case["N"], case["H"], case["V"]
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    W = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if case["bias"] else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.2] = -100
    coefs = {k: torch.randn(N, generator=g).to(dtype) for k in FLOAT_OUTS}
    kw = {"tau": case["tau"], "scale": case["scale"], "softcap": case["softcap"]}
    params = [t for t in (h, W, b) if t is not None]

    out = chunked_token_logps(
        h,
        W,
        y,
        bias=b,
        temperature=kw["tau"],
        logit_scale=kw["scale"],
        softcap=kw["softcap"],
        token_chunk=case["token_chunk"],
        vocab_chunk=case["vocab_chunk"],
        extras=case["extras"],
    )
    z = head_logits(h, W, b, **kw)
    ref = {k: v for k, v in naive_outputs(z, y).items() if k in out}
    grads = grads_of(weighted_sum(out, coefs), params)
    ref_grads = grads_of(weighted_sum(ref, coefs), params)
    detach = lambda d: {k: v.detach() for k, v in d.items()}
    return y, detach(out), grads, detach(ref), ref_grads, z.detach()


def as_accurate_as(got, ref, *, exact, factor=8.0):
    """`got` (fp32) is within ATOL/RTOL of `exact` (fp64) plus `factor` times the largest error of `ref`, the same
    quantity computed the straightforward way in fp32: the round-off the inputs' conditioning imposes on fp32."""
    exact = exact.double()
    ref_err = (ref.double() - exact).abs().max() if ref.numel() else 0.0
    close(got, exact, atol=ATOL + factor * float(ref_err), rtol=RTOL)


def test_chunked_gradcheck_fp64_all_extras():
    # Analytic gradients of every float output at once (and fp64 in, fp64 out).
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 13, (11,), generator=g)
    y[2] = -100

    def f(h, W, b):
        o = chunked_token_logps(
            h, W, y, bias=b, temperature=0.7, logit_scale=1.3, softcap=2.5, token_chunk=4, vocab_chunk=5, extras=EXTRAS
        )
        return tuple(o[k] for k in FLOAT_OUTS)

    assert f(h, W, b)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, (h, W, b))


def test_chunked_kept_logits_equal_recomputed_and_skip_the_recompute(monkeypatch):
    """keep_logits_mb: backward reuses forward's tiles (no _tile_logits call in backward) and gives the same
    gradients bit for bit; a second backward (retain_graph) recomputes; over budget it recomputes."""
    import alignkit.logprobs as lp

    g = torch.Generator().manual_seed(3)
    h = torch.randn(23, 8, generator=g, requires_grad=True)
    W = torch.randn(37, 8, generator=g, requires_grad=True)
    b = torch.randn(37, generator=g, requires_grad=True)
    y = torch.randint(0, 37, (23,), generator=g)
    y[4] = -100
    calls = {"n": 0}
    real = lp._tile_logits

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lp, "_tile_logits", counting)
    coefs = {k: torch.randn(23, generator=g) for k in FLOAT_OUTS}

    def run(keep_mb: float, retain: bool = False):
        calls["n"] = 0
        o = chunked_token_logps(h, W, y, bias=b, temperature=0.8, softcap=3.0, token_chunk=5, vocab_chunk=10,
                                extras=EXTRAS, keep_logits_mb=keep_mb)  # fmt: skip
        loss = weighted_sum(o, coefs)
        n_fwd = calls["n"]
        out = [torch.autograd.grad(loss, (h, W, b), retain_graph=retain)]
        if retain:
            out.append(grads_of(loss, (h, W, b)))
        return out, n_fwd, calls["n"] - n_fwd

    size_mb = 23 * 37 * 4 / 2**20
    (base,), fwd, bwd = run(0.0)
    assert bwd == fwd == 5 * 4  # 5 token tiles x 4 vocab tiles, recomputed in backward
    (kept,), fwd, bwd = run(size_mb * 1.01)
    assert fwd == 20 and bwd == 0
    for x, z in zip(base, kept):
        assert torch.equal(x, z)
    (over,), _, bwd = run(size_mb * 0.99)
    assert bwd == 20
    (first, second), _, bwd = run(1.0, retain=True)
    assert bwd == 20  # only the second backward recomputes
    for x, z, w in zip(base, first, second):
        assert torch.equal(x, z) and torch.equal(x, w)


def test_chunked_tied_head_accumulates_both_uses():
    # Tied embeddings: the same matrix embeds the inputs and scores the outputs; both gradient paths count.
    g = torch.Generator().manual_seed(1)
    V, H, N = 23, 6, 17
    E = torch.randn(V, H, generator=g).requires_grad_()
    A = torch.randn(H, H, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    hidden = lambda: torch.tanh(E[ids] @ A)
    out = chunked_token_logps(hidden(), E, y, token_chunk=5, vocab_chunk=7, extras=("entropy",))
    ref = naive_outputs(hidden() @ E.T, y)
    coefs = {"logps": torch.randn(N, generator=g), "entropy": torch.randn(N, generator=g)}
    (g_out,) = grads_of(weighted_sum(out, coefs), [E])
    (g_ref,) = grads_of(weighted_sum({k: ref[k] for k in out}, coefs), [E])
    close(g_out, g_ref)


def test_chunked_half_precision_weight_accumulates_in_fp32():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(30, 16, generator=g).bfloat16().requires_grad_()
    W = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, 40, (30,), generator=g)
    out = chunked_token_logps(h, W, y, token_chunk=7, vocab_chunk=9)["logps"]
    assert out.dtype == torch.float32
    ref = naive_outputs(h.detach().float() @ W.detach().float().T, y)["logps"]
    close(out, ref)  # fp32 math on the bf16 inputs: no bf16 rounding of the logits
    out.sum().backward()
    assert h.grad.dtype == W.grad.dtype == torch.bfloat16


def test_chunked_ignored_rows_are_nan_safe():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 4, generator=g)
    W = torch.randn(11, 4, generator=g).requires_grad_()
    y = torch.randint(0, 11, (9,), generator=g)
    y[[1, 5]] = -100
    bad = h.clone()
    bad[1] = float("nan")
    bad[5] = float("inf")
    results = []
    for hid in (h, bad):
        hid = hid.clone().requires_grad_()
        out = chunked_token_logps(hid, W, y, token_chunk=4, extras=("entropy", "log_sum_sq_probs", "mean_logp"))
        gh, gW = grads_of(weighted_sum(out, {k: torch.ones(9) for k in FLOAT_OUTS}), [hid, W])
        results.append((out, gh, gW))
    (o1, gh1, gW1), (o2, gh2, gW2) = results
    for k in o1:
        assert torch.equal(o1[k], o2[k])
        assert torch.all(o2[k][[1, 5]] == 0)
    assert torch.equal(gh1, gh2) and torch.equal(gW1, gW2)
    assert torch.all(gh2[[1, 5]] == 0)


def test_chunked_rejects_bad_arguments():
    h, W, y = torch.randn(3, 2), torch.randn(4, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError):
        chunked_token_logps(h, W, y, extras=("nope",))
    with pytest.raises(ValueError):
        chunked_token_logps(h, W, y, temperature=0.0)


def test_chunked_empty_selection():
    h = torch.randn(0, 4, requires_grad=True)
    W = torch.randn(7, 4, requires_grad=True)
    out = chunked_token_logps(h, W, torch.zeros(0, dtype=torch.long), extras=("entropy",))
    assert out["logps"].shape == (0,)
    out["logps"].sum().backward()
    assert torch.equal(W.grad, torch.zeros_like(W))


# --------------------------------------------------------------------------------------------------------
# token_logps / entropy_from_logits
# --------------------------------------------------------------------------------------------------------


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 4),
    T=st.integers(1, 9),
    V=st.integers(2, 30),
    tau=st.floats(0.3, 2.0),
)
def test_token_logps_matches_shifted_log_softmax(seed, B, T, V, tau):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    ell, m = token_logps(logits, labels, temperature=tau)
    assert ell.shape == m.shape == (B, T) and m.dtype == torch.bool
    lp = torch.log_softmax(logits / tau, dim=-1)
    ref_m = torch.zeros(B, T, dtype=torch.bool)
    ref_m[:, 1:] = labels[:, 1:] != -100
    picked = lp[:, :-1].gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    ref = torch.where(ref_m, torch.cat([lp.new_zeros(B, 1), picked], dim=1), 0.0) + 0 * lp.sum()
    assert torch.equal(m, ref_m)
    close(ell, ref)
    c = torch.randn(B, T, generator=g)
    grad = lambda x: torch.autograd.grad((c * x).sum(), logits, allow_unused=True, materialize_grads=True)[0]
    close(grad(ell), grad(ref))


def test_token_logps_gradcheck_and_dtype():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 2] = -100
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels, temperature=0.8)[0], (logits,))
    bf = logits.detach().bfloat16().requires_grad_()
    ell, _ = token_logps(bf, labels)
    assert ell.dtype == torch.float32
    ell.sum().backward()
    assert bf.grad.dtype == torch.bfloat16


def test_token_logps_nan_logits_at_ignored_positions():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, 3] = -100  # so logits[0, 2] predict nothing
    bad = logits.clone()
    bad[0, 2] = float("nan")
    bad[:, -1] = float("inf")  # the last position never predicts anything
    outs = []
    for x in (logits, bad):
        x = x.clone().requires_grad_()
        ell, _ = token_logps(x, labels)
        outs.append((ell, torch.autograd.grad(ell.sum(), x)[0]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    assert torch.all(outs[1][1][0, 2] == 0)


def test_entropy_from_logits_value_grad_and_neg_inf():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 8, generator=g, dtype=torch.float64).requires_grad_()
    H = entropy_from_logits(z)
    p = torch.softmax(z, -1)
    close(H, -(p * p.log()).sum(-1))
    (grad,) = torch.autograd.grad(H.sum(), z)
    ez = (p * z).sum(-1, keepdim=True)
    close(grad, -p * (z - ez))  # ∂H/∂z_v = −p_v(z_v − E_p z)
    zi = z.detach().clone()
    zi[:, :3] = float("-inf")
    zi.requires_grad_()
    Hi = entropy_from_logits(zi)
    close(Hi, entropy_from_logits(zi.detach()[:, 3:]))
    (gi,) = torch.autograd.grad(Hi.sum(), zi)
    assert torch.isfinite(gi).all() and torch.all(gi[:, :3] == 0)


# --------------------------------------------------------------------------------------------------------
# model_token_logps on tiny Hugging Face models
# --------------------------------------------------------------------------------------------------------


def tiny_model(arch="llama", **extra):
    import transformers as tf

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16, "final_logit_softcapping": 3.0}),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.4}),
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 4.0}),
    }
    cfg_cls, model_cls, arch_kw = classes[arch]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**common, **arch_kw, **extra)).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere", "granite"])
def test_model_token_logps_matches_hf_logits_padded(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    attn[2, 5:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :3] = -100  # a "prompt"
    params = [p for p in model.parameters() if p.requires_grad]

    out = model_token_logps(model, ids, labels, attention_mask=attn, extras=("entropy",), temperature=0.9)
    logits = model(input_ids=ids, attention_mask=attn).logits
    ref, ref_m = token_logps(logits, labels, temperature=0.9)
    ref_h = torch.cat([torch.zeros(3, 1), entropy_from_logits(logits[:, :-1] / 0.9)], dim=1)
    assert torch.equal(out["mask"], ref_m)
    close(out["logps"], ref)
    close(out["entropy"], torch.where(ref_m, ref_h, 0.0))
    c = torch.randn(3, 12, generator=g)
    g_out = grads_of((c * out["logps"]).sum() + out["entropy"].sum(), params)
    g_ref = grads_of((c * ref).sum() + torch.where(ref_m, ref_h, 0.0).sum(), params)
    for a, b in zip(g_out, g_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            close(a, b)


def test_model_token_logps_packed_equals_padded():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(8)
    lengths = [5, 9, 4]
    docs = [torch.randint(0, 300, (n,), generator=g) for n in lengths]
    doc_labels = [d.clone() for d in docs]
    doc_labels[1][:3] = -100  # a prompt inside the second document

    T = max(lengths)
    ids = torch.zeros(len(docs), T, dtype=torch.long)
    labels = torch.full((len(docs), T), -100)
    attn = torch.zeros(len(docs), T, dtype=torch.long)
    for i, (d, lab) in enumerate(zip(docs, doc_labels)):
        ids[i, : len(d)], labels[i, : len(d)], attn[i, : len(d)] = d, lab, 1
    padded = model_token_logps(model, ids, labels, attention_mask=attn, extras=("mean_logp",))

    packed_labels = torch.cat([torch.cat([lab.new_full((1,), -100), lab[1:]]) for lab in doc_labels])[None]
    packed = model_token_logps(
        model,
        torch.cat(docs)[None],
        packed_labels,
        position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        extras=("mean_logp",),
    )
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    assert not packed["mask"][0, starts].any()
    for i, n in enumerate(lengths):
        sl = slice(int(starts[i]), int(starts[i]) + n)
        assert torch.equal(packed["mask"][0, sl], padded["mask"][i, :n])
        for k in ("logps", "mean_logp"):
            close(packed[k][0, sl], padded[k][i, :n])


# --------------------------------------------------------------------------------------------------------
# Masked ops
# --------------------------------------------------------------------------------------------------------


@st.composite
def masked_tensors(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.rand(B, T, generator=g) < draw(st.floats(0.0, 1.0))
    return x, m


def poisoned(x, m):
    return torch.where(m, x, torch.tensor(float("nan"), dtype=x.dtype))


@PROPS
@given(masked_tensors(), st.booleans())
def test_masked_reductions_match_selection(xm, float_mask):
    x, m = xm
    mk = m.double() if float_mask else m
    xp = poisoned(x, m).requires_grad_()
    sel = x[m]
    close(masked_sum(xp, mk), sel.sum())
    close(masked_mean(xp, mk), sel.sum() / max(sel.numel(), 1))
    close(masked_sum(xp, mk, dim=1), torch.where(m, x, 0.0).sum(1))
    close(masked_mean(xp, mk, dim=1), torch.where(m, x, 0.0).sum(1) / m.sum(1).clamp(min=1))
    if sel.numel() >= 2:
        close(masked_var(xp, mk), sel.var(unbiased=True))
        close(masked_var(xp, mk, unbiased=False), sel.var(unbiased=False))
    else:
        assert masked_var(xp, mk) == 0
    (grad,) = torch.autograd.grad(masked_mean(xp, mk) + masked_var(xp, mk), xp)
    assert torch.isfinite(grad).all() and torch.all(grad[~m] == 0)
    assert count_tokens(mk) == m.sum()
    assert count_sequences(mk) == m.shape[0]
    assert count_sequences(mk, exclude_empty=True) == m.any(1).sum()


@PROPS
@given(masked_tensors(), st.booleans())
def test_whiten(xm, shift_mean):
    x, m = xm
    xp = poisoned(x, m).requires_grad_()
    w = whiten(xp, m, shift_mean=shift_mean)
    assert torch.isfinite(w).all() and torch.all(w[~m] == 0)
    (grad,) = torch.autograd.grad((w * torch.arange(w.numel()).view_as(w)).sum(), xp)
    assert torch.isfinite(grad).all() and torch.all(grad[~m] == 0)
    mu, var = x[m].mean() if m.any() else 0.0, x[m].var() if m.sum() >= 2 else 0.0
    expected = (x[m] - mu) / torch.sqrt(torch.as_tensor(var, dtype=x.dtype) + 1e-8) + (0.0 if shift_mean else mu)
    close(w[m], expected)
    if m.sum() >= 2 and x[m].var() > 1e-3 and shift_mean:
        close(masked_mean(w, m), torch.tensor(0.0, dtype=x.dtype), atol=1e-6, rtol=0)
        close(masked_var(w, m), torch.tensor(1.0, dtype=x.dtype), atol=1e-5, rtol=1e-4)
    stats = (torch.tensor(0.3, dtype=x.dtype), torch.tensor(2.0, dtype=x.dtype))
    close(whiten(xp, m, stats=stats)[m], (x[m] - 0.3) / torch.sqrt(torch.tensor(2.0 + 1e-8, dtype=x.dtype)))


@PROPS
@given(masked_tensors(), st.integers(1, 4))
def test_segment_sum_and_sequence_logps(xm, n):
    x, m = xm
    g = torch.Generator().manual_seed(int(x.numel()))
    ids = torch.randint(0, n, x.shape, generator=g).masked_fill(~m, -1)
    xp = poisoned(x, m).requires_grad_()
    got = segment_sum(xp, ids, n)
    close(got, torch.stack([x[(ids == k)].sum() for k in range(n)]))
    (grad,) = torch.autograd.grad(got.sum(), xp)
    assert torch.equal(grad, m.double())

    close(sequence_logps(xp, m), torch.where(m, x, 0.0).sum(1))
    close(sequence_logps(xp, m, "mean"), torch.where(m, x, 0.0).sum(1) / m.sum(1).clamp(min=1))
    # LD weighting: α=1 or a threshold beyond every length is the plain sum; α=0 keeps the first k tokens.
    big = torch.full((x.shape[0],), x.shape[1])
    close(ld_sequence_logps(xp, m, torch.zeros_like(big), alpha=1.0), sequence_logps(xp, m))
    close(ld_sequence_logps(xp, m, big, alpha=0.3), sequence_logps(xp, m))
    k = torch.ones_like(big)
    first_only = torch.where(m & (m.long().cumsum(1) <= 1), x, 0.0).sum(1)
    close(ld_sequence_logps(xp, m, k, alpha=0.0), first_only)
    with pytest.raises(ValueError):
        sequence_logps(xp, m, "max")
