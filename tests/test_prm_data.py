"""PRM data: step splitting round trips, Math-Shepherd parsing, row errors, and label placement checked by decoding
the labelled tokens of real tokenizers on PRM800K and Math-Shepherd rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.prm import (
    IGNORE_INDEX,
    STEP_SPLITS,
    StepSplitter,
    join_steps,
    label_positions,
    normalize_prm_row,
    parse_math_shepherd,
    split_steps,
    step_layouts,
    tokenize_prm_row,
    tokenize_prm_rows,
)
from alignkit.data.rows import RowError
from tests import conformance_kit as ck

DATA = Path(os.environ.get("ALIGNKIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
PRM800K = DATA / "prm800k_phase1_test" / "prm800k_phase1_test.jsonl"
SHEPHERD = DATA / "math_shepherd_samples"
need_data = pytest.mark.skipif(not PRM800K.is_file(), reason=f"shared data not found at {DATA} (set ALIGNKIT_SHARED)")
need_kit = pytest.mark.skipif(not ck.HAVE_KIT, reason=ck.SKIP_REASON)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------------------------------

_body = st.text(alphabet="abcxyz019+-=*$. \t:", min_size=1, max_size=20).map(str.strip).filter(bool)


def _steps_for(how: str):  # noqa: ANN202
    if how == "headers":
        return st.lists(_body.filter(lambda b: "Step" not in b), min_size=1, max_size=6).map(
            lambda bs: [f"Step {k + 1}: {b}" for k, b in enumerate(bs)]
        )
    return st.lists(_body, min_size=0, max_size=6)


@pytest.mark.parametrize("how", sorted(STEP_SPLITS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_split_join_round_trip(how: str, data: st.DataObject) -> None:
    steps = data.draw(_steps_for(how))
    sp = StepSplitter(how)
    text = sp.join(steps)
    assert sp.split(text) == steps
    assert sp.join(sp.split(text)) == text  # canonical text survives the other way round


def test_split_examples() -> None:
    assert split_steps("a\n\nb\n \nc\n", "paragraphs") == ["a", "b", "c"]
    assert split_steps("a\nb\n\nc", "separator") == ["a", "b", "c"]
    assert split_steps("a || b || c", "separator", separator="||") == ["a", "b", "c"]
    text = "Let me think. Step 1: x=1. Step 2: y=2.\nStep 3: done"
    assert split_steps(text, "headers") == ["Let me think.", "Step 1: x=1.", "Step 2: y=2.", "Step 3: done"]
    assert split_steps("xStep 1: no header here", "headers") == ["xStep 1: no header here"]
    assert split_steps("s1 ки\ns2 ки\ntail", "marker") == ["s1", "s2", "tail"]
    assert join_steps(["s1", "s2"], "marker") == "s1 ки\ns2 ки"
    assert split_steps("", "paragraphs") == []
    with pytest.raises(ValueError, match="unknown step split"):
        StepSplitter("sentences")


@need_data
def test_math_shepherd_parse_matches_normalised_file() -> None:
    raw = _jsonl(SHEPHERD / "raw" / "samples_math-shepherd.jsonl")
    norm = _jsonl(SHEPHERD / "math_shepherd_samples.jsonl")
    assert len(raw) == len(norm) == 7
    for r, n in zip(raw, norm):
        assert parse_math_shepherd(r["input"], r["label"]) == n
        # The solution part is the canonical marker form of the steps.
        solution = r["input"][len(n["prompt"]) + 1 :]
        assert join_steps(n["completions"], "marker") == solution
        assert split_steps(solution, "marker") == n["completions"]
        assert split_steps(solution.replace(" ки", ""), "headers") == n["completions"]
    assert parse_math_shepherd(raw[0]["input"]) == {k: norm[0][k] for k in ("prompt", "completions")}
    with pytest.raises(ValueError, match="in place of the marker"):
        parse_math_shepherd(raw[0]["input"], raw[0]["label"].replace(" +\n", " ?\n", 1))


@need_data
def test_prm800k_steps_round_trip_through_text() -> None:
    rows = _jsonl(PRM800K)
    sp = StepSplitter("separator", separator="\n")
    checked = 0
    for r in rows:
        steps = r["completions"]
        if all(s and s == s.strip() and "\n" not in s for s in steps):
            assert sp.split(sp.join(steps)) == steps
            checked += 1
    assert checked > 1000
    # Final steps carry "# Answer" blocks separated by blank lines: the paragraph split keeps them apart.
    final = next(r["completions"][-1] for r in rows if "# Answer" in r["completions"][-1])
    assert "# Answer" in split_steps(final, "paragraphs")


# --------------------------------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------------------------------


def test_row_errors_name_field() -> None:
    ok = {"prompt": "p", "completions": ["a", "b"], "labels": [True, 0.25]}
    assert normalize_prm_row(ok).labels == [1.0, 0.25]
    bad = [
        ({**ok, "labels": [True]}, "labels", "2 labels"),
        ({**ok, "completions": "a\nb"}, "completions", "list of step strings"),
        ({**ok, "labels": [True, 1.5]}, "labels[1]", "probability"),
        ({**ok, "labels": [True, None]}, "labels[1]", "bool"),
        ({**ok, "completions": ["a", 3]}, "completions[1]", "string"),
        ({k: v for k, v in ok.items() if k != "prompt"}, "prompt", "present"),
        ({**ok, "prompt": [{"role": "robot", "content": "x"}]}, "prompt[0].role", "one of"),
    ]
    for row, field, expect in bad:
        with pytest.raises(RowError, match=expect) as e:
            normalize_prm_row(row, 7)
        assert e.value.field == field and e.value.index == 7


# --------------------------------------------------------------------------------------------------------------------
# label placement
# --------------------------------------------------------------------------------------------------------------------


def _check_placement(tok, row: dict, ex: dict, sep: str) -> None:  # noqa: ANN001
    """Every labelled token closes `step + sep`, decodes to the separator's last token, and carries the label."""
    ids, labels = ex["input_ids"], ex["labels"]
    pos = [i for i, v in enumerate(labels) if v != IGNORE_INDEX]
    assert [labels[p] for p in pos] == [int(v) for v in row["labels"]]
    sep_ids = tok.encode(sep, add_special_tokens=False)
    start = len(ids) - sum(len(tok.encode(s, add_special_tokens=False)) + len(sep_ids) for s in row["completions"])
    prompt_ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(
        row["prompt"], add_special_tokens=False
    )
    assert ids[:start] == prompt_ids and all(v == IGNORE_INDEX for v in labels[:start])
    for step, p in zip(row["completions"], pos):
        assert tok.decode(ids[start : p + 1]) == step + sep
        assert ids[p] == sep_ids[-1]
        assert tok.decode(ids[p - len(sep_ids) + 1 : p + 1]) == sep
        start = p + 1
    assert start == len(ids)


