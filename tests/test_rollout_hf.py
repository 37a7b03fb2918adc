"""HFGenerator: grouping, sampler log-probs equal the trainer's tempered log-softmax, stop tokens, seeds."""

from __future__ import annotations

import pytest
import torch

from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.rollout import Generator, HFGenerator, Rollouts
from alignkit.rollout.hf import sample_tokens
from alignkit.scoring import model_token_logps

VOCAB = 48
PAD = 0


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model(tiny_llama_config(VOCAB, hidden=32, layers=2, eos_token_id=1), seed=3)
    with torch.no_grad():  # larger logits so sampling is neither uniform nor deterministic
        m.lm_head.weight.mul_(8.0)
    return m.eval()


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15], [20]]


def _trainer_logps(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    labels = torch.tensor([[-100] * len(prompt) + completion])
    with torch.no_grad():
        out = model_token_logps(model, ids, labels, temperature=temperature)
    return out["logps"][out["mask"]]


def test_is_a_generator(model):
    assert isinstance(HFGenerator(model, PAD), Generator)


def test_shapes_and_grouping(model):
    n, max_new = 3, 7
    ro = HFGenerator(model, PAD).generate(PROMPTS, n=n, max_new_tokens=max_new, stop_token_ids=[1, 2], seed=0)
    assert isinstance(ro, Rollouts)
    assert len(ro) == len(ro.prompt_ids) == len(ro.logprobs) == len(ro.finished) == len(PROMPTS) * n
    for g, p in enumerate(PROMPTS):
        assert ro.prompt_ids[g * n : (g + 1) * n] == [p] * n  # groups contiguous, in prompt order
    for c, lp in zip(ro.completion_ids, ro.logprobs):
        assert 1 <= len(c) <= max_new and len(lp) == len(c)
        assert all(0 <= t < VOCAB for t in c)
        assert all(x <= 0.0 for x in lp)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_sampler_logprobs_match_trainer(model, temperature):
    """The recorded behaviour log-probs are log_softmax(logits / τ) at the sampled tokens (left padding included)."""
    ro = HFGenerator(model, PAD).generate(
        PROMPTS, n=2, max_new_tokens=10, temperature=temperature, stop_token_ids=[1], seed=1
    )
    for p, c, lp in zip(ro.prompt_ids, ro.completion_ids, ro.logprobs):
        ref = _trainer_logps(model, p, c, temperature)
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=0)
    # τ matters: the same tokens scored at another temperature are clearly different
    p, c, lp = ro.prompt_ids[0], ro.completion_ids[0], ro.logprobs[0]
    assert (torch.tensor(lp) - _trainer_logps(model, p, c, temperature * 2)).abs().max() > 1e-2


def test_stop_tokens_and_finished_flags(model):
    stops = list(range(1, VOCAB, 4))  # a quarter of the vocabulary: some rows stop, some run to the limit
    max_new = 6
    ro = HFGenerator(model, PAD).generate(PROMPTS, n=8, max_new_tokens=max_new, stop_token_ids=stops, seed=2)
    assert any(ro.finished) and not all(ro.finished)
    for c, fin in zip(ro.completion_ids, ro.finished):
        inner = c[:-1] if fin else c
        assert not set(inner) & set(stops)  # cut at the FIRST stop token, padding after it dropped
        if fin:
            assert c[-1] in stops  # the stop token is part of the completion (the policy learns to emit it)
        else:
            assert len(c) == max_new
    # rows leave the batch as they stop: the survivors' log-probs still match the trainer's (cache rows kept right)
    lengths = {len(c) for c in ro.completion_ids}
    assert len(lengths) > 2
    for p, c, lp in zip(ro.prompt_ids, ro.completion_ids, ro.logprobs):
        torch.testing.assert_close(torch.tensor(lp), _trainer_logps(model, p, c, 1.0), atol=1e-4, rtol=0)


def test_default_stop_is_model_eos(model):
    ro = HFGenerator(model, PAD).generate(PROMPTS, n=6, max_new_tokens=30, seed=4)
    for c, fin in zip(ro.completion_ids, ro.finished):
        assert (1 in c) == fin
        assert c.count(1) <= 1


