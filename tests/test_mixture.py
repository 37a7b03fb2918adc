"""Dataset mixtures (`dataset_mixture`, TRL's `datasets:`): several datasets read as one, errors naming the part."""

from __future__ import annotations

import json

import pytest
import yaml

from alignkit.cli import load_config, main
from alignkit.config import ConfigError
from alignkit.data.loading import DatasetLoadError, Mixture, load_rows, track_sources
from alignkit.data.rows import RowError
from alignkit.loops.dpo import DPOConfig
from alignkit.loops.sft import SFTConfig


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def test_mixture_reads_the_parts_in_order_with_columns_and_rows(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [_chat(f"a{i}", "x", source="a") for i in range(3)])
    b = _jsonl(tmp_path / "b.jsonl", [_chat(f"b{i}", "y", source="b", extra=i) for i in range(5)])
    ds = load_rows(Mixture([{"path": a}, {"path": b, "columns": ["messages", "source"], "rows": 2}]))
    assert [r["messages"][0]["content"] for r in ds] == ["a0", "a1", "a2", "b0", "b1"]
    with pytest.raises(DatasetLoadError, match=r"same columns.*entry 1 .*extra"):
        load_rows(Mixture([{"path": a}, {"path": b}]))  # b has an extra column a lacks


def test_a_bad_row_in_the_second_part_names_its_file_and_line(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [_chat("q", "x") for _ in range(3)])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps(_chat("q", "y")) + "\n\n" + json.dumps({"messages": "not a list"}) + "\n")
    with track_sources() as log:
        ds = load_rows(Mixture([{"path": a}, {"path": str(b)}]))
        err = log.locate(RowError(4, "messages", "a list of messages", ds[4]["messages"]))
    assert err.file == str(b) and err.line == 3  # row 4 of the mixture: b's second row, after a blank line


def test_trl_datasets_key_becomes_a_mixture_and_runs(tmp_path, capsys):
    a = _jsonl(tmp_path / "a.jsonl", [_chat(f"{i}+{i}", str(2 * i)) for i in range(6)])
    b = _jsonl(tmp_path / "b.jsonl", [_chat(f"{i}*2", str(2 * i)) for i in range(6)])
    trl = tmp_path / "trl.yaml"
    trl.write_text(yaml.safe_dump({"datasets": [{"path": a, "split": "train"}, {"path": b, "columns": ["messages"]}],
                                   "learning_rate": 1e-3, "max_steps": 2}))  # fmt: skip
    cfg = load_config(SFTConfig, str(trl), [])
    assert cfg.dataset_mixture == [{"path": a, "split": "train"}, {"path": b, "columns": ["messages"]}]
    assert "TRL datasets=" in capsys.readouterr().err  # the one-line notice
    assert main(["convert-config", str(trl), "--loop", "sft"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["dataset_mixture"][1]["path"] == b
    # the mixture trains on both files' rows
    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.loops.sft import train_sft
    from alignkit.models import build_tiny_model, tiny_llama_config

    tok = byte_tokenizer()
    model = build_tiny_model(tiny_llama_config(len(tok), hidden=16, layers=1, heads=2, kv_heads=2))
    cfg = load_config(SFTConfig, str(trl), [f"output_dir={tmp_path / 'run'}", "chat_format=chatml", "batch_size=4",
                                            "packing=false", "progress=false"])  # fmt: skip
    out = train_sft(cfg, model=model, tokenizer=tok)
    assert out["steps"] == 2 and "12 rows tokenized" in capsys.readouterr().out  # both files' rows


@pytest.mark.parametrize(("values", "match"), [
    ({"dataset": "x.jsonl", "dataset_mixture": [{"path": "y.jsonl"}]}, "unset when dataset is set"),
    ({"dataset_mixture": [{"split": "train"}]}, "entry 0 a mapping with a path"),
    ({"dataset_mixture": [{"path": "y.jsonl", "weight": 2}]}, "entry 0 a mapping with a path and only"),
])  # fmt: skip
def test_bad_mixtures_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DPOConfig, None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def test_trl_streaming_and_test_split_are_refused(tmp_path):
    for key, why in (("streaming", "memory-mapped"), ("test_split_size", "eval_dataset")):
        with pytest.raises(ConfigError, match=why):
            load_config(SFTConfig, None, [f"{key}=true"])
