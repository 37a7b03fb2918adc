"""Parity with TRL 1.16's distillation losses: values and gradients (w.r.t. the student only).

Mapping (TRL 1.16 -> alignkit):

* ``GKDTrainer.generalized_jsd_loss(s, t, labels, beta, temperature)`` -> ``generalized_jsd_loss(s, t, labels≠−100)``:
  ``reduction="batchmean"`` with labels (Σ / local masked-token count) -> ``normalizer="local"``;
  ``num_items_in_batch=n`` -> ``normalizer=n``; ``batchmean`` without labels (Σ over all B·T, ÷B) -> an all-ones
  mask and ``normalizer=B``; ``reduction="sum"`` -> ``normalizer=1``.
* ``trainer.distillation_trainer._chunked_divergence_loss(h_s, h_t, W_s, W_t, completion_mask, beta)`` ->
  ``chunked_generalized_jsd_loss``: ``num_items_in_batch`` None / n -> ``"local"`` / n; its entropy sum ->
  ``distill/student_entropy · n_tokens``.
* ``ServerDistillationTrainer._compute_server_forward_kl_loss`` (β=0, teacher top-k, tail or renormalised) ->
  ``sparse_divergence_loss(beta=0, normalizer="local")``.
* ``ServerDistillationTrainer._compute_sparse_top_1_divergence_loss`` (β>0; support {teacher top-1, sampled token},
  or {sampled} at β=1) -> ``sparse_divergence_loss`` with ids ``[top1, sampled or −1]`` (``[sampled]`` at β=1).
* ``_jsd_divergence(_add_tail_bucket(·))`` on a top-k + tail support, any β -> ``sparse_divergence_loss(beta)``.

Both use TRL's β (the teacher's weight in the mixture; 0 = forward KL, 1 = reverse KL) and divide both logits by τ
without a τ² factor. The server's teacher log-probs are already at temperature τ: passed as given.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.experimental.server_distillation.server_distillation_trainer import (  # noqa: E402
    ServerDistillationTrainer,
    _add_tail_bucket,
    _jsd_divergence,
)
from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: E402

from alignkit.losses.distill import (  # noqa: E402
    chunked_generalized_jsd_loss,
    generalized_jsd_loss,
    sparse_divergence_loss,
)
from tests.conftest import close  # noqa: E402

pytestmark = [pytest.mark.trl, pytest.mark.usefixtures("one_thread")]

ATOL, RTOL = 1e-5, 1e-4
BETAS = [0.0, 0.3, 0.5, 1.0]
TAUS = [0.7, 1.0, 2.0]
B, T, V, H, HT = 3, 5, 23, 8, 6


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, T, V, generator=g) * 2
    zt = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[0, 0] = 1
    return zs, zt, labels


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("beta", BETAS)
def test_gkd_generalized_jsd_loss(beta, tau):
    zs, zt, labels = batch(int(beta * 10) + int(tau * 10))
    m = labels != -100
    cases = [  # (TRL kwargs, alignkit mask, alignkit normalizer)
        (dict(labels=labels), m, "local"),
        (dict(labels=labels, num_items_in_batch=torch.tensor(11)), m, torch.tensor(11.0)),
        (dict(labels=labels, num_items_in_batch=7), m, 7.0),
        (dict(labels=None), torch.ones_like(m), float(B)),
        (dict(labels=labels, reduction="sum"), m, 1.0),
    ]
    for trl_kw, mask, norm in cases:
        x, y = zs.clone().requires_grad_(), zs.clone().requires_grad_()
        ref = GKDTrainer.generalized_jsd_loss(x, zt, beta=beta, temperature=tau, **trl_kw)
        got, _ = generalized_jsd_loss(y, zt, mask, beta=beta, temperature=tau, normalizer=norm)
        close(got, ref)
        close(grad_of(got, y), grad_of(ref, x))


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_divergence_loss(beta, tau):
    g = torch.Generator().manual_seed(int(beta * 10) + int(tau * 10))
    hs, ht = torch.randn(B, T, H, generator=g), torch.randn(B, T, HT, generator=g)
    ws, wt = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, HT, generator=g) * 0.5
    bs, bt = torch.randn(V, generator=g), torch.randn(V, generator=g)
    cm = (torch.rand(B, T, generator=g) > 0.3).long()
    cm[0, 0] = 1
    for n_items, norm in ((None, "local"), (torch.tensor(13), torch.tensor(13.0))):
        leaves_ref = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        ref, ent_sum, n_valid = _chunked_divergence_loss(
            leaves_ref[0], ht, leaves_ref[1], wt, cm, beta, num_items_in_batch=n_items,
            student_lm_head_bias=leaves_ref[2], teacher_lm_head_bias=bt, temperature=tau,
        )  # fmt: skip
        got, metrics = chunked_generalized_jsd_loss(
            leaves[0], leaves[1], ht, wt, cm, beta=beta, temperature=tau, normalizer=norm,
            student_bias=leaves[2], teacher_bias=bt, token_chunk=4, vocab_chunk=8,
        )  # fmt: skip
        close(got, ref)
        close(metrics["n_tokens"], n_valid)
        close(metrics["distill/student_entropy"] * metrics["n_tokens"], ent_sum)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(ref, leaves_ref)):
            close(a, b)


def _server_stub(beta: float, add_tail: bool) -> SimpleNamespace:
    return SimpleNamespace(
        beta=beta, loss_add_tail=add_tail, _reduce_divergence_loss=ServerDistillationTrainer._reduce_divergence_loss
    )


def _teacher_topk(zt: torch.Tensor, tau: float, k: int):
    lps, ids = torch.log_softmax(zt / tau, -1).topk(k, -1)
    return ids, lps


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("tau", TAUS)
def test_server_forward_kl_topk(tau, add_tail):
    zs, zt, labels = batch(int(tau * 10))
    m = labels != -100
    ids, lps = _teacher_topk(zt, tau, 4)
    lps = lps.clone()
    lps[1, 1, 3] = float("-inf")  # a missing slot (the server pads with -inf)
    x, y = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    ref = ServerDistillationTrainer._compute_server_forward_kl_loss(
        _server_stub(0.0, add_tail),
        teacher_result={"topk_logprobs": lps, "topk_token_ids": ids},
        student_log_probs=torch.log_softmax(x / tau, -1),
        labels=labels,
    )
    got, _ = sparse_divergence_loss(y, ids, lps, m, beta=0.0, temperature=tau, add_tail=add_tail, normalizer="local")
    close(got, ref)
    close(grad_of(got, y), grad_of(ref, x))


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("beta", [0.3, 0.5, 1.0])
def test_server_sparse_top1_mixed_support(beta, tau, add_tail):
    zs, zt, labels = batch(int(beta * 10) + int(tau * 10))
    m = labels != -100
    g = torch.Generator().manual_seed(1)
    lt_full = torch.log_softmax(zt / tau, -1)
    top1_lp, top1 = lt_full.max(-1)
    sampled = torch.where(torch.rand(B, T, generator=g) < 0.4, top1, torch.randint(0, V, (B, T), generator=g))
    actual_lp = lt_full.gather(-1, sampled[..., None]).squeeze(-1)
    x, y = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    ref = ServerDistillationTrainer._compute_sparse_top_1_divergence_loss(
        _server_stub(beta, add_tail),
        student_log_probs=torch.log_softmax(x / tau, -1),
        teacher_top1_token_ids=top1,
        teacher_top1_logprobs=top1_lp,
        reverse_token_ids=sampled,
        reverse_teacher_logprobs=actual_lp,
        labels=labels,
    )
    if beta == 1.0:
        ids, lps = sampled[..., None], actual_lp[..., None]
    else:
        ids = torch.stack([top1, torch.where(sampled != top1, sampled, -1)], -1)
        lps = torch.stack([top1_lp, actual_lp], -1)
    got, _ = sparse_divergence_loss(y, ids, lps, m, beta=beta, temperature=tau, add_tail=add_tail, normalizer="local")
    close(got, ref)
    close(grad_of(got, y), grad_of(ref, x))


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("beta", BETAS)
def test_sparse_topk_any_beta_with_tail(beta, tau):
    """TRL's sparse divergence on a top-k + tail support (its building blocks), for every β."""
    zs, zt, labels = batch(int(beta * 10) + int(tau * 10) + 3)
    m = labels != -100
    ids, lps = _teacher_topk(zt, tau, 5)
    valid = torch.ones_like(ids, dtype=torch.bool)
    x, y = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    s_lp = torch.log_softmax(x / tau, -1).gather(-1, ids)
    s_sparse, support = _add_tail_bucket(s_lp, valid)
    t_sparse, _ = _add_tail_bucket(lps, valid)
    jsd = _jsd_divergence(s_sparse, t_sparse, beta, support).sum(-1)
    ref = ServerDistillationTrainer._reduce_divergence_loss(jsd, completion_mask=m, num_items_in_batch=9)
    got, _ = sparse_divergence_loss(y, ids, lps, m, beta=beta, temperature=tau, add_tail=True, normalizer=9.0)
    close(got, ref)
    close(grad_of(got, y), grad_of(ref, x))
