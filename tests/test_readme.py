"""Every code block of README.md is exercised, by the marker on the line before it:

* ``readme-test: python`` runs the block;
* ``readme-test: rows LOOP`` / ``config LOOP``: the worked example runs for real (``alignkit LOOP --config``) on a
  tiny random model, with the model, dataset path, output folder and step count (and a sampling budget)
  swapped in;
* ``readme-test: cli (why)``: a command needing a hub model, a cluster or earlier runs; its ``alignkit`` lines
  must name real commands, and a loop's ``key=value`` items real keys of that loop;
* ``readme-test: skip (why)``: the install commands (`.ci/run` runs the test command itself).

A block without a marker fails here."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from alignkit.cli import COMMANDS, config_class, main

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->")


def readme_blocks() -> list[tuple[int, str, str, str]]:
    """(line, marker kind, marker argument, code) of every fenced block."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group(1), i
        j = i + 1
        while not lines[j].strip().startswith("```"):
            j += 1
        code = "\n".join(ln[len(indent) :] for ln in lines[i + 1 : j])
        marker = MARKER.search(lines[start - 1]) if start else None
        kind, arg = (marker.group(1), marker.group(2)) if marker else ("unmarked", "")
        blocks.append((start + 1, kind, arg, code))
        i = j + 1
    return blocks


BLOCKS = readme_blocks()


def test_every_block_is_marked():
    assert len(BLOCKS) >= 15
    assert [b[0] for b in BLOCKS if b[1] not in ("python", "rows", "config", "cli", "skip")] == []


@pytest.mark.parametrize("code", [b[3] for b in BLOCKS if b[1] == "python"], ids=lambda c: c.splitlines()[0][:40])
def test_python_blocks_run(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def _alignkit_lines(code: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if "alignkit" in words and "#SBATCH" not in line:  # also `torchrun ... -m alignkit LOOP ...`
            out.append(words[words.index("alignkit") + 1 :])
    return out


@pytest.mark.parametrize("code", [b[3] for b in BLOCKS if b[1] == "cli"], ids=lambda c: c.splitlines()[0][:40])
def test_cli_blocks_name_real_commands_and_keys(code):
    tools = {"launch", "sweep", "plot", "convert-config", "env", "demo"}
    for words in _alignkit_lines(code):
        command = words[0]
        assert command in COMMANDS or command in tools, words
        if command == "launch":  # alignkit launch [options] LOOP ...: check the loop's part
            words = next((words[i:] for i, w in enumerate(words) if w in COMMANDS), [])
            command = words[0] if words else command
        if command in COMMANDS and command != "demo" or command == "sweep":
            loop = words[1] if command == "sweep" else command
            keys = {f for f in config_class(COMMANDS[loop]).__dataclass_fields__}
            items = [w.split("=", 1)[0] for w in words if "=" in w and not w.startswith("-")]
            assert set(items) <= keys, (words, set(items) - keys)


def _tiny_model(path: Path, head: str = "lm") -> str:
    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.models import build_tiny_model, tiny_llama_config

    tok = byte_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2, eos_token_id=end,
                            pad_token_id=tok.pad_token_id)  # fmt: skip
    build_tiny_model(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


ROWS = {b[2]: b[3] for b in BLOCKS if b[1] == "rows"}
CONFIGS = {b[2]: b[3] for b in BLOCKS if b[1] == "config"}
ROWS_OF = {"rloo": "grpo", "online-dpo": "grpo"}  # RLOO and online DPO read GRPO's prompt rows


def test_a_worked_example_for_every_loop():
    assert set(CONFIGS) == {c for c in COMMANDS if c != "demo"}
    assert set(ROWS) | set(ROWS_OF) == set(CONFIGS)


@pytest.mark.parametrize("loop", sorted(CONFIGS))
def test_worked_example_runs(loop, tmp_path, capsys):
    rows = [json.loads(ln) for ln in ROWS[ROWS_OF.get(loop, loop)].splitlines() if ln.strip()]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * (16 // len(rows))))  # 16 rows
    cfg = yaml.safe_load(CONFIGS[loop])
    assert cfg["model"].startswith("Qwen/") and "dataset" in cfg  # a real-looking config, as written
    (tmp_path / "cfg.yaml").write_text(CONFIGS[loop])
    swapped = [f"model={_tiny_model(tmp_path / 'model')}", f"dataset={data}", f"output_dir={tmp_path / 'run'}",
               "max_steps=2", "progress=false", "report_to=[]"]  # fmt: skip
    if loop == "distill":  # a teacher of the same tokenizer: the same tiny model
        swapped += [f"teacher_model={tmp_path / 'model'}", "max_new_tokens=8", "batch_size=2"]
    if loop in ("sft", "dpo", "kto", "reward", "grpo", "rloo", "online-dpo", "distill"):
        swapped.append("chat_format=chatml")  # the byte tokenizer has no template to detect
    if loop in ("grpo", "rloo"):
        swapped += ["max_new_tokens=8", "prompts_per_step=2", "group_size=4"]
    elif loop == "online-dpo":
        swapped += ["max_new_tokens=8", "prompts_per_step=2", "num_generations=2"]
    elif loop != "distill":  # the online loops and distill have no grad_accum key
        swapped.append("grad_accum=1")
    if loop == "sft":
        swapped.append("max_length=256")
    assert main([loop, "--config", str(tmp_path / "cfg.yaml"), *swapped]) == 0, capsys.readouterr().err[-3000:]
    assert (tmp_path / "run" / "final_model").exists()
