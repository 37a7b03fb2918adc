"""Rows -> input_ids + labels: masks, train_on modes, row formats, bad input, real tokenizers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit import templates
from alignkit.data import RowError, normalize_row, tokenize_conversation, tokenize_rows
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.tokenize import IGNORE_INDEX, tokenize_dataset
from tests import conformance_kit as ck

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def trained_runs(out) -> list[list[int]]:
    """Maximal runs of trained token ids."""
    runs, cur = [], []
    for i, lab in zip(out["input_ids"], out["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def trained_text(tok, out) -> list[str]:
    return [tok.decode(r) for r in trained_runs(out)]


def test_assistant_turns_and_end_of_turn_are_trained(tok):
    out = tokenize_conversation(tok, CONV, chat_format="chatml")
    assert trained_text(tok, out) == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert tok.decode(out["input_ids"]) == templates.get_format("chatml").render(CONV).text


def test_train_on_modes(tok):
    last = tokenize_conversation(tok, CONV, chat_format="chatml", train_on="last")
    assert trained_text(tok, last) == ["4<|im_end|>"]
    everything = tokenize_conversation(tok, CONV, chat_format="chatml", train_on="all")
    assert all(lab != IGNORE_INDEX for lab in everything["labels"])
    row = {"prompt": CONV[:4], "completion": CONV[4:]}
    comp = tokenize_conversation(tok, row, chat_format="chatml", train_on="completion")
    assert trained_text(tok, comp) == ["4<|im_end|>"]


def test_row_formats_agree(tok):
    sharegpt = {
        "conversations": [
            {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in CONV
        ]
    }
    a = tokenize_conversation(tok, CONV, chat_format="chatml")
    b = tokenize_conversation(tok, sharegpt, chat_format="chatml")
    c = tokenize_conversation(tok, {"prompt": CONV[:4], "completion": CONV[4:]}, chat_format="chatml")
    assert a["input_ids"] == b["input_ids"] == c["input_ids"]
    assert a["labels"] == b["labels"] == c["labels"]


def test_plain_prompt_completion_and_text(tok):
    out = tokenize_conversation(tok, {"prompt": "Q: 1+1\nA:", "completion": " 2"})
    assert trained_text(tok, out) == [" 2<|endoftext|>"]
    out = tokenize_conversation(tok, {"text": "hello"})
    assert trained_text(tok, out) == ["hello<|endoftext|>"]


def test_truncation_and_zero_trainable_rows_are_reported(tok):
    long_user = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]
    rows = [{"messages": CONV}, {"messages": long_user}]
    out, report = tokenize_rows(tok, rows, chat_format="chatml", max_length=120)
    assert report.rows == 2 and report.truncated == 1
    assert report.dropped_no_trainable == 1 and report.dropped_indices == [1]
    assert len(out) == 1 and "dropped with zero trainable tokens" in str(report)
    left = tokenize_conversation(tok, long_user, chat_format="chatml", max_length=20, truncation="left")
    assert len(left["input_ids"]) == 20 and left["num_trained_tokens"] > 0


def test_tokenize_dataset_matches_single_rows(tok):
    import datasets

    rows = [{"messages": CONV}, {"messages": CONV[1:3]}, {"messages": [CONV[1], {**CONV[2], "content": ""}]}]
    ds, report = tokenize_dataset(datasets.Dataset.from_list(rows), tok, chat_format="chatml")
    assert report.rows == 3
    for r, got in zip(rows, ds.to_list()):
        want = tokenize_conversation(tok, r, chat_format="chatml")
        assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"messages": [{"role": "user"}]}, "row 7, field 'messages[0].content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "row 7, field 'messages[0].role'"),
        ({"messages": [{"role": "user", "content": 3}]}, "expected a string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "must alternate"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "first message"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "both strings or both lists"),
        ({"question": "a"}, "one of 'messages'"),
        ({"text": 5}, "field 'text'"),
    ],
)
def test_bad_rows_name_row_field_and_expectation(row, needle):
    with pytest.raises(RowError) as e:
        normalize_row(row, 7)
    assert needle in str(e.value)
    assert "row 7" in str(e.value)


def test_bad_row_in_batch_names_its_index(tok):
    rows = [{"messages": CONV}] * 3 + [
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    ]
    with pytest.raises(RowError, match="row 3"):
        tokenize_rows(tok, rows, chat_format="chatml")


def test_detect_chatml_from_byte_tokenizer_and_generic_path(tok):
    assert templates.detect(tok).name == "chatml"
    tok2 = byte_tokenizer()
    tok2.chat_template = (
        "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}"
        "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    )
    assert templates.detect(tok2) is None
    out = tokenize_conversation(tok2, CONV)  # generic path: spans from incremental renders
    assert trained_text(tok2, out) == ["Hello!<|endoftext|>", "4<|endoftext|>"]


def test_generic_path_refuses_templates_that_rewrite_history(tok):
    tok2 = byte_tokenizer()
    # drops all but the last assistant message: incremental renders are not prefixes of each other
    tok2.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role }}: {{ m.content }}\n"
        "{% endif %}{% endfor %}"
    )
    with pytest.raises(RowError, match="rewrites earlier turns"):
        tokenize_conversation(tok2, CONV)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20)), min_size=1, max_size=4))
def test_trained_tokens_are_exactly_assistant_content(turns):
    tok = byte_tokenizer()
    msgs = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    out = tokenize_conversation(tok, msgs, chat_format="chatml")
    assert "".join(trained_text(tok, out)) == "".join(a + "<|im_end|>" for _, a in turns)


# --- real tokenizers, every format that claims a conformance template -------------------------------------

CLAIMS = [(f.name, fam) for f in templates.base.iter_formats() for fam in f.claims]
REAL = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
    {"role": "assistant", "content": "Tokyo 🗼, of course."},
]


@pytest.mark.skipif(not ck.HAVE_KIT, reason=ck.SKIP_REASON)
@pytest.mark.parametrize(("fmt_name", "family"), CLAIMS)
def test_real_tokenizer_trained_tokens_decode_to_assistant_turns(fmt_name, family):
    fmt = templates.get_format(fmt_name)
    tok = ck.load_tokenizer(ck.template_entry(family)["render_tokenizer"])
    sw = {k: v for k, v in ck.format_switches_for(family).items() if k in fmt.switches}
    r = fmt.render(REAL, **sw)
    out = tokenize_conversation(tok, REAL, chat_format=fmt, switches=sw)
    assert tok.decode(out["input_ids"]) == tok.decode(tok(r.text, add_special_tokens=False)["input_ids"])
    runs = trained_runs(out)
    want = r.trainable_text()
    assert len(runs) == len(want), (fmt_name, [tok.decode(x) for x in runs], want)
    for run, w in zip(runs, want):
        # Exact up to the boundary tokens: the run covers all of the trainable text, and without its first
        # and last token it lies inside it (a token may straddle a boundary when the end-of-turn marker is
        # not a special token of this tokenizer, e.g. "<|im_end|><" merging into "><").
        assert w.strip() in tok.decode(run), (fmt_name, tok.decode(run), w)
        assert tok.decode(run[1:-1]).strip() in w, (fmt_name, tok.decode(run), w)
    for m in REAL[1::2]:
        assert any(m["content"] in tok.decode(run) for run in runs)
