"""A packed forward of a tiny Llama equals per-document forwards (sdpa and eager), and the loaders work."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.collate import IGNORE_INDEX, pack_collate, packed_forward_kwargs, pad_collate
from alignkit.models import build_tiny_model, load_model_and_tokenizer, tiny_llama_config

VOCAB = 64
IMPLS = ("sdpa", "eager")
_MODELS: dict[str, torch.nn.Module] = {}


def _model(impl: str) -> torch.nn.Module:
    # One model per implementation for the whole module (hypothesis forbids function-scoped fixtures).
    if impl not in _MODELS:
        _MODELS[impl] = build_tiny_model(tiny_llama_config(VOCAB), seed=3, attn_implementation=impl).eval()
    return _MODELS[impl]


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX if j < n // 3 else t for j, t in enumerate(ids)]})
    return out


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token NLL summed over tokens: logits [B, T, V] at t predict labels [B, T] at t + 1."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _per_document_logits(model, examples) -> torch.Tensor:
    return torch.cat([model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0] for ex in examples])


@pytest.mark.parametrize("explicit_mask", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_packed_equals_unpacked(impl, explicit_mask, lengths, seed):
    model = _model(impl)
    examples = _examples(lengths, seed)
    packed = pack_collate(examples)
    with torch.no_grad():
        logits = model(**packed_forward_kwargs(packed, impl, explicit_mask=explicit_mask)).logits
        torch.testing.assert_close(logits[0], _per_document_logits(model, examples), atol=1e-5, rtol=1e-5)

        padded = pad_collate(examples, pad_token_id=0)
        padded_logits = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).logits
        torch.testing.assert_close(
            _summed_nll(logits, packed["labels"]), _summed_nll(padded_logits, padded["labels"]), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_packings_differ(impl):
    # The checks above can fail: each way of losing document isolation changes the logits of later documents.
    model = _model(impl)
    examples = _examples([5, 1, 9, 1, 3, 12], seed=7)
    packed = pack_collate(examples)
    good = packed_forward_kwargs(packed, impl)
    wrong = {
        # a 2D mask of ones switches off transformers' packing detection -> plain causal over the whole row
        "all-ones attention_mask": {**good, "attention_mask": torch.ones_like(packed["input_ids"])},
        # use_cache defaults to True (config), which creates a cache and also disables the detection,
        # even in train mode
        "use_cache left on": {k: v for k, v in good.items() if k != "use_cache"},
        # no restarting positions: one long document
        "no position_ids": {"input_ids": packed["input_ids"], "use_cache": False},
    }
    with torch.no_grad():
        reference = _per_document_logits(model, examples)
        assert (model(**good).logits[0] - reference).abs().max() < 1e-5
        for name, kwargs in wrong.items():
            model.train(name == "use_cache left on")
            try:
                gap = (model(**kwargs).logits[0] - reference).abs().max()
            finally:
                model.eval()
            assert gap > 1e-2, name
            # the first document never sees another one, so it must still match
            torch.testing.assert_close(model(**kwargs).logits[0, :5], reference[:5], atol=1e-5, rtol=1e-5)


def test_packed_gradients_match_unpacked():
    model = build_tiny_model(tiny_llama_config(VOCAB), seed=5, attn_implementation="sdpa")
    examples = _examples([4, 1, 7], seed=2)
    packed = pack_collate(examples)
    model.zero_grad()
    _summed_nll(model(**packed_forward_kwargs(packed, "sdpa")).logits, packed["labels"]).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for ex in examples:
        one = pad_collate([ex], pad_token_id=0)
        _summed_nll(model(input_ids=one["input_ids"], use_cache=False).logits, one["labels"]).backward()
    for p, g in zip(model.parameters(), packed_grads):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_flash_kwargs_match_transformers_derivation():
    # No flash kernel on CPU: check that the cu_seqlens we pass are exactly what transformers would derive
    # from position_ids, so the varlen path sees the same document boundaries either way.
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    packed = pack_collate(_examples([3, 1, 6, 2]))
    kwargs = packed_forward_kwargs(packed, "flash_attention_2")
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(packed["position_ids"])
    assert torch.equal(kwargs["cu_seq_lens_q"], cu_q) and torch.equal(kwargs["cu_seq_lens_k"], cu_k)
    assert kwargs["max_length_q"] == int(max_q) == kwargs["max_length_k"] == int(max_k) == 6
    assert kwargs["use_cache"] is False and "attention_mask" not in kwargs
    with pytest.raises(ValueError, match="no packing recipe"):
        packed_forward_kwargs(packed, "paged_attention")


def test_build_tiny_model_is_seeded_and_leaves_rng_alone():
    config = tiny_llama_config(VOCAB, hidden=32, heads=4, kv_heads=1, tie=True)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(config, seed=1)
    after = torch.rand(1)
    b = build_tiny_model(config, seed=1)
    c = build_tiny_model(config, seed=2)
    assert torch.equal(before, after)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert a.config.intermediate_size == 128 and a.config.num_key_value_heads == 1
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="heads"):
        tiny_llama_config(VOCAB, hidden=30, heads=4)


def test_load_model_and_tokenizer_local_round_trip(tmp_path):
    tok = byte_tokenizer()
    model = build_tiny_model(tiny_llama_config(len(tok), eos_token_id=tok.eos_token_id), seed=4)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model_and_tokenizer(tmp_path, dtype="float32", attn_implementation="eager")
    ids = torch.tensor([loaded_tok("<|im_start|>user\nhé<|im_end|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert loaded.config._attn_implementation == "eager"
    bf16, _ = load_model_and_tokenizer(str(tmp_path), dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model_and_tokenizer(tmp_path, dtype="float8")


def test_load_model_and_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "missing")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1") as info:
        load_model_and_tokenizer("alignkit-test/no-such-model")
    assert "no-such-model" in str(info.value)
