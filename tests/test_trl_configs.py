"""TRL 1.16's own example commands (the docstrings of `trl/scripts/{sft,dpo,kto}.py`) and configs made of TRL's
own field names for GRPO, RLOO and the reward model, through `alignkit LOOP ... --dry-run`: each gives a valid
alignkit config or a refusal naming the TRL key. Marker `trl` (the bench venv has TRL)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.trl
trl = pytest.importorskip("trl", reason="TRL is installed in the bench venv (marker trl)")

from alignkit.cli import main  # noqa: E402


def _examples(script: str) -> list[list[str]]:
    """The `python trl/scripts/SCRIPT.py --flag value ...` commands of a TRL script's docstring, as argv tails."""
    path = Path(importlib.import_module(f"trl.scripts.{script}").__file__)
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    out = []
    for block in re.findall(rf"python trl/scripts/{script}\.py((?:[^\n]*\\\n)*[^\n]*)", doc):
        out.append(shlex.split(block.replace("\\\n", " ")))
    return out


def _run(loop: str, argv: list[str], capsys) -> None:  # noqa: ANN001
    rc = main([loop, *argv, "--dry-run"])
    err = capsys.readouterr().err
    if rc != 0:  # a refusal must name the TRL key it refuses
        flags = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        error = [ln for ln in err.splitlines() if ": error: " in ln][-1]
        assert rc == 2 and any(re.search(rf"\b{f}\b", error) for f in flags), err


@pytest.mark.parametrize("script", ["sft", "dpo", "kto"])
def test_trl_example_commands(script, capsys):
    examples = _examples(script)
    assert examples, f"no example command found in trl/scripts/{script}.py"
    for argv in examples:
        _run(script, argv, capsys)


TRL_CONFIGS = {
    "grpo": (trl.GRPOConfig, {"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "dataset_name": "trl-lib/DeepMath",
             "learning_rate": "1e-6", "num_generations": "8", "per_device_train_batch_size": "8",
             "gradient_accumulation_steps": "4", "max_completion_length": "256", "beta": "0.04", "epsilon": "0.2",
             "logging_steps": "5", "bf16": "true", "use_vllm": "true", "vllm_mode": "colocate", "loss_type": "dapo",
             "max_steps": "100", "warmup_steps": "0.05", "output_dir": "grpo-out"}),
    "rloo": (trl.RLOOConfig, {"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "dataset_name": "trl-lib/tldr",
             "learning_rate": "1e-6", "num_generations": "4", "per_device_train_batch_size": "4", "beta": "0.05",
             "max_completion_length": "128", "num_train_epochs": "1", "output_dir": "rloo-out"}),
    "reward": (trl.RewardConfig, {"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
               "dataset_name": "trl-lib/ultrafeedback_binarized", "learning_rate": "1e-5",
               "per_device_train_batch_size": "8", "gradient_accumulation_steps": "2", "num_train_epochs": "1",
               "center_rewards_coefficient": "0.01", "max_length": "2048", "output_dir": "rm-out"}),
}  # fmt: skip


@pytest.mark.parametrize("loop", list(TRL_CONFIGS))
def test_configs_of_trl_field_names(loop, capsys):
    cls, values = TRL_CONFIGS[loop]
    known = {f.name for c in (cls, trl.ModelConfig, trl.ScriptArguments) for f in dataclasses.fields(c)}
    assert set(values) <= known, set(values) - known  # every key is one of TRL's own
    _run(loop, [f"--{k}={v}" for k, v in values.items()], capsys)
