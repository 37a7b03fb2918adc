"""Reference log-probs: the on-disk cache (reuse and invalidation), LoRA adapter-off, explicit models, TR-DPO."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaForCausalLM

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.preference import collate_pairs, pair_sequences, tokenize_pairs
from alignkit.loops.dpo import DPOConfig, train_dpo
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.reference import (
    LoraReference,
    ModelReference,
    PrecomputedReference,
    SyncedReference,
    hash_state_dict,
    soft_update,
)
from alignkit.scoring import SequenceScorer, batch_sequence_logps

TOK = byte_tokenizer()
CONFIG = tiny_llama_config(len(TOK), hidden=16, layers=1, heads=2, kv_heads=2)
U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
ROWS = [{"prompt": [U(f"{a}+{a}")], "chosen": [A(str(2 * a))], "rejected": [A(str(2 * a + 1))]} for a in range(12)]


def _model(seed: int = 0) -> LlamaForCausalLM:
    return build_tiny_model(CONFIG, seed=seed)


def _pairs(rows=ROWS):
    return tokenize_pairs(TOK, rows, chat_format="chatml")[0]


class _Batches:
    """The batch factory of a reference pass, counting how often it is asked for batches."""

    def __init__(self, pairs, size: int = 5) -> None:
        self.pairs, self.size, self.calls = pairs, size, 0

    def __call__(self):
        self.calls += 1
        for i in range(0, len(self.pairs), self.size):
            yield collate_pairs(self.pairs[i : i + self.size], pad_token_id=TOK.pad_token_id)


def _build(model, pairs, cache, scorer=SequenceScorer(), **settings):
    batches = _Batches(pairs)
    ref = PrecomputedReference.build(model, pair_sequences(pairs), batches, scorer, cache_dir=cache, settings=settings)
    return ref, batches


def test_precomputed_values_are_the_models_sequence_logps(tmp_path):
    model, pairs = _model(), _pairs()
    ref, _ = _build(model, pairs, tmp_path)
    for k in range(2 * len(pairs)):
        batch = collate_pairs([pairs[k // 2]], pad_token_id=TOK.pad_token_id)
        alone = batch_sequence_logps(model, batch)["sum"][k % 2]
        torch.testing.assert_close(ref.table[k], alone.detach(), atol=1e-5, rtol=1e-5)
    batch = collate_pairs(pairs[3:7], pad_token_id=TOK.pad_token_id)
    assert torch.equal(ref.logps(model, batch), ref.table[batch["global_ids"]])


def test_cache_is_reused_and_invalidated_by_model_data_and_settings(tmp_path):
    model, pairs = _model(), _pairs()
    first, b1 = _build(model, pairs, tmp_path, chat_format="chatml")
    assert first.info["cache_hit"] is False and first.info["forward_passes"] == 3 and b1.calls == 1
    assert len(list(tmp_path.glob("*.pt"))) == 1

    # same weights (a fresh object built from the same seed) and the same data: no reference forward at all
    again, b2 = _build(_model(), _pairs(), tmp_path, chat_format="chatml")
    assert again.info["cache_hit"] is True and again.info["forward_passes"] == 0 and again.info["sequences_scored"] == 0
    assert again.info["key"] == first.info["key"] and torch.equal(again.table, first.table)

    # one weight perturbed -> a new key and a recomputation
    changed = _model()
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    moved, b3 = _build(changed, pairs, tmp_path, chat_format="chatml")
    assert moved.info["cache_hit"] is False and b3.calls == 1 and moved.info["key"] != first.info["key"]
    assert not torch.equal(moved.table, first.table)

    # one data row changed -> recomputation
    rows = [dict(r) for r in ROWS]
    rows[5] = {**rows[5], "rejected": [A("99")]}
    other, b4 = _build(model, _pairs(rows), tmp_path, chat_format="chatml")
    assert other.info["cache_hit"] is False and b4.calls == 1
    assert torch.equal(other.table[:10], first.table[:10]) and other.table[11] != first.table[11]

    # settings that change log-probs or the data recipe -> recomputation
    warm, b5 = _build(model, pairs, tmp_path, scorer=SequenceScorer(temperature=2.0), chat_format="chatml")
    assert warm.info["cache_hit"] is False and b5.calls == 1
    named, b6 = _build(model, pairs, tmp_path, chat_format="chatml", max_length=512)
    assert named.info["cache_hit"] is False and b6.calls == 1
    assert len(list(tmp_path.glob("*.pt"))) == 5
    # and the first entry is still served
    assert _build(model, pairs, tmp_path, chat_format="chatml")[0].info["forward_passes"] == 0


def test_state_dict_hash():
    assert hash_state_dict(_model(0)) == hash_state_dict(_model(0))
    assert hash_state_dict(_model(0)) != hash_state_dict(_model(1))
    assert hash_state_dict(_model(0)) != hash_state_dict(_model(0).to(torch.float64))


def test_resume_against_other_reference_values_is_refused(tmp_path):
    ref, _ = _build(_model(), _pairs(), tmp_path)
    ref.load_state_dict(ref.state_dict())  # same key: fine
    with pytest.raises(RuntimeError, match="other reference log-probs"):
        ref.load_state_dict({"key": "0" * 40})


def _live_llamas() -> int:
    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


def _loop_cfg(tmp_path, name: str, **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp_path / name), chat_format="chatml", batch_size=4, max_steps=2, lr=1e-2,
                reference_cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    return DPOConfig(**{**base, **kw})


def test_dpo_loop_second_run_skips_the_reference_pass(tmp_path):
    counts = []
    before = _live_llamas()  # models other tests of this session may still hold
    first = train_dpo(
        _loop_cfg(tmp_path, "a"),
        model=_model(),
        tokenizer=TOK,
        train_data=ROWS,
        callbacks=[lambda step, rec: counts.append(_live_llamas() - before)],
    )
    assert counts == [1, 1]  # precomputed: no reference model exists during training
    # 2 steps of 4 pairs read 8 of the 12 pairs: only their 2 batches are scored
    assert first["reference"]["cache_hit"] is False and first["reference"]["forward_passes"] == 2
    assert first["reference"]["sequences_scored"] == 16 and first["reference"]["sequences_total"] == 24
    second = train_dpo(_loop_cfg(tmp_path, "b"), model=_model(), tokenizer=TOK, train_data=ROWS)
    assert second["reference"]["cache_hit"] is True and second["reference"]["forward_passes"] == 0
    assert second["last"]["loss"] == pytest.approx(first["last"]["loss"], abs=1e-7)
    # a changed model recomputes
    changed = _model()
    with torch.no_grad():
        changed.lm_head.weight[3, 0] += 1e-2
    third = train_dpo(_loop_cfg(tmp_path, "c"), model=changed, tokenizer=TOK, train_data=ROWS)
    assert third["reference"]["cache_hit"] is False and third["reference"]["forward_passes"] == 2


def test_reference_pass_is_sized_to_the_steps_and_a_longer_run_scores_only_the_rest(tmp_path):
    short = train_dpo(_loop_cfg(tmp_path, "short", max_steps=1), model=_model(), tokenizer=TOK, train_data=ROWS)
    assert short["reference"]["forward_passes"] == 1 and short["reference"]["sequences_scored"] == 8
    longer = train_dpo(_loop_cfg(tmp_path, "long", max_steps=3), model=_model(), tokenizer=TOK, train_data=ROWS)
    # 3 steps read all 12 pairs: the 4 already cached are not scored again
    assert longer["reference"]["cache_hit"] is False and longer["reference"]["sequences_scored"] == 16
    again = train_dpo(_loop_cfg(tmp_path, "again", max_steps=3), model=_model(), tokenizer=TOK, train_data=ROWS)
    assert again["reference"]["cache_hit"] is True and again["reference"]["forward_passes"] == 0
    # the table filled in two passes is the table of one pass over everything
    whole = _loop_cfg(tmp_path, "whole", max_steps=3, reference_cache_dir=str(tmp_path / "fresh"))
    train_dpo(whole, model=_model(), tokenizer=TOK, train_data=ROWS)
    [merged] = (tmp_path / "cache").glob("*.pt")
    [fresh] = (tmp_path / "fresh").glob("*.pt")
    a, b = (torch.load(p, weights_only=True)["logps"] for p in (merged, fresh))
    assert not torch.isnan(a).any()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lazy_batches_are_sized():
    from alignkit.data.plan import LazyBatches

    made = []
    batches = LazyBatches(list(range(10)), 4, lambda chunk: made.append(chunk) or [chunk, chunk[::-1]], per_chunk=2)
    assert made == []  # nothing built before iteration
    assert len(batches) == 6 and len(list(batches)) == 6 and made == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_lora_reference_is_the_adapter_off_base_model(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    before = _live_llamas()  # models other tests of this session may still hold
    lora = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    counts = []
    summary = train_dpo(
        _loop_cfg(tmp_path, "lora", reference="lora"),
        model=lora,
        tokenizer=TOK,
        train_data=ROWS,
        callbacks=[lambda step, rec: counts.append(_live_llamas() - before)],
    )
    assert summary["reference"]["kind"] == "lora"
    assert counts == [1, 1]  # one model in memory: the reference is the same module with the adapter off

    batch = collate_pairs(_pairs()[:6], pad_token_id=TOK.pad_token_id)
    base = _model()  # built afresh from the seed: the frozen weights LoRA trained on top of
    expected = batch_sequence_logps(base, batch)["sum"].detach()
    ref = LoraReference(SequenceScorer()).logps(lora, batch)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    policy = batch_sequence_logps(lora, batch)["sum"].detach()
    assert (policy - expected).abs().max() > 1e-3  # the adapter did train: the comparison is not vacuous
    with pytest.raises(ValueError, match="lora_r > 0"):
        train_dpo(_loop_cfg(tmp_path, "x", reference="lora"), model=_model(), tokenizer=TOK, train_data=ROWS)


def test_model_reference_and_tr_dpo_soft_sync():
    policy, ref_model = _model(0), _model(1)
    batch = collate_pairs(_pairs()[:4], pad_token_id=TOK.pad_token_id)
    ref = ModelReference(ref_model, SequenceScorer())
    assert not any(p.requires_grad for p in ref_model.parameters())
    torch.testing.assert_close(ref.logps(policy, batch), batch_sequence_logps(_model(1), batch)["sum"].detach())

    before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    synced = SyncedReference(ref_model, SequenceScorer(), alpha=0.25, sync_steps=3)
    synced.after_step(policy, 1)
    synced.after_step(policy, 2)
    assert all(torch.equal(before[k], v) for k, v in ref_model.state_dict().items())  # not a sync step
    synced.after_step(policy, 3)
    pol = dict(policy.named_parameters())
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(p, 0.25 * pol[name].detach() + 0.75 * before[name])
    state = synced.state_dict()
    fresh = SyncedReference(_model(2), SequenceScorer(), alpha=0.25, sync_steps=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, state["weights"][k]) for k, v in fresh.model.state_dict().items())
    with pytest.raises(ValueError):
        SyncedReference(_model(), SequenceScorer(), alpha=0.0)


def test_soft_update_alpha_one_copies_the_policy():
    a, b = _model(0), _model(1)
    soft_update(a, b, 1.0)
    assert hash_state_dict(a) == hash_state_dict(b)
