"""The in-code byte tokenizer: exact round trip, atomic specials, offsets, ChatML, save/load."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from alignkit.data.byte_tokenizer import EOS_TOKEN, IM_END, IM_START, byte_tokenizer

SPECIALS = (EOS_TOKEN, IM_START, IM_END)


def plain_text(max_size: int):
    """Text without a special token in it: there every character is its UTF-8 bytes. (Hypothesis also draws string
    constants of the code under test, such as "<|im_end|>", which is one atomic id, see the specials test below.)"""
    return st.text(max_size=max_size).filter(lambda t: not any(s in t for s in SPECIALS))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _expected_offsets(text: str) -> list[tuple[int, int]]:
    """One (i, i+1) span per UTF-8 byte of character i."""
    return [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode("utf-8")]


@settings(max_examples=50, deadline=None)
@given(text=plain_text(max_size=60))
@example(text="<|im_end|")  # a special token's prefix is plain bytes
def test_ids_are_utf8_bytes_and_round_trip(tok, text):
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def _no_special_spelled_by_text(parts: list[str]) -> bool:
    """No run of consecutive text parts joins into a special (e.g. "<|im_" + "end|>"): that would be one id too."""
    run = ""
    for part in [*parts, IM_END]:
        if part in SPECIALS:
            if any(s in run for s in SPECIALS):
                return False
            run = ""
        else:
            run += part
    return True


@settings(max_examples=50, deadline=None)
@given(
    parts=st.lists(
        st.one_of(plain_text(max_size=12), st.sampled_from(SPECIALS)),
        max_size=8,
    ).filter(_no_special_spelled_by_text)
)
def test_specials_atomic_anywhere_and_round_trip(tok, parts):
    # Specials are matched before the byte model sees the text, even glued to other characters.
    text = "".join(parts)
    ids = tok(text)["input_ids"]
    expected: list[int] = []
    for part in parts:
        expected += [tok.convert_tokens_to_ids(part)] if part in SPECIALS else list(part.encode("utf-8"))
    assert ids == expected
    assert tok.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(text=plain_text(max_size=40))
@example(text="|im_start|>é")
def test_offsets_are_character_spans(tok, text):
    enc = tok(text, return_offsets_mapping=True)
    assert [tuple(o) for o in enc["offset_mapping"]] == _expected_offsets(text)


def test_offsets_with_specials(tok):
    text = "a<|im_start|>é b<|im_end|>"
    enc = tok(text, return_offsets_mapping=True)
    spans = [tuple(o) for o in enc["offset_mapping"]]
    pieces = [text[s:e] for s, e in spans]
    assert pieces == ["a", IM_START, "é", "é", " ", "b", IM_END]


def test_vocab_and_special_ids(tok):
    assert len(tok) == 259
    ids = tok.convert_tokens_to_ids(list(SPECIALS))
    assert ids == [256, 257, 258]
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.pad_token_id == 256
    assert tok.bos_token is None
    # no BOS/EOS is added implicitly
    assert tok("hi")["input_ids"] == [104, 105]
    assert tok.decode([104, 256, 105], skip_special_tokens=True) == "hi"


def test_extra_special_tokens(tmp_path):
    tok = byte_tokenizer(["<tool>", IM_END, "<tool>"])  # duplicates and built-ins are ignored
    assert len(tok) == 260
    assert tok("x<tool>y")["input_ids"] == [120, 259, 121]


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo"},
        {"role": "assistant", "content": "hi 🙂"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhéllo<|im_end|>\n"
        "<|im_start|>assistant\nhi 🙂<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"

    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids == tok(text)["input_ids"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "hi 🙂<|im_end|>"


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nñ 🙂<|im_end|>\n"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.chat_template == tok.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (256, 256, 259)
