"""A corpus of bad input files through the CLI of every loop that reads rows (sft, dpo, kto, reward, prm, grpo,
rloo): each case ends in a non-zero exit with ONE stderr line naming the file, the line / row and the field as
the user wrote it (no traceback; ``--debug`` shows one), or in a counted, reported drop.

The files are generated under ``tmp_path``; one tiny Llama folder (byte tokenizer) serves every loop. Data errors
are found before any training step, so each failing case costs a model load and a file read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alignkit.cli import main
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.loading import load_rows, track_sources
from alignkit.data.preference import tokenize_pairs, unpair_rows
from alignkit.data.prompts import load_prompts
from alignkit.data.rows import RowError
from alignkit.models import build_tiny_model, tiny_llama_config

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731

TOK = byte_tokenizer()

# one row each loop accepts; the cases below break one thing in it
GOOD: dict[str, dict[str, Any]] = {
    "sft": {"messages": [U("hi"), A("yo")]},
    "dpo": {"prompt": "q:", "chosen": " a", "rejected": " b"},
    "reward": {"prompt": "q:", "chosen": " a", "rejected": " b"},
    "kto": {"prompt": "q:", "completion": " a", "label": True},
    "prm": {"prompt": "q:", "completions": ["s1", "s2"], "labels": [True, False]},
    "grpo": {"prompt": "q:", "answer": "1"},
    "rloo": {"prompt": "q:", "answer": "1"},
}
LOOPS = list(GOOD)

# per loop: a row with a field missing / of the wrong type, and the field the error must name
MISSING = {
    "sft": ({"question": "hi"}, "messages"),
    "dpo": ({"prompt": "q:", "chosen": " a"}, "rejected"),
    "reward": ({"prompt": "q:", "rejected": " b"}, "chosen"),
    "kto": ({"prompt": "q:", "label": False}, "completion"),
    "prm": ({"prompt": "q:", "completions": ["s1"]}, "labels"),
    "grpo": ({"question": "q:", "answer": "1"}, "prompt"),
    "rloo": ({"question": "q:", "answer": "1"}, "prompt"),
}
WRONG_TYPE = {
    "sft": ({"messages": "hi"}, "messages"),
    "dpo": ({"prompt": "q:", "chosen": 5, "rejected": " b"}, "chosen"),
    "reward": ({"prompt": "q:", "chosen": " a", "rejected": ["b"]}, "rejected"),
    "kto": ({"prompt": "q:", "completion": 5, "label": True}, "completion"),
    "prm": ({"prompt": "q:", "completions": "s1\ns2", "labels": [True, False]}, "completions"),
    "grpo": ({"prompt": 5, "answer": "1"}, "prompt"),
    "rloo": ({"prompt": {"role": "user"}, "answer": "1"}, "prompt"),
}


def _args(cmd: str, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    args = [cmd, f"model={model}", f"dataset={data}", f"output_dir={out}", "max_steps=1", "progress=false"]
    if cmd not in ("grpo", "rloo"):
        args += ["batch_size=2"]
    if cmd != "prm":
        args += ["chat_format=chatml"]
    if cmd in ("dpo", "kto"):
        args += [f"reference_cache_dir={out.parent / 'refcache'}"]
    if cmd in ("grpo", "rloo"):
        args += ["rewards=math_answer", "group_size=2", "prompts_per_step=2", "max_new_tokens=2"]
    return args + list(extra)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + byte tokenizer folder every loop loads (reward / prm add their heads on load)."""
    d = tmp_path_factory.mktemp("tiny")
    end = TOK.convert_tokens_to_ids("<|im_end|>")
    cfg = tiny_llama_config(len(TOK), hidden=16, layers=1, heads=2, kv_heads=1, eos_token_id=end)
    cfg.pad_token_id = TOK.pad_token_id
    build_tiny_model(cfg, seed=0).save_pretrained(d)
    TOK.save_pretrained(d)
    return d


