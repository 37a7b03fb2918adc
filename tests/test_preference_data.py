"""Preference rows -> tokens -> one concatenated chosen+rejected batch (alignkit.data.preference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.preference import (
    collate_pairs,
    collate_sequences,
    collate_unpaired,
    extract_prompt,
    normalize_preference_row,
    pair_sequences,
    tokenize_pairs,
    tokenize_unpaired,
    unpair_rows,
    unpaired_sequences,
)
from alignkit.data.rows import RowError
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.ops import split_pairs
from alignkit.scoring import batch_sequence_logps
from alignkit.templates import get_format

TOK = byte_tokenizer()
U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731


def _text(ids: list[int]) -> str:
    return TOK.decode(ids)


def _trained(ids: list[int], labels: list[int]) -> str:
    return TOK.decode([t for t, lab in zip(ids, labels) if lab != -100])


# ---------------------------------------------------------------------------------------------------------
# Row formats
# ---------------------------------------------------------------------------------------------------------


def test_explicit_plain_prompt():
    (p,), rep = tokenize_pairs(TOK, [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    assert _text(p["chosen_input_ids"]) == "2+2=4<|endoftext|>"
    assert _text(p["rejected_input_ids"]) == "2+2=5<|endoftext|>"
    assert _trained(p["chosen_input_ids"], p["chosen_labels"]) == "4<|endoftext|>"
    assert _trained(p["rejected_input_ids"], p["rejected_labels"]) == "5<|endoftext|>"
    assert rep.rows == rep.examples == 1 and rep.truncated == {"chosen": 0, "rejected": 0}


def test_explicit_conversational_prompt_renders_once_like_inference():
    row = {"prompt": [U("12+7")], "chosen": [A("19")], "rejected": [A("18")]}
    (p,), _ = tokenize_pairs(TOK, [row], chat_format="chatml")
    full = get_format("chatml").render([U("12+7"), A("19")]).text
    assert p["chosen_input_ids"] == TOK(full, add_special_tokens=False)["input_ids"]  # one render, one encode
    assert _trained(p["chosen_input_ids"], p["chosen_labels"]) == "19<|im_end|>"
    assert _trained(p["rejected_input_ids"], p["rejected_labels"]) == "18<|im_end|>"
    # the prompt (and generation header) is shared and untrained
    n_prompt = len(TOK(get_format("chatml").render([U("12+7")], add_generation_prompt=True).text)["input_ids"])
    assert p["chosen_input_ids"][:n_prompt] == p["rejected_input_ids"][:n_prompt]
    assert set(p["chosen_labels"][:n_prompt]) == {-100}


def test_implicit_conversational_prompt_equals_explicit():
    implicit = {"chosen": [U("hi"), A("hello"), U("2+2"), A("4")], "rejected": [U("hi"), A("hello"), U("2+2"), A("5")]}
    explicit = {"prompt": [U("hi"), A("hello"), U("2+2")], "chosen": [A("4")], "rejected": [A("5")]}
    assert normalize_preference_row(implicit) == (explicit["prompt"], explicit["chosen"], explicit["rejected"])
    a, _ = tokenize_pairs(TOK, [implicit], chat_format="chatml")
    b, _ = tokenize_pairs(TOK, [explicit], chat_format="chatml")
    assert a[0] == b[0]
    # only the final assistant turn is trained (the earlier one is prompt)
    assert _trained(a[0]["chosen_input_ids"], a[0]["chosen_labels"]) == "4<|im_end|>"


def test_implicit_plain_prompt_moves_the_space_into_the_completions():
    assert extract_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A:", " 4", " 5")
    a, _ = tokenize_pairs(TOK, [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}])
    b, _ = tokenize_pairs(TOK, [{"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}])
    assert a[0] == b[0]


def test_implicit_prompt_keeps_one_message_when_one_side_extends_the_other():
    p, c, r = extract_prompt([U("a"), A("b")], [U("a"), A("b"), U("c"), A("d")])
    assert p == [U("a")] and c == [A("b")] and r == [A("b"), U("c"), A("d")]
    p, c, r = extract_prompt("abc", "abcd")
    assert (p, c, r) == ("ab", "c", "cd")


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "x", "chosen": "y"}, "rejected"),
        ({"prompt": "x", "rejected": "y"}, "chosen"),
        ({"prompt": "x", "chosen": "y", "rejected": [A("z")]}, "chosen/rejected/prompt"),
        ({"prompt": "x", "chosen": 3, "rejected": "z"}, "chosen"),
        ({"chosen": [U("a"), A("b")], "rejected": [U("a"), A("b")]}, "chosen/rejected"),
        ({"prompt": "x", "chosen": "", "rejected": "z"}, "chosen"),
        (
            {"prompt": [U("x")], "chosen": [{"role": "robot", "content": "y"}], "rejected": [A("z")]},
            "chosen[0].role",  # the row's own name, never an internal completion
        ),
    ],
)
def test_bad_pair_rows_name_row_and_field(row, field):
    rows = [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row]
    with pytest.raises(RowError) as e:
        tokenize_pairs(TOK, rows, chat_format="chatml")
    assert e.value.index == 1 and e.value.field == field
    assert "row 1" in str(e.value) and "expected" in str(e.value)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "x", "completion": "y", "label": "yes"}, "label"),
        ({"prompt": "x", "label": True}, "completion"),
        ({"prompt": "x", "completion": [A("y")], "label": False}, "prompt/completion"),
    ],
)
def test_bad_unpaired_rows_name_row_and_field(row, field):
    with pytest.raises(RowError) as e:
        unpair_rows([{"prompt": "a", "completion": "b", "label": True}, row])
    assert e.value.index == 1 and e.value.field == field


def test_truncation_is_counted_and_empty_completions_dropped():
    rows = [
        {"prompt": "short:", "chosen": "a" * 30, "rejected": "b"},  # chosen truncated, still has tokens
        {"prompt": "p" * 40, "chosen": "c", "rejected": "d"},  # completions cut away entirely: dropped
        {"prompt": "ok:", "chosen": "e", "rejected": "f"},
    ]
    pairs, rep = tokenize_pairs(TOK, rows, max_length=20)
    assert rep.truncated == {"chosen": 2, "rejected": 1}
    assert rep.dropped_indices == [1]
    assert [p["index"] for p in pairs] == [0, 2] and [p["id"] for p in pairs] == [0, 1]
    assert all(len(p["chosen_input_ids"]) <= 20 for p in pairs)
    with pytest.raises(ValueError, match="row 0"):
        tokenize_pairs(TOK, rows, max_length=20, truncation="error")


# ---------------------------------------------------------------------------------------------------------
# Unpaired (KTO)
# ---------------------------------------------------------------------------------------------------------


def test_paired_rows_unpair_automatically_with_mismatched_kl_sequences():
    rows = [{"prompt": [U(f"{a}+1")], "chosen": [A(str(a + 1))], "rejected": [A(str(a + 10))]} for a in range(3)] + [
        {"prompt": [U("9+9")], "completion": [A("18")], "label": True}
    ]
    ex, rep = tokenize_unpaired(TOK, rows, chat_format="chatml")
    assert [e["desirable"] for e in ex] == [True, False, True, False, True, False, True]
    assert [e["index"] for e in ex] == [0, 0, 1, 1, 2, 2, 3]
    assert rep.rows == 4 and rep.examples == 7
    assert _trained(ex[1]["input_ids"], ex[1]["labels"]) == "10<|im_end|>"
    prompts = [_text(e["input_ids"]).split("<|im_start|>assistant")[0] for e in ex]
    for e, p in zip(ex, prompts):
        kl = _text(e["kl_input_ids"])
        assert kl.startswith(p)  # its own prompt ...
        answer = _trained(e["kl_input_ids"], e["kl_labels"])
        owners = [q for q, o in zip(prompts, ex) if _trained(o["input_ids"], o["labels"]) == answer]
        assert owners and p not in owners  # ... with a completion of another prompt
    seqs = unpaired_sequences(ex)
    assert len(seqs) == 14 and [e["kl_id"] for e in ex] == list(range(7, 14))
    assert seqs[8] == (ex[1]["kl_input_ids"], ex[1]["kl_labels"])
    b = collate_unpaired(ex[:3], pad_token_id=TOK.pad_token_id, kl=True)
    assert b["global_ids"].tolist() == [7, 8, 9] and b["desirable"].tolist() == [True, False, True]


def test_unpaired_without_kl_and_too_few_examples():
    rows = [{"prompt": "a", "completion": "b", "label": True}]
    ex, _ = tokenize_unpaired(TOK, rows, kl_completions=False)
    assert "kl_input_ids" not in ex[0] and unpaired_sequences(ex) == [(ex[0]["input_ids"], ex[0]["labels"])]
    with pytest.raises(ValueError, match="at least 2"):
        tokenize_unpaired(TOK, rows)


# ---------------------------------------------------------------------------------------------------------
# Collation: one concatenated forward
# ---------------------------------------------------------------------------------------------------------


ROWS = [
    {"prompt": [U("12+7")], "chosen": [A("19")], "rejected": [A("18")]},
    {"prompt": [U("3+4")], "chosen": [A("7")], "rejected": [A("17")]},
    {"prompt": [U("50+50")], "chosen": [A("100")], "rejected": [A("10")]},
]


def test_collate_pairs_layout_chosen_then_rejected():
    pairs, _ = tokenize_pairs(TOK, ROWS, chat_format="chatml")
    b = collate_pairs(pairs, pad_token_id=TOK.pad_token_id)
    assert b["input_ids"].shape[0] == 6 and b["n_sequences"] == 6
    for k, p in enumerate(pairs):
        n = len(p["chosen_input_ids"])
        assert b["input_ids"][k, :n].tolist() == p["chosen_input_ids"]
        n = len(p["rejected_input_ids"])
        assert b["input_ids"][3 + k, :n].tolist() == p["rejected_input_ids"]
    lc, lr = split_pairs(b["lengths"])
    assert lc.tolist() == [3, 2, 4] and lr.tolist() == [3, 3, 3]  # answer tokens + <|im_end|>
    assert b["pair_min_lengths"].tolist() == [3, 2, 3, 3, 2, 3]
    assert b["global_ids"].tolist() == [0, 2, 4, 1, 3, 5]
    assert pair_sequences(pairs)[3] == (pairs[1]["rejected_input_ids"], pairs[1]["rejected_labels"])
    # token ranks 1..n over each sequence's completion tokens
    for k in range(6):
        ranks = b["token_rank"][k][b["labels"][k] != -100].tolist()
        assert ranks == list(range(1, int(b["lengths"][k]) + 1))


def test_packed_batch_gives_the_same_sequence_logps_as_padded():
    torch.manual_seed(0)
    model = build_tiny_model(tiny_llama_config(len(TOK), hidden=16, layers=1, heads=2, kv_heads=2), seed=0)
    pairs, _ = tokenize_pairs(TOK, ROWS, chat_format="chatml")
    padded = collate_pairs(pairs, pad_token_id=TOK.pad_token_id)
    packed = collate_pairs(pairs, pad_token_id=TOK.pad_token_id, packing=True, capacity=64)
    assert packed["input_ids"].shape[1] <= 64 and packed["input_ids"].shape[0] < 6  # several docs per row
    a = batch_sequence_logps(model, padded, ld_alpha=0.3, wpo=True)
    b = batch_sequence_logps(model, packed, ld_alpha=0.3, wpo=True)
    for key in ("sum", "n_tokens", "ld_sum", "wpo"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed["token_rank"].max(), padded["token_rank"].max())
    # each sequence reduced alone gives the same value as in the batch
    for k, (ids, labels) in enumerate(
        [(p["chosen_input_ids"], p["chosen_labels"]) for p in pairs]
        + [(p["rejected_input_ids"], p["rejected_labels"]) for p in pairs]
    ):
        alone = batch_sequence_logps(model, collate_sequences([(ids, labels)], pad_token_id=0))
        torch.testing.assert_close(alone["sum"][0], a["sum"][k], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.booleans(), min_size=1, max_size=12),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_token_rank_and_lengths_property(masks, packing):
    seqs = [(list(range(5, 5 + len(m))), [5 + i if keep else -100 for i, keep in enumerate(m)]) for m in masks]
    b = collate_sequences(seqs, pad_token_id=0, packing=packing, capacity=12)
    for k, (_, labels) in enumerate(seqs):
        expected = sum(1 for lab in labels[1:] if lab != -100)  # the first token is never scored
        assert int(b["lengths"][k]) == expected
        sel = b["sequence_ids"] == k
        assert int(sel.sum()) == len(labels)
        ranks = b["token_rank"][sel & (b["labels"] != -100)]
        assert ranks.tolist() == list(range(1, expected + 1))
    assert int((b["sequence_ids"] >= 0).sum()) == sum(len(s[0]) for s in seqs)
