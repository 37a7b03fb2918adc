"""TRL configs and flags through the CLI: mapped keys (one notice each), refusals with the reason, the typo hint
that never points at one of our keys with another meaning, `convert-config`, and `--dry-run`."""

from __future__ import annotations

import pytest
import yaml

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.loops.dpo import DPOConfig
from alignkit.loops.grpo import GRPOConfig
from alignkit.loops.sft import SFTConfig


def _dry(capsys, *argv: str) -> tuple[dict, str]:
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.err


def test_trl_sft_flags(capsys):
    cfg, notices = _dry(capsys, "sft", "--model_name_or_path", "Qwen/Qwen2-0.5B", "--dataset_name", "trl-lib/Capybara",
                        "--learning_rate", "2.0e-5", "--num_train_epochs", "1", "--packing",
                        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8", "--eos_token",
                        "<|im_end|>", "--eval_strategy", "steps", "--eval_steps", "100", "--output_dir", "out",
                        "--assistant_only_loss", "--bf16", "--use_peft", "--lora_target_modules", "all-linear",
                        "--lr_scheduler_type", "constant_with_warmup", "--save_total_limit", "3")  # fmt: skip
    assert cfg["model"] == "Qwen/Qwen2-0.5B" and cfg["dataset"] == "trl-lib/Capybara" and cfg["lr"] == 2e-5
    assert cfg["epochs"] == 1 and cfg["packing"] is True and cfg["batch_size"] == 2 and cfg["grad_accum"] == 8
    assert cfg["eval_every"] == 100 and cfg["output_dir"] == "out" and cfg["train_on"] == "assistant"
    assert cfg["precision"] == "bf16-mixed" and cfg["lora_r"] == 16 and "down_proj" in cfg["lora_targets"]
    assert cfg["schedule"] == "constant" and cfg["keep_last"] == 3
    assert "TRL learning_rate='2.0e-5' -> lr='2.0e-5'" in notices
    assert "TRL eos_token='<|im_end|>': ignored" in notices
    assert notices.count("[alignkit] TRL ") == 15  # one line per TRL key


def test_trl_grpo_keys_and_batch_arithmetic():
    lines: list[str] = []
    from alignkit.trl_compat import translate

    values = translate(GRPOConfig, {"model_name_or_path": "m", "num_generations": 4, "per_device_train_batch_size": 8,
                                    "gradient_accumulation_steps": 2, "max_completion_length": 64, "beta": 0.04,
                                    "epsilon": 0.2, "epsilon_high": 0.28, "use_vllm": True, "vllm_mode": "colocate",
                                    "loss_type": "dapo", "scale_rewards": False, "reward_funcs": "math_answer"},
                       notice=lines.append)  # fmt: skip
    cfg = load_config(GRPOConfig, None, [f"{k}={v}" for k, v in values.items()])
    assert (cfg.group_size, cfg.micro_batch_size, cfg.prompts_per_step) == (4, 8, 4)  # 8 x 2 completions / 4
    assert cfg.max_new_tokens == 64 and cfg.kl_coef == 0.04 and cfg.backend == "vllm_colocate"
    assert cfg.ratio_low == pytest.approx(0.8) and cfg.ratio_high == pytest.approx(1.28)
    assert cfg.agg == "token_mean" and cfg.scale_rewards == "none" and cfg.rewards == ["math_answer"]
    assert any("prompts_per_step=4" in ln for ln in lines)


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("push_to_hub", "true", "no Hub upload"), ("fp16", "true", "fp16 training is not supported"),
    ("load_in_4bit", "true", "quantized"), ("report_to", "mlflow", "unknown tracker 'mlflow'"),
    ("deepspeed", "ds.json", "FSDP2"), ("dataset_text_field", "body", "text"),
])  # fmt: skip
def test_trl_keys_without_an_equivalent_are_refused(key, value, reason):
    with pytest.raises(ConfigError, match=reason) as e:
        load_config(SFTConfig, None, ["model=m", f"{key}={value}"])
    assert key in str(e.value)


def test_warmup_ratio_and_fractional_warmup_steps():
    from alignkit.loops.common import warmup_steps

    cfg = load_config(DPOConfig, None, ["model=m", "warmup_ratio=0.1"])
    assert cfg.warmup_ratio == 0.1 and warmup_steps(cfg, 25) == 3  # ceil(0.1 * 25), once the run's length is known
    cfg = load_config(DPOConfig, None, ["model=m", "warmup_steps=0.05"])  # transformers: < 1 is a ratio
    assert (cfg.warmup_steps, cfg.warmup_ratio) == (0, 0.05)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load_config(DPOConfig, None, ["model=m", "warmup_ratio=0.1", "warmup_steps=5"])


def test_typo_hint_never_points_at_a_key_with_another_meaning():
    with pytest.raises(ConfigError) as e:
        load_config(GRPOConfig, None, ["model=m", "num_generation=4"])
    assert "TRL's 'num_generations' (read as group_size)" in str(e.value) and "'num_iterations'?" not in str(e.value)
    with pytest.raises(ConfigError, match="Did you mean 'group_size'"):
        load_config(GRPOConfig, None, ["model=m", "group_sise=4"])


def test_convert_config(tmp_path, capsys):
    trl = tmp_path / "trl.yaml"
    trl.write_text(
        "model_name_or_path: Qwen/Qwen2.5-0.5B\ndataset_name: trl-lib/ultrafeedback_binarized\n"
        "learning_rate: 5.0e-7\nbeta: 0.1\nloss_type: ipo\nlogging_steps: 10\nreport_to: none\n"
    )
    assert main(["convert-config", str(trl), "--loop", "dpo"]) == 0
    out = capsys.readouterr()
    native = yaml.safe_load(out.out)
    assert native == {"model": "Qwen/Qwen2.5-0.5B", "dataset": "trl-lib/ultrafeedback_binarized", "lr": 5e-7,
                      "beta": 0.1, "loss_type": "ipo", "log_every": 10, "report_to": "none"}  # fmt: skip
    assert load_config(DPOConfig, None, [f"{k}={v}" for k, v in native.items()]).loss_type == ["ipo"]
    assert out.err.count("[alignkit] TRL ") == 4  # beta, loss_type and report_to are ours already