# One real tokenizer (loading one takes ~20 s): Llama 3's, whose BOS also exercises the prompt prefix.
TOKENIZER = "llama3"


@need_data
@need_kit
def test_label_placement_prm800k() -> None:
    tok = ck.load_tokenizer(TOKENIZER)
    rows = _jsonl(PRM800K)[::8]  # 402 rows across all problems
    examples, report = tokenize_prm_rows(tok, rows)
    assert len(examples) == len(rows) and report.steps_dropped == report.rows_dropped == 0
    assert report.steps == sum(len(r["completions"]) for r in rows)
    assert sum(e["num_steps"] for e in examples) == report.steps
    for r, ex in zip(rows, examples):
        _check_placement(tok, r, ex, "\n")
        assert tok.decode(ex["input_ids"][[i for i, v in enumerate(ex["labels"]) if v != IGNORE_INDEX][0]]) == "\n"


@need_data
@need_kit
@pytest.mark.parametrize("sep", ["\n", " ки", "\n\n"])
def test_label_placement_math_shepherd(sep: str) -> None:
    tok = ck.load_tokenizer(TOKENIZER)
    rows = _jsonl(SHEPHERD / "math_shepherd_samples.jsonl")
    examples, report = tokenize_prm_rows(tok, rows, step_separator=sep)
    assert report.rows == 7 and len(examples) == 7
    for r, ex in zip(rows, examples):
        _check_placement(tok, r, ex, sep)
    # Some of the labels are "bad" steps, and they sit where the decoded separator is.
    assert any(v == 0 for ex in examples for v in ex["labels"])


# --------------------------------------------------------------------------------------------------------------------
# options: truncation, last step only, soft labels, chat prompts
# --------------------------------------------------------------------------------------------------------------------

