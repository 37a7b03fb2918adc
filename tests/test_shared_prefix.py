"""shared_prefix_token_logps / completion_logps: one prompt pass per group equals the padded full sequences.

The reference is model_token_logps on the G concatenated ``prompt + completion`` rows (itself tested against
HF's own logits in test_logprobs.py), for values, extras and gradients of every parameter.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.logprobs import IGNORE_INDEX
from alignkit.loops.policy_gradient import RLConfig, micro_loss, round_normalizer
from alignkit.scoring import completion_logps, model_token_logps, shared_prefix_token_logps
from tests.test_grpo_loop import _random_batch
from tests.test_logprobs import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def padded_reference(model, prompt, comps, extras=(), temperature=1.0):
    """model_token_logps on right-padded prompt + completion rows, read back completion-aligned [G, L]."""
    G, L = len(comps), max(map(len, comps))
    T = len(prompt) + L
    ids = torch.zeros(G, T, dtype=torch.long)
    labels = torch.full((G, T), IGNORE_INDEX)
    am = torch.zeros(G, T, dtype=torch.long)
    for g, c in enumerate(comps):
        n = len(prompt) + len(c)
        ids[g, :n] = torch.tensor(prompt + c)
        labels[g, len(prompt) : n] = torch.tensor(c)
        am[g, :n] = 1
    res = model_token_logps(model, ids, labels, attention_mask=am, temperature=temperature, extras=extras)
    out = {}
    for k, v in res.items():
        if k == "mask":
            continue
        out[k] = torch.stack([v[g, len(prompt) : len(prompt) + L] for g in range(G)])
    return out


def shared(model, prompt, comps, extras=(), temperature=1.0):
    L = max(map(len, comps))
    ids = torch.tensor([c + [0] * (L - len(c)) for c in comps])
    mask = torch.arange(L)[None] < torch.tensor([len(c) for c in comps])[:, None]
    return shared_prefix_token_logps(model, torch.tensor(prompt), ids, mask, extras=extras, temperature=temperature)


def grads(model, out, mask):
    model.zero_grad()
    (out["logps"][mask] * torch.linspace(0.5, 1.5, int(mask.sum()))).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


ARCHS = {
    "llama": {},
    # sliding-window layers + final logit softcap; prompt + completion > window (sdpa has no attention softcap)
    "gemma2": {"sliding_window": 6, "attn_logit_softcapping": None},
    "qwen2": {},  # q/k/v biases
    "cohere": {},
}


def _model(arch: str, attn: str):
    if arch == "qwen2":
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
        model = tf.Qwen2ForCausalLM(cfg).eval()
    else:
        model = tiny_model(arch, **ARCHS[arch])
    model.config._attn_implementation = attn
    return model.float()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_shared_prefix_equals_padded_values_extras_grads(arch, attn):
    model = _model(arch, attn)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 300, (7,), generator=g).tolist()
    comps = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    extras = ("entropy", "is_top1")
    ref = padded_reference(model, prompt, comps, extras, temperature=0.8)
    out = shared(model, prompt, comps, extras, temperature=0.8)
    mask = out["mask"]
    assert mask.sum() == sum(map(len, comps))
    for k in ("logps", "entropy"):
        torch.testing.assert_close(out[k][mask], ref[k][mask], atol=2e-5, rtol=1e-4)
        assert (out[k][~mask] == 0).all()
    assert torch.equal(out["is_top1"][mask], ref["is_top1"][mask])
    ga, gb = grads(model, out, mask), grads(model, ref, mask)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=2e-5, rtol=1e-3, msg=n)


@settings(max_examples=15, deadline=None)
@given(
    P=st.integers(1, 12),
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_shared_prefix_property_llama(P, lengths, seed):
    """Any prompt length (1 included) and any ragged completion lengths."""
    model = _LLAMA
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 300, (P,), generator=g).tolist()
    comps = [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]
    ref, out = padded_reference(model, prompt, comps), shared(model, prompt, comps)
    torch.testing.assert_close(out["logps"][out["mask"]], ref["logps"][out["mask"]], atol=2e-5, rtol=1e-4)


_LLAMA = tiny_model("llama")


def test_shared_prefix_refuses_without_a_cache_and_bad_shapes():
    model = tiny_model("llama").train()
    model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        shared(model, [5, 6, 7], [[8, 9]])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        shared_prefix_token_logps(model, torch.tensor([], dtype=torch.long), torch.ones(1, 2).long(),
                                  torch.ones(1, 2, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match=r"\[G,L\]"):
        shared_prefix_token_logps(model, torch.tensor([1]), torch.ones(2).long(), torch.ones(2, dtype=torch.bool))


def test_completion_logps_shared_equals_padded_across_split_groups():
    """Rows from three prompts, one group split across the batch boundary: both paths agree, and the GRPO
    micro-batch loss and gradients are the same with and without prompt sharing."""
    model = _model("llama", "sdpa")
    batch = _random_batch(model, 7, torch.Generator().manual_seed(0))
    # groups: rows 0-2 share a prompt, 3-4 share one, 5-6 share one
    for rows in ((0, 1, 2), (3, 4), (5, 6)):
        for r in rows:
            batch.prompt_ids[r] = list(batch.prompt_ids[rows[0]])
    prompts, comps = batch.prompt_ids, batch.completion_ids
    a = completion_logps(model, prompts, comps, shared_prefix=True)
    b = completion_logps(model, prompts, comps, shared_prefix=False)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["mask"], batch.cmask)
    torch.testing.assert_close(a["logps"], b["logps"], atol=2e-5, rtol=1e-4)

    rows = list(range(7))
    losses, grad_sets = [], []
    for flag in (True, False):
        cfg = RLConfig(shared_prefix=flag, kl_coef=0.1, entropy_coef=0.01, max_new_tokens=8, temperature=0.9)
        D = round_normalizer(batch, rows, cfg)
        model.zero_grad()
        total = 0.0
        for sl in ([0, 1], [2, 3, 4, 5, 6]):  # splits the first group between micro-batches
            loss, _ = micro_loss(model, batch, sl, cfg, D, float(batch.cmask.sum()))
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        grad_sets.append([p.grad.clone() for p in model.parameters()])
    assert abs(losses[0] - losses[1]) < 1e-5
    for x, y in zip(*grad_sets):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=1e-3)


def test_lora_policy_shared_prefix_and_hf_sampling():
    """A peft LoRA policy (what `lora_r > 0` builds): shared-prefix scores equal the padded ones, gradients reach
    only the adapter, and the HF decode loop samples from it with the trainer's log-probs."""
    peft = pytest.importorskip("peft", reason="peft extra not installed")
    from alignkit.rollout import HFGenerator

    base = tiny_model("llama")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():  # non-zero B so the adapter changes the outputs
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    prompts = [[5, 6, 7]] * 3 + [[9, 10]] * 2
    ro = HFGenerator(model, 0).generate([[5, 6, 7], [9, 10]], n=1, max_new_tokens=6, stop_token_ids=[1], seed=0)
    for p, c, lp in zip(ro.prompt_ids, ro.completion_ids, ro.logprobs):
        ref = padded_reference(model, p, [c])["logps"][0, : len(c)]
        torch.testing.assert_close(torch.tensor(lp), ref.detach(), atol=1e-4, rtol=0)
    comps = [[11, 12, 13], [14], [15, 16], [17, 18, 19, 20], [21]]
    a = completion_logps(model, prompts, comps, shared_prefix=True)
    b = completion_logps(model, prompts, comps, shared_prefix=False)
    torch.testing.assert_close(a["logps"], b["logps"], atol=2e-5, rtol=1e-4)
    with model.disable_adapter():
        off = completion_logps(model, prompts, comps)["logps"]
    assert (off - a["logps"]).abs().max() > 1e-3  # the adapter matters, and switching it off works
    a["logps"].sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_decode_loop_logprobs_match_trainer_across_architectures(arch):
    """The HF backend's own decode loop (KV cache, left padding, finished rows dropped from the batch and the
    cache) on each architecture: every sampled token's log-prob equals the trainer's. Gemma 2's window (6) is
    shorter than prompt + completion, so its sliding-window cache layers are exercised too."""
    from alignkit.rollout import HFGenerator

    model = _model(arch, "sdpa")
    with torch.no_grad():  # peakier logits: rows stop at different steps
        model.get_output_embeddings().weight.mul_(4.0)
    stops = list(range(3, 300, 9))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    ro = HFGenerator(model, 0).generate(prompts, n=4, max_new_tokens=10, stop_token_ids=stops, seed=0)
    assert len({len(c) for c in ro.completion_ids}) > 1  # some rows left the batch early
    for p, c, lp in zip(ro.prompt_ids, ro.completion_ids, ro.logprobs):
        ref = padded_reference(model, p, [c])["logps"][0, : len(c)]
        torch.testing.assert_close(torch.tensor(lp), ref.detach(), atol=1e-4, rtol=0)
