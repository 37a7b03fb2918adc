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
        ("learning_rate=1e-4", "unknown SFTConfig key 'learning_rate'"),
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