ROW = {"prompt": "Q:", "completions": ["1+1=2", "2+2=5", "5+1=6"], "labels": [True, False, False]}


def test_truncation_counts_dropped_steps() -> None:
    tok = byte_tokenizer()  # one token per byte: positions are easy to reason about
    full = tokenize_prm_row(tok, ROW)
    ends = [i for i, v in enumerate(full["labels"]) if v != IGNORE_INDEX]
    assert ends == [7, 13, 19]  # "Q:" + "1+1=2\n" ...: the newline closing each step
    for max_length, kept in [(20, 3), (19, 2), (14, 2), (13, 1), (8, 1), (7, 0)]:
        ex = tokenize_prm_row(tok, ROW, max_length=max_length)
        assert ex["num_steps"] == kept and ex["num_steps_dropped"] == 3 - kept
        assert ex["labels"] == full["labels"][: len(ex["labels"])]
        assert len(ex["input_ids"]) == (ends[kept - 1] + 1 if kept else 0)
    rows = [ROW, {**ROW, "prompt": "A much longer prompt"}]
    examples, report = tokenize_prm_rows(tok, rows, max_length=14)
    assert report.rows_truncated == 2 and report.rows_dropped == 1 and report.dropped_indices == [1]
    assert report.steps_dropped == 1 + 3 and len(examples) == 1


def test_train_on_last_step_only_and_positions() -> None:
    tok = byte_tokenizer()
    ex = tokenize_prm_row(tok, ROW, train_on_last_step_only=True)
    assert [(i, v) for i, v in enumerate(ex["labels"]) if v != IGNORE_INDEX] == [(19, 0)]
    (layout,) = step_layouts(tok, [ROW["prompt"]], [ROW["completions"]])
    assert label_positions(layout) == [7, 13, 19] and label_positions(layout, 14) == [7, 13]
    # Truncating the last step away leaves nothing to train on with last-step-only.
    assert tokenize_prm_row(tok, ROW, train_on_last_step_only=True, max_length=19)["num_steps"] == 0


def test_soft_labels() -> None:
    tok = byte_tokenizer()
    soft_row = {**ROW, "labels": [0.9, 0.2, 0.6]}
    examples, _ = tokenize_prm_rows(tok, [ROW, soft_row])
    assert all("soft_labels" in e for e in examples)  # one soft row makes every example carry soft labels
    hard, soft = examples
    pos = [i for i, v in enumerate(soft["labels"]) if v != IGNORE_INDEX]
    assert [soft["labels"][p] for p in pos] == [1, 0, 1]
    assert [soft["soft_labels"][p] for p in pos] == pytest.approx([0.9, 0.2, 0.6])
    assert sum(soft["soft_labels"]) == pytest.approx(1.7)  # zero elsewhere
    assert [hard["soft_labels"][p] for p in pos] == [1.0, 0.0, 0.0]
    assert "soft_labels" not in tokenize_prm_rows(tok, [ROW])[0][0]


def test_chat_prompt_and_prompt_truncation() -> None:
    tok = byte_tokenizer()
    row = {**ROW, "prompt": [{"role": "user", "content": "Add."}]}
    ex = tokenize_prm_row(tok, row)
    rendered = "<|im_start|>user\nAdd.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex["input_ids"]).startswith(rendered + "1+1=2\n2+2=5\n")
    assert [tok.decode(ex["input_ids"][i]) for i, v in enumerate(ex["labels"]) if v != IGNORE_INDEX] == ["\n"] * 3
    short = tokenize_prm_row(tok, {**ROW, "prompt": "abcdef"}, max_prompt_length=2)
    assert tok.decode(short["input_ids"]).startswith("ef1+1=2\n")


@need_kit
def test_bos_for_plain_prompts_only() -> None:
    tok = ck.load_tokenizer(TOKENIZER)
    plain = tokenize_prm_row(tok, ROW)
    assert plain["input_ids"][0] == tok.bos_token_id
    assert tokenize_prm_row(tok, ROW, add_bos=False)["input_ids"][0] != tok.bos_token_id
    kept = tokenize_prm_row(tok, {**ROW, "prompt": "one two three four five"}, max_prompt_length=2)
    assert kept["input_ids"][0] == tok.bos_token_id and tok.decode(kept["input_ids"][1:2]) == " five"
