"""Config dataclasses from YAML + key=value, strict keys; the CLI's error paths."""

from __future__ import annotations

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.loops.sft import SFTConfig


def test_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-4\npacking: false\nlora_targets: [q_proj]\n")
    cfg = load_config(SFTConfig, f, ["batch_size=4", "max_steps=none", "schedule=linear", "packing=true"])
    assert cfg.lr == 1e-4 and cfg.batch_size == 4 and cfg.packing is True
    assert cfg.max_steps is None and cfg.schedule == "linear" and cfg.lora_targets == ["q_proj"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learnin_rate=1e-4", "unknown SFTConfig key 'learnin_rate'. Did you mean TRL's 'learning_rate' (read as lr)?"),
        ("learning_rate=fast", "SFTConfig.lr: expected float"),  # TRL's name, read as ours
        ("lr=fast", "SFTConfig.lr: expected float"),
        ("packing=maybe", "expected true/false"),
        ("schedule=exp", "not one of ['cosine', 'linear', 'constant']"),
        ("lr", "key=value"),
    ],
)
def test_bad_keys_and_values(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(SFTConfig, None, [override])
    assert needle in str(e.value)


def test_unknown_key_lists_valid_keys_and_closest():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["batchsize=3"])
    msg = str(e.value)
    assert "Did you mean 'batch_size'?" in msg and "Valid keys:" in msg and "grad_accum" in msg


def test_cli_reports_config_errors(capsys):
    assert main(["sft", "warmup=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown SFTConfig key 'warmup'" in err and "warmup_steps" in err


@pytest.mark.parametrize("command", ["sft", "dpo", "kto", "reward", "grpo", "rloo", "prm", "demo"])
def test_help_lists_every_key_with_a_meaning(command, capsys):
    """`alignkit CMD --help` lists every config key with its type, default and meaning (written once, as the
    comment on the key's line in its dataclass): a key without one fails here."""
    import importlib

    from alignkit.cli import COMMANDS, main
    from alignkit.config import key_docs

    module, config, _ = COMMANDS[command]
    docs = key_docs(getattr(importlib.import_module(module), config))
    assert [d.name for d in docs if not d.meaning] == []
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for d in docs:
        assert f"    {d.name} (" in out and d.meaning in out, d.name


def test_version_and_env(capsys):
    import alignkit
    from alignkit.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"alignkit {alignkit.__version__}"
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    import torch
    import transformers

    assert f"torch {torch.__version__}" in out and f"transformers {transformers.__version__}" in out
    assert "trl " in out and "vllm " in out  # present or `-`