@pytest.fixture
def run_cli(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str, str]]:
    """`run_cli(cmd, data_file, *extra)` -> (exit code, stdout, stderr) of `alignkit cmd` in process."""

    def run(cmd: str, data: Path, *extra: str, debug: bool = False) -> tuple[int, str, str]:
        capsys.readouterr()
        argv = _args(cmd, model_dir, data, tmp_path / f"run-{cmd}", *extra)
        rc = main((["--debug"] if debug else []) + argv)
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _one_line_error(cmd: str, rc: int, err: str, *needles: str) -> str:
    """The run failed with exit 2 and its stderr ends in one `alignkit CMD: error: ...` line holding `needles`."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert line.startswith(f"alignkit {cmd}: error: "), err
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------------------------------------------------
# the corpus, through every loop
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", LOOPS)
def test_file_level_errors_in_every_loop(cmd: str, run_cli: Callable, tmp_path: Path) -> None:
    good = json.dumps(GOOD[cmd]).encode()
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    rc, _, err = run_cli(cmd, empty)
    _one_line_error(cmd, rc, err, f"{empty}:", "empty file")

    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n")
    _one_line_error(cmd, *run_cli(cmd, blank)[::2], f"{blank}:", "empty file")

    utf = tmp_path / "latin1.jsonl"
    utf.write_bytes(good + b"\n" + good[:-1] + b', "note": "caf\xe9"}\n')
    _one_line_error(cmd, *run_cli(cmd, utf)[::2], f"{utf}, line 2 (row 1)", "UTF-8", "0xe9")

    bad_json = tmp_path / "malformed.jsonl"
    bad_json.write_bytes(good + b"\n\n" + good[:-1] + b",}\n" + good + b"\n")
    _one_line_error(cmd, *run_cli(cmd, bad_json)[::2], f"{bad_json}, line 3 (row 1)", "JSON")

    not_object = tmp_path / "list_line.jsonl"
    not_object.write_bytes(good + b"\n[1, 2]\n")
    _one_line_error(cmd, *run_cli(cmd, not_object)[::2], f"{not_object}, line 2 (row 1)", "JSON object")


@pytest.mark.parametrize("cmd", LOOPS)
def test_row_errors_in_every_loop(cmd: str, run_cli: Callable, tmp_path: Path) -> None:
    good = GOOD[cmd]
    for name, (row, field) in (("missing", MISSING[cmd]), ("wrong_type", WRONG_TYPE[cmd])):
        # blank lines before the bad row: the line number is the file's, the row number the dataset's
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join([json.dumps(good), "", json.dumps(good), json.dumps(row), json.dumps(good)]) + "\n")
        rc, _, err = run_cli(cmd, path)
        _one_line_error(cmd, rc, err, f"{path}, line 4 (row 2), field {field!r}: expected")


@pytest.mark.parametrize("cmd", ["sft", "dpo", "kto", "prm", "grpo"])
def test_json_array_file_names_its_row(cmd: str, run_cli: Callable, tmp_path: Path) -> None:
    row, field = WRONG_TYPE[cmd]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD[cmd], GOOD[cmd], row]))
    _one_line_error(cmd, *run_cli(cmd, path)[::2], f"{path}, row 2, field {field!r}: expected")


def test_errors_in_the_eval_file_name_the_eval_file(run_cli: Callable, tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [GOOD["dpo"]] * 4)
    evals = _jsonl(tmp_path / "eval.jsonl", [GOOD["dpo"], {"prompt": "q:", "chosen": "", "rejected": " b"}])
    rc, _, err = run_cli("dpo", train, f"eval_dataset={evals}", "eval_split=train")
    _one_line_error("dpo", rc, err, f"{evals}, line 2 (row 1), field 'chosen'", "non-empty")


def test_nan_and_string_labels_blame_label_in_kto(run_cli: Callable, tmp_path: Path) -> None:
    good = json.dumps(GOOD["kto"])
    nan = tmp_path / "nan.jsonl"
    nan.write_text(good + "\n" + good.replace("true", "NaN") + "\n")  # Python's json writes NaN; JSON has none
    _one_line_error("kto", *run_cli("kto", nan)[::2], f"{nan}, line 2 (row 1), field 'label'", "NaN")
    text = _jsonl(tmp_path / "yes.jsonl", [GOOD["kto"], {**GOOD["kto"], "label": "yes"}])
    _one_line_error("kto", *run_cli("kto", text)[::2], f"{text}, line 2 (row 1), field 'label'", "'yes'")
    null = _jsonl(tmp_path / "null.jsonl", [GOOD["kto"], {**GOOD["kto"], "label": None}])
    _one_line_error("kto", *run_cli("kto", null)[::2], f"{null}, line 2 (row 1), field 'label'", "a bool")


@pytest.mark.parametrize("cmd", ["dpo", "reward", "kto"])
def test_empty_chosen_is_an_error(cmd: str, run_cli: Callable, tmp_path: Path) -> None:
    explicit = _jsonl(tmp_path / "explicit.jsonl", [GOOD["dpo"], {"prompt": "q:", "chosen": "", "rejected": " b"}])
    _one_line_error(cmd, *run_cli(cmd, explicit)[::2], f"{explicit}, line 2 (row 1), field 'chosen'", "non-empty")
    implicit = _jsonl(tmp_path / "implicit.jsonl", [GOOD["dpo"], {"chosen": "", "rejected": "q: b"}])
    _one_line_error(cmd, *run_cli(cmd, implicit)[::2], f"{implicit}, line 2 (row 1), field 'chosen'", "non-empty")


@pytest.mark.parametrize("cmd", ["dpo", "reward"])
def test_conversational_pair_errors_name_chosen_and_rejected(cmd: str, run_cli: Callable, tmp_path: Path) -> None:
    ok = {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]}
    cases = [
        ({**ok, "chosen": [{"role": "robot", "content": "a"}]}, "chosen[0].role"),
        ({**ok, "rejected": [{"role": "assistant"}]}, "rejected[0].content"),
        ({**ok, "rejected": [U("b")]}, "rejected[0].role"),  # user after the user prompt: no alternation
        ({"chosen": [U("q"), A("a")], "rejected": [U("q"), {"role": "bot", "content": "b"}]}, "rejected[1].role"),
    ]
    for k, (row, field) in enumerate(cases):
        path = _jsonl(tmp_path / f"chat{k}.jsonl", [ok, row])
        line = _one_line_error(cmd, *run_cli(cmd, path)[::2], f"{path}, line 2 (row 1), field {field!r}")
        assert "completion" not in line


@pytest.mark.parametrize("cmd", ["grpo", "rloo"])
def test_prompt_errors_in_rl_loops(cmd: str, run_cli: Callable, tmp_path: Path) -> None:
    cases = [
        ({"prompt": [A("5")], "answer": "5"}, "prompt[0].role"),  # only an assistant message: nothing to answer
        ({"messages": [A("5")], "answer": "5"}, "messages[0].role"),
        ({"messages": [{"role": "system", "content": "s"}], "answer": "5"}, "messages"),
        ({"prompt": [{"role": "user"}], "answer": "5"}, "prompt[0].content"),
        ({"prompt": [], "answer": "5"}, "prompt"),
        ({"prompt": "", "answer": "5"}, "prompt"),
    ]
    for k, (row, field) in enumerate(cases):
        path = _jsonl(tmp_path / f"p{k}.jsonl", [GOOD[cmd], row])
        _one_line_error(cmd, *run_cli(cmd, path)[::2], f"{path}, line 2 (row 1), field {field!r}: expected")


@pytest.mark.parametrize("cmd", ["grpo", "rloo"])
def test_over_long_prompts_are_counted_and_reported(cmd: str, run_cli: Callable, tmp_path: Path) -> None:
    rows = [{"prompt": "q" * n, "answer": "1"} for n in (3, 40, 5, 50)]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    rc, out, err = run_cli(cmd, path, "max_prompt_length=16")
    assert rc == 0, err
    assert "2 of 4 prompts longer than max_prompt_length=16 keep their last 16 tokens (rows 1, 3)" in out


def test_sft_reports_dropped_rows(run_cli: Callable, tmp_path: Path) -> None:
    """A row with nothing to train on is a counted, reported drop, not an error."""
    rows = [GOOD["sft"], {"messages": [U("only a question")]}, GOOD["sft"]]
    rc, out, err = run_cli("sft", _jsonl(tmp_path / "drop.jsonl", rows))
    assert rc == 0, err
    assert "1 dropped with zero trainable tokens (first: [1])" in out


def test_missing_file_and_unsupported_suffix(run_cli: Callable, tmp_path: Path) -> None:
    rc, _, err = run_cli("sft", tmp_path / "nope.jsonl")
    assert rc in (1, 2) and "Traceback" not in err and "nope.jsonl" in err.splitlines()[-1]
    txt = tmp_path / "rows.txt"
    txt.write_text("hello\n")
    _one_line_error("sft", *run_cli("sft", txt)[::2], f"{txt}", "unsupported file type")


def test_debug_shows_the_traceback(run_cli: Callable, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [GOOD["dpo"], {"prompt": "q:", "chosen": 5, "rejected": " b"}])
    with pytest.raises(RowError) as e:
        run_cli("dpo", path, debug=True)
    assert e.value.file == str(path) and e.value.line == 2 and e.value.field == "chosen"
    with pytest.raises(RowError):
        run_cli("dpo", path, "--debug")  # after the command too


def test_csv_and_parquet_name_the_row(run_cli: Callable, tmp_path: Path) -> None:
    import datasets

    rows = [GOOD["kto"], {**GOOD["kto"], "label": "maybe"}]
    pq = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{**r, "label": str(r["label"])} for r in rows]).to_parquet(str(pq))
    _one_line_error("kto", *run_cli("kto", pq)[::2], f"{pq}, row 0, field 'label'")
    csv = tmp_path / "rows.csv"
    csv.write_bytes(b"prompt,completion,label\nq:,a,1\nq\xff:,b,0\n")
    _one_line_error("kto", *run_cli("kto", csv)[::2], f"{csv}, line 3", "UTF-8")


# --------------------------------------------------------------------------------------------------------------------
# the pieces, without the CLI
# --------------------------------------------------------------------------------------------------------------------


def test_row_error_message_and_fields() -> None:
    e = RowError(2, "chosen", "a string", 5, file="data.jsonl", line=3)
    assert str(e) == "data.jsonl, line 3 (row 2), field 'chosen': expected a string; got 5"
    assert (e.index, e.field, e.file, e.line) == (2, "chosen", "data.jsonl", 3)
    assert str(RowError(2, "chosen", "a string")) == "row 2, field 'chosen': expected a string"
    assert str(RowError(None, None, "UTF-8 text", file="f.csv", line=4)) == "f.csv, line 4: expected UTF-8 text"


def test_load_rows_records_lines_for_later_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n\n{"text": "b"}\n{"text": "c"}\n')
    with track_sources() as sources:
        assert [r["text"] for r in load_rows(path)] == ["a", "b", "c"]
        located = sources.locate(RowError(2, "text", "a string"))
    assert str(located).startswith(f"{path}, line 5 (row 2), field 'text'")
    assert sources.locate(RowError(7, "text", "x")).file is None  # not a row of the file: left as it is
    with pytest.raises(RowError, match="expected at least one row"):
        load_rows([])


def test_in_memory_errors_name_the_user_fields() -> None:
    with pytest.raises(RowError) as e:
        tokenize_pairs(TOK, [{"prompt": [U("q")], "chosen": [A("a")], "rejected": [{"role": "x", "content": "b"}]}])
    assert e.value.field == "rejected[0].role"
    with pytest.raises(RowError) as e:
        unpair_rows([{"prompt": "q", "completion": "a", "label": float("nan")}])
    assert e.value.field == "label"
    ps = load_prompts([{"prompt": "q" * 20}, {"prompt": "q"}], TOK, max_prompt_length=8)
    assert [len(p.ids) for p in ps] == [8, 1] and ps.truncated_rows == [0]


def test_files_in_a_folder_and_json_documents_name_the_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "a"}\n')
    (folder / "b.jsonl").write_bytes(b'{"text": "b"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(RowError, match=r"b\.jsonl, line 2 \(row 1\): expected UTF-8 text"):
        load_rows(folder)
    doc = tmp_path / "rows.json"
    doc.write_text('[\n  {"text": "a"},\n\n  {"text": "b"},\n]\n')  # trailing comma on line 4
    with pytest.raises(RowError, match=r"rows\.json, line 5: expected a JSON array of row objects; got invalid"):
        load_rows(doc)
