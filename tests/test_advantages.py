"""Advantage estimators (docs/LOSSES.md §7.1, properties §9 13-16, 32)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from alignkit.losses.advantages import (
    ADVANTAGES,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)

ATOL, RTOL = 1e-5, 1e-4
PROP = settings(max_examples=30, deadline=None)

seeds = st.integers(0, 2**31 - 1)
group_sizes = st.integers(2, 5)
n_groups = st.integers(1, 4)


def rewards(seed: int, n: int, k: int | None = None, *, discrete: bool = False, p_nan: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (n, k)
    R = torch.randint(0, 3, shape, generator=g).float() if discrete else torch.randn(shape, generator=g)
    if p_nan:
        R[torch.rand(shape, generator=g) < p_nan] = float("nan")
    return R


def roundoff(dtype: torch.dtype, magnitude, spread, z) -> torch.Tensor:
    """Round-off allowance for a z-score ``z = (x − μ)/spread`` computed in ``dtype`` from values up to
    ``magnitude``: ``x − μ`` and the spread each carry a few ulps of ``magnitude``, so ``z`` is off by about
    ``ε·magnitude/spread·(1 + |z|)``. Small against ATOL unless the spread is tiny (a group of two close rewards)."""
    z = torch.as_tensor(z, dtype=torch.float64)
    return 16 * torch.finfo(dtype).eps * torch.as_tensor(magnitude, dtype=torch.float64) / spread * (1 + z.abs())


def assert_within(got, want, tol, msg=""):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err = (got - want).abs()
    assert torch.all(err <= tol), f"{msg} max |err| - tol = {(err - tol).max().item():.3g}: got {got}, want {want}"


def _ref_grpo(R: list[float], G: int, scale: str, eps: float = 1e-4) -> list[tuple[float, float]]:
    """Straight loop over groups, TRL semantics (NaN-aware, unbiased std, singleton/flat -> 0), in float64.
    Each advantage comes with the denominator it was divided by (1 for scale="none" and for zeros)."""

    def stats(xs: list[float]) -> tuple[float, float]:
        xs = [x for x in xs if not math.isnan(x)]
        if len(xs) < 2:
            return (xs[0] if xs else math.nan), math.nan
        mu = sum(xs) / len(xs)
        return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))

    _, bstd = stats(R)
    out = []
    for s in range(0, len(R), G):
        grp = R[s : s + G]
        mu, std = stats(grp)
        for r in grp:
            if math.isnan(r) or math.isnan(std) or std == 0:
                out.append((0.0, 1.0))
            elif scale == "group":
                out.append(((r - mu) / (std + eps), std + eps))
            elif scale == "batch":
                out.append(((r - mu) / (bstd + eps), bstd + eps))
            else:
                out.append((r - mu, 1.0))
    return out


# ---------------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------------


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, scale=st.sampled_from(["group", "batch", "none"]), disc=st.booleans())
def test_grpo_matches_loop_reference(seed, G, ng, scale, disc):
    R = rewards(seed, G * ng, discrete=disc, p_nan=0.2)
    A, _ = grpo_advantages(R, group_size=G, scale=scale)
    ref, spread = torch.tensor(_ref_grpo(R.tolist(), G, scale), dtype=torch.float64).unbind(1)
    # the loop is float64 on the same fp32 rewards; the fp32 z-score is as close as its conditioning allows
    magnitude = R.nan_to_num().abs().max()
    assert_within(A, ref, ATOL + RTOL * ref.abs() + roundoff(torch.float32, magnitude, spread, ref))


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups)
def test_grpo_none_sums_to_zero_per_group(seed, G, ng):  # §9.13
    R = rewards(seed, G * ng)
    A, _ = grpo_advantages(R, group_size=G, scale="none")
    torch.testing.assert_close(A.view(ng, G).sum(1), torch.zeros(ng), atol=ATOL, rtol=0)
    assert not torch.allclose(A, torch.zeros_like(A))


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, a=st.floats(0.2, 20.0), b=st.floats(-5.0, 5.0))
@example(seed=168807809, G=2, ng=4, a=0.2, b=5.0)  # fp32 a·R + b moved A by 8e-4 (group std 8e-4; seed sweep)
def test_grpo_group_affine_invariant(seed, G, ng, a, b):  # §9.14
    # Exact in exact arithmetic, so checked in float64: in fp32, a·R + b itself rounds by up to half an ulp of |b|
    # (b up to 5), which a group std of 1e-2 (scaled by a = 0.2) turns into 1e-4 of A.
    R = rewards(seed, G * ng).double()
    mapped = a * R + b
    A0, _ = grpo_advantages(R, group_size=G, eps=0.0)
    A1, _ = grpo_advantages(mapped, group_size=G, eps=0.0)
    std = R.view(ng, G).std(1).repeat_interleave(G)
    std = torch.where(std > 0, std, 1.0)  # a flat group (A = 0 exactly) needs no slack
    slack = roundoff(torch.float64, R.abs().max(), std, A0) + roundoff(torch.float64, mapped.abs().max(), a * std, A0)
    assert_within(A1, A0, 1e-12 + slack)
    # with eps the invariance holds up to a relative O(eps/σ) term
    A2, _ = grpo_advantages(mapped, group_size=G)
    assert torch.all((A2 - A0).abs() <= A0.abs() * 2e-4 / (std * min(a, 1.0)) + 1e-4 + slack)


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, c=st.floats(-3, 3), scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_flat_groups_exactly_zero(seed, G, ng, c, scale):  # §9.14
    R = rewards(seed, G * ng)
    R[:G] = c + 0.1  # a flat group whose float mean need not equal its members bit for bit
    A, m = grpo_advantages(R, group_size=G, scale=scale)
    assert torch.equal(A[:G], torch.zeros(G))
    assert m["frac_reward_zero_std"] >= 1.0 / ng - 1e-6


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_permutation_equivariant(seed, G, ng, scale):  # §9.14
    R = rewards(seed, G * ng, discrete=True)
    g = torch.Generator().manual_seed(seed + 1)
    # permute the groups, and the members inside each group
    gperm = torch.randperm(ng, generator=g)
    perm = torch.cat([gi * G + torch.randperm(G, generator=g) for gi in gperm.tolist()])
    A, _ = grpo_advantages(R, group_size=G, scale=scale)
    Ap, _ = grpo_advantages(R[perm], group_size=G, scale=scale)
    torch.testing.assert_close(Ap, A[perm], atol=ATOL, rtol=RTOL)


def test_grpo_flat_group_with_inexact_float_mean_is_exactly_zero():
    xs = torch.linspace(0.01, 3.0, 3000)
    x = next(v for v in xs if (v + v + v) / 3 != v)  # fp32 round-off: the group mean is not x itself
    R = torch.stack([x, x, x, x - 1, x, x + 1])
    for scale in ("group", "batch", "none"):
        A, _ = grpo_advantages(R, group_size=3, scale=scale)
        assert torch.equal(A[:3], torch.zeros(3)), scale
        assert A[3] < 0 < A[5]


def test_grpo_singleton_groups_zero():
    A, m = grpo_advantages(torch.tensor([1.0, -2.0, 3.0]), group_size=1)
    assert torch.equal(A, torch.zeros(3))
    assert m["frac_reward_zero_std"] == 1.0
    A, _ = grpo_advantages(torch.tensor([1.0, -2.0, 3.0]), group_size=1, unbiased=False, scale="batch")
    assert torch.equal(A, torch.zeros(3))


def test_grpo_batch_scale_uses_group_mean_and_batch_std():
    R = torch.tensor([0.0, 1.0, 5.0, 7.0])
    A, _ = grpo_advantages(R, group_size=2, scale="batch")
    std = R.std()
    torch.testing.assert_close(A, torch.tensor([-0.5, 0.5, -1.0, 1.0]) / (std + 1e-4))


def test_grpo_unbiased_flag():
    R = torch.tensor([0.0, 2.0, 4.0])
    A_u, _ = grpo_advantages(R, group_size=3)
    A_b, _ = grpo_advantages(R, group_size=3, unbiased=False)
    torch.testing.assert_close(A_u, (R - 2) / (2.0 + 1e-4))
    torch.testing.assert_close(A_b, (R - 2) / (math.sqrt(8 / 3) + 1e-4))


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_unscorable_rows(seed, G, ng, scale):  # §9.16
    n = G * ng
    R = rewards(seed, n, 2, p_nan=0.3)
    R[0] = float("nan")  # at least one all-NaN (unscorable) row
    gi = torch.arange(n) // G
    A, m = grpo_advantages(R, group_index=gi, scale=scale)
    bad = torch.isnan(R).all(1)
    assert torch.equal(A[bad], torch.zeros(int(bad.sum())))
    assert m["n_unscorable"] == bad.sum()
    if (~bad).any():
        A_del, _ = grpo_advantages(R[~bad], group_index=gi[~bad], scale=scale)
        torch.testing.assert_close(A[~bad], A_del, atol=ATOL, rtol=RTOL)


def test_grpo_none_means_nan_and_lists():
    A_list, _ = grpo_advantages([[1.0, None], [None, None], [0.0, 2.0], [None, 1.0]], group_size=2)
    nan = float("nan")
    A_t, _ = grpo_advantages(torch.tensor([[1.0, nan], [nan, nan], [0.0, 2.0], [nan, 1.0]]), group_size=2)
    torch.testing.assert_close(A_list, A_t)
    assert A_t[1] == 0 and A_t[0] == 0  # unscorable row; and its partner is a singleton group
    A_1d, _ = grpo_advantages([1.0, None, 3.0, 3.0], group_size=2)
    assert torch.equal(A_1d, torch.zeros(4))


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_reward_weights_sum_then_normalize(seed, G, ng, scale):
    R = rewards(seed, G * ng, 3, p_nan=0.2)
    w = torch.tensor([0.5, 2.0, -1.0])
    A, _ = grpo_advantages(R, group_size=G, reward_weights=w, scale=scale)
    combined = torch.where(torch.isnan(R), 0.0, R * w).sum(1)
    combined[torch.isnan(R).all(1)] = float("nan")
    A_ref, _ = grpo_advantages(combined, group_size=G, scale=scale)
    torch.testing.assert_close(A, A_ref, atol=ATOL, rtol=RTOL)


@PROP
@given(seed=seeds, G=group_sizes, ng=st.integers(2, 4))
@example(seed=199, G=2, ng=2)  # a group of two close rewards: eps=1e-4 is not negligible beside its std (CI)
def test_gdpo_normalize_then_sum(seed, G, ng):
    n = G * ng
    R = rewards(seed, n, 2)
    w = torch.tensor([1.0, 0.5])
    A, _ = grpo_advantages(R, group_size=G, reward_weights=w, multi_reward="normalize_then_sum")
    # reference, in float64 on the same fp32 rewards: per-reward group z-score, weighted sum, batch z-score
    Rg = R.double().view(ng, G, 2)
    spread = Rg.std(1, keepdim=True) + 1e-4
    z = (Rg - Rg.mean(1, keepdim=True)) / spread
    S = (z.view(n, 2) * w.double()).sum(1)
    ref = (S - S.mean()) / (S.std() + 1e-4)
    # fp32 round-off: each z carries roundoff(...) (large beside a tiny group std), S their weighted sum, and the
    # batch z-score divides S's error by S's spread and adds its own round-off
    z_err = roundoff(torch.float32, R.abs().max(), spread, z).view(n, 2)
    S_err = (z_err * w.double()).sum(1).max() + roundoff(torch.float32, S.abs().max(), 1.0, 0.0)
    A_err = 2 * S_err / (S.std() + 1e-4) * (1 + ref.abs()) + roundoff(torch.float32, S.abs().max(), S.std(), ref)
    assert_within(A, ref, ATOL + RTOL * ref.abs() + A_err)
    # each reward is z-scored inside its group, so a per-reward affine map (a_k>0) changes nothing. That holds
    # exactly only for eps = 0 (against a tiny group std, eps=1e-4 scales differently after the map) and in exact
    # arithmetic, so it is checked in float64, where the round-off of 3·R + 2 is ~1e-16 relative.
    kw = dict(group_size=G, reward_weights=w, multi_reward="normalize_then_sum", eps=0.0)
    R64 = R.double()
    mapped = R64 * torch.tensor([3.0, 0.5], dtype=torch.float64) + 2.0
    A1, _ = grpo_advantages(R64, **kw)
    A2, _ = grpo_advantages(mapped, **kw)
    # round-off of the group z-scores (spreads σ and ≥ 0.5σ before and after the map). S = Σ w·z has variance
    # >= 1/4 in every group (each z has unit variance) and group means 0, so its batch std is >= 0.37: the batch
    # z-score multiplies S's error by at most 2/0.37 (1 + |A|)
    Rg64 = R64.view(ng, G, 2)
    std = Rg64.std(1, keepdim=True)
    std = torch.where(std > 0, std, 1.0)  # a flat group (z = 0 exactly) needs no slack
    zg = (Rg64 - Rg64.mean(1, keepdim=True)) / std
    z_err = roundoff(torch.float64, R64.abs().max(), std, zg)
    z_err = z_err + roundoff(torch.float64, mapped.abs().max(), 0.5 * std, zg)
    S_err = (z_err.view(n, 2) * w.double()).sum(1).max()
    assert_within(A2, A1, 1e-12 + 8 * S_err * (1 + A1.abs()))


def test_frac_reward_zero_std_metric():
    R = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, float("nan"), float("nan")])
    _, m = grpo_advantages(R, group_size=2)
    # groups: flat, spread, flat, all-unscorable (not counted)
    torch.testing.assert_close(m["frac_reward_zero_std"], torch.tensor(2 / 3))
    assert m["n_unscorable"] == 2


def test_group_index_matches_group_size_and_any_labels():
    R = rewards(3, 12)
    A, _ = grpo_advantages(R, group_size=3)
    labels = torch.tensor([7, 7, 7, 2, 2, 2, 9, 9, 9, 4, 4, 4])
    A2, _ = grpo_advantages(R, group_index=labels)
    torch.testing.assert_close(A, A2)
    with pytest.raises(ValueError):
        grpo_advantages(R, group_size=5)
    with pytest.raises(ValueError):
        grpo_advantages(R, group_size=3, group_index=labels)


# ---------------------------------------------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------------------------------------------


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups)
def test_rloo_identities(seed, G, ng):  # §9.15
    R = rewards(seed, G * ng)
    A, _ = rloo_advantages(R, group_size=G)
    mu = R.view(ng, G).mean(1, keepdim=True)
    torch.testing.assert_close(A, (G / (G - 1) * (R.view(ng, G) - mu)).view(-1), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(A.view(ng, G).sum(1), torch.zeros(ng), atol=ATOL, rtol=0)
    # R_i is not in its own baseline: moving R_0 moves A_0 by exactly the same amount
    R2 = R.clone()
    R2[0] += 1.7
    A2, _ = rloo_advantages(R2, group_size=G)
    torch.testing.assert_close(A2[0] - A[0], torch.tensor(1.7), atol=ATOL, rtol=RTOL)


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, normalize=st.booleans())
def test_rloo_unscorable_rows(seed, G, ng, normalize):  # §9.16
    n = G * ng
    R = rewards(seed, n, p_nan=0.3)
    gi = torch.arange(n) // G
    A, _ = rloo_advantages(R, group_index=gi, normalize=normalize)
    bad = torch.isnan(R)
    assert torch.equal(A[bad], torch.zeros(int(bad.sum())))
    if (~bad).any():
        A_del, _ = rloo_advantages(R[~bad], group_index=gi[~bad], normalize=normalize)
        torch.testing.assert_close(A[~bad], A_del, atol=ATOL, rtol=RTOL)


def test_rloo_normalize_and_small_groups():
    R = torch.tensor([1.0, 3.0, 0.0, 4.0, 5.0, float("nan")])
    A, _ = rloo_advantages(R, group_size=2, normalize=True)
    raw = torch.tensor([-2.0, 2.0, -4.0, 4.0])
    ref = (raw - raw.mean()) / (raw.std() + 1e-4)
    torch.testing.assert_close(A[:4], ref)
    assert torch.equal(A[4:], torch.zeros(2))  # a single scorable member -> 0


# ---------------------------------------------------------------------------------------------------------------
# REINFORCE++
# ---------------------------------------------------------------------------------------------------------------


def _masks(seed: int, B: int, T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


@PROP
@given(seed=seeds, B=st.integers(1, 5), T=st.integers(1, 7), gamma=st.floats(0.0, 1.0))
def test_reinforce_pp_returns_and_whitening(seed, B, T, gamma):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.3  # holes too: returns reset across masked slots
    r_nan = torch.where(m, r, float("nan"))
    A, metrics = reinforce_pp_advantages(r_nan, m, gamma=gamma)
    G = torch.zeros(B, T, dtype=torch.float64)  # float64 reference on the same fp32 rewards
    for b in range(B):
        run = 0.0
        for t in reversed(range(T)):
            run = r[b, t].item() + gamma * run if m[b, t] else 0.0
            G[b, t] = run
    # fp32 returns carry a few ulps of the partial sums, bounded by Σ_t |r_t| of the row
    magnitude = torch.where(m, r, 0.0).abs().sum(-1).max()
    mean = G[m].mean() if m.any() else torch.tensor(0.0, dtype=torch.float64)
    assert_within(metrics["return_mean"], mean, 1e-5 + roundoff(torch.float32, magnitude, 1.0, 0.0))
    if m.sum() >= 2:
        spread = torch.sqrt(G[m].var() + 1e-8)
        ref = (G - G[m].mean()) / spread
        assert_within(A[m], ref[m], 1e-4 + 1e-4 * ref[m].abs() + roundoff(torch.float32, magnitude, spread, ref[m]))
    assert torch.equal(A[~m], torch.zeros(int((~m).sum())))


@PROP
@given(seed=seeds, B=st.integers(2, 6), T=st.integers(1, 6))
def test_reinforce_pp_stats_make_microbatches_exact(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g)
    m = _masks(seed, B, T)
    A, met = reinforce_pp_advantages(r, m)
    # global stats from the full batch, computed by the caller
    G_full = torch.flip(torch.cumsum(torch.flip(torch.where(m, r, 0.0), [1]), 1), [1])
    stats = (G_full[m].mean(), G_full[m].var() if m.sum() > 1 else torch.tensor(0.0))
    h = B // 2
    parts = [reinforce_pp_advantages(r[s], m[s], stats=stats)[0] for s in (slice(0, h), slice(h, B))]
    # the caller's fp32 stats and the loss's own differ by round-off, which a tiny variance amplifies
    spread = torch.sqrt(G_full[m].double().var() + 1e-8) if m.sum() > 1 else torch.tensor(1e-4, dtype=torch.float64)
    magnitude = torch.where(m, r, 0.0).abs().sum(-1).max()
    assert_within(torch.cat(parts), A, 1e-4 + 1e-4 * A.abs() + roundoff(torch.float32, magnitude, spread, A))
    torch.testing.assert_close(met["return_mean"], G_full[m].mean())


@PROP
@given(seed=seeds, G=group_sizes, ng=n_groups, T=st.integers(1, 6))
def test_reinforce_pp_baseline(seed, G, ng, T):
    n = G * ng
    R = rewards(seed, n)
    m = _masks(seed, n, T)
    A, _ = reinforce_pp_baseline_advantages(R, m, group_size=G)
    R64 = R.double()  # float64 reference on the same fp32 rewards
    score = (R64.view(ng, G) - R64.view(ng, G).mean(1, keepdim=True)).view(-1, 1).expand(n, T)
    s = score[m]
    spread = torch.sqrt((s.var() if s.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)) + 1e-8)
    ref = (score - s.mean()) / spread
    tol = 1e-4 + 1e-4 * ref[m].abs() + roundoff(torch.float32, R.abs().max(), spread, ref[m])
    assert_within(A[m], ref[m], tol)
    assert torch.equal(A[~m], torch.zeros(int((~m).sum())))


def test_reinforce_pp_baseline_singleton_and_unscorable():
    R = torch.tensor([2.0, float("nan"), 1.0, 3.0])
    m = torch.ones(4, 2, dtype=torch.bool)
    A, _ = reinforce_pp_baseline_advantages(R, m, group_size=2)
    # group 0 has one scorable member -> μ=0 (verl), so its score is R itself; the unscorable row is 0
    score = torch.tensor([2.0, -1.0, 1.0])
    ref = (score - score.repeat_interleave(2).mean()) / torch.sqrt(score.repeat_interleave(2).var() + 1e-8)
    torch.testing.assert_close(A[[0, 2, 3], 0], ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(A[1], torch.zeros(2))


# ---------------------------------------------------------------------------------------------------------------
# registry and metrics contract (§9.32)
# ---------------------------------------------------------------------------------------------------------------


def test_registry_and_metrics_contract(monkeypatch):
    def boom(self):
        raise AssertionError("Tensor.item called")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    R = torch.tensor([1.0, 0.0, float("nan"), 2.0])
    m = torch.ones(4, 3, dtype=torch.bool)
    calls = {
        "grpo": lambda f: f(R, group_size=2),
        "rloo": lambda f: f(R, group_size=2, normalize=True),
        "reinforce_pp": lambda f: f(torch.randn(4, 3), m),
        "reinforce_pp_baseline": lambda f: f(R, m, group_size=2),
    }
    assert set(calls) == set(ADVANTAGES)
    for name, call in calls.items():
        A, metrics = call(ADVANTAGES[name])
        assert not A.requires_grad and torch.isfinite(A).all()
        assert metrics and all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    A, metrics = grpo_advantages(R, group_size=2, multi_reward="normalize_then_sum")
    assert all(not v.requires_grad for v in metrics.values())