def test_seed_reproducible_and_isolated(model):
    g = HFGenerator(model, PAD)
    torch.manual_seed(123)
    a = g.generate(PROMPTS, n=2, max_new_tokens=8, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    b = g.generate(PROMPTS, n=2, max_new_tokens=8, seed=7)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert torch.equal(torch.rand(3), after_a)  # a seeded call leaves the caller's RNG stream alone
    c = g.generate(PROMPTS, n=2, max_new_tokens=8, seed=8)
    assert c.completion_ids != a.completion_ids


def test_seeded_samples_do_not_depend_on_the_batch(model):
    """A prompt's seeded completions are the same alone, in another batch, or split over calls (ranks)."""
    g = HFGenerator(model, PAD)
    n, seeds = 3, [11, 40, 97, 5]
    whole = g.generate(PROMPTS, n=n, max_new_tokens=10, seed=seeds)
    for i in range(len(PROMPTS)):
        alone = g.generate([PROMPTS[i]], n=n, max_new_tokens=10, seed=[seeds[i]])
        assert alone.completion_ids == whole.completion_ids[i * n : (i + 1) * n]
    halves = [g.generate(PROMPTS[r::2], n=n, max_new_tokens=10, seed=seeds[r::2]) for r in (0, 1)]
    assert halves[0].completion_ids[:n] == whole.completion_ids[:n]  # rank 0's first prompt
    assert halves[1].completion_ids[:n] == whole.completion_ids[n : 2 * n]  # rank 1's first prompt
    # an int seed s is the per-prompt seeds s + i*n
    assert (
        g.generate(PROMPTS, n=n, max_new_tokens=10, seed=7).completion_ids
        == g.generate(PROMPTS, n=n, max_new_tokens=10, seed=[7 + i * n for i in range(len(PROMPTS))]).completion_ids
    )
    assert len({tuple(c) for c in whole.completion_ids}) > len(PROMPTS)  # samples within a group differ
    with pytest.raises(ValueError, match="one per prompt"):
        g.generate(PROMPTS, n=n, max_new_tokens=4, seed=[1, 2])


def test_stream_uniforms_are_uniform():
    from alignkit.rollout.hf import stream_uniforms

    u = torch.cat([stream_uniforms(torch.arange(1000), t) for t in range(20)])
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert not torch.equal(stream_uniforms(torch.arange(5), 0), stream_uniforms(torch.arange(5), 1))


def _greedy_reference(model, prompt: list[int], steps: int, stop: int) -> list[int]:
    ids = list(prompt)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == stop:
            break
    return out


def test_greedy_matches_argmax_and_batching(model):
    g = HFGenerator(model, PAD)
    ro = g.generate(PROMPTS, n=1, max_new_tokens=6, temperature=0.0, stop_token_ids=[1])
    for p, c, lp in zip(PROMPTS, ro.completion_ids, ro.logprobs):
        assert c == _greedy_reference(model, p, 6, 1)
        torch.testing.assert_close(torch.tensor(lp), _trainer_logps(model, p, c, 1.0), atol=1e-4, rtol=0)
    small = HFGenerator(model, PAD, max_batch_size=3).generate(
        PROMPTS, n=1, max_new_tokens=6, temperature=0.0, stop_token_ids=[1]
    )
    assert small.completion_ids == ro.completion_ids


def test_top_k_applied_and_model_defaults_ignored(model):
    g = HFGenerator(model, PAD)
    greedy = g.generate(PROMPTS, n=1, max_new_tokens=6, temperature=0.0, stop_token_ids=[1])
    top1 = g.generate(PROMPTS, n=1, max_new_tokens=6, temperature=1.0, top_k=1, stop_token_ids=[1], seed=0)
    assert top1.completion_ids == greedy.completion_ids
    # a model shipping top_k=1 in its generation_config must not turn RL sampling greedy
    saved = model.generation_config.top_k
    model.generation_config.top_k = 1
    try:
        ro = g.generate(PROMPTS, n=4, max_new_tokens=6, temperature=1.0, stop_token_ids=[1], seed=0)
    finally:
        model.generation_config.top_k = saved
    assert any(c != greedy.completion_ids[i // 4] for i, c in enumerate(ro.completion_ids))
    assert model.generation_config.top_k == saved


def test_update_weights(model):
    other = build_tiny_model(tiny_llama_config(VOCAB, hidden=32, layers=2, eos_token_id=1), seed=11)
    g = HFGenerator(other, PAD)
    before = g.generate(PROMPTS, n=1, max_new_tokens=5, temperature=0.0, stop_token_ids=[1])
    g.update_weights(model)
    after = g.generate(PROMPTS, n=1, max_new_tokens=5, temperature=0.0, stop_token_ids=[1])
    want = HFGenerator(model, PAD).generate(PROMPTS, n=1, max_new_tokens=5, temperature=0.0, stop_token_ids=[1])
    assert after.completion_ids == want.completion_ids != before.completion_ids
    same = HFGenerator(model, PAD)
    same.update_weights(model)  # the training model itself: nothing to copy
    assert same.model is model


def test_bad_arguments(model):
    g = HFGenerator(model, PAD)
    with pytest.raises(ValueError, match="n >= 1"):
        g.generate(PROMPTS, n=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        g.generate([[3], []], n=1, max_new_tokens=4)


def _frequencies(logps: torch.Tensor, draws: int, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    toks = sample_tokens(logps.expand(draws, -1).contiguous(), generator=g, **kw)
    return torch.bincount(toks, minlength=logps.shape[-1]).double() / draws


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (2, 1.0), (-1, 0.7), (3, 0.9)])
def test_sample_tokens_draws_the_truncated_softmax(top_k, top_p):
    """Empirical frequencies of 40k draws match the (truncated, renormalised) distribution within 5 sigma."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    want = p.clone()
    if top_k > 0:
        want[top_k:] = 0
    if top_p < 1.0:  # smallest prefix (p is sorted) whose mass reaches top_p
        k = int((p.cumsum(0) < top_p).sum()) + 1
        want[k:] = 0
    want = (want / want.sum()).double()
    n = 40_000
    got = _frequencies(p.log(), n, top_k=top_k, top_p=top_p)
    sigma = (want * (1 - want) / n).sqrt().clamp(min=1e-12)
    assert ((got - want).abs() <= 5 * sigma + 1e-12).all(), (got, want)
    assert (got[want == 0] == 0).all()
