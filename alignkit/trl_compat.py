"""TRL configs and flags, run unchanged: each TRL key becomes an alignkit key (one notice line per key) or is
refused with the reason. A TRL YAML file, ``--trl_flag value`` arguments and ``key=value`` overrides all pass
through :func:`translate` before the strict config check.

    alignkit sft --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --learning_rate 2e-5 --packing
    alignkit convert-config trl_sft.yaml --loop sft        # prints the native config

The rules are keyed by TRL name; a TRL name that is also one of ours with the same meaning (``beta``,
``max_length``, ``lora_r``, ...) is simply ours. Where one TRL quantity is a product of several of ours (batch
sizes per device vs our global ``grad_accum``, GRPO's completions per device), the conversion uses
``WORLD_SIZE`` (1 outside torchrun) and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from alignkit.config import ConfigError

__all__ = [
    "Rename",
    "Refuse",
    "Ignore",
    "COMMON",
    "PER_LOOP",
    "LOOPS",
    "rules_for",
    "translate",
    "trl_flags_to_overrides",
]

# config class name -> loop, for the loop-specific rules
LOOPS = {"SFTConfig": "sft", "DPOConfig": "dpo", "KTOConfig": "kto", "RewardConfig": "reward",
         "GRPOConfig": "grpo", "RLOOConfig": "rloo", "PRMConfig": "prm"}  # fmt: skip
RL = ("grpo", "rloo")


@dataclass(frozen=True)
class Rename:
    """Our ``key``; ``convert(value, trl_values) -> value`` when the value changes form; ``why`` for the notice."""

    key: str
    convert: Callable[[Any, Mapping[str, Any]], Any] | None = None
    why: str = ""


@dataclass(frozen=True)
class Refuse:
    reason: str


@dataclass(frozen=True)
class Ignore:
    """A TRL key with no effect here (said in the notice)."""

    why: str


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _is_fraction(v: Any) -> bool:
    x = _number(v)
    return x is not None and 0 < x < 1 and not float(x).is_integer()


def _world() -> int:
    from alignkit.distributed import env_world_size

    return env_world_size()


def _schedule(v: Any, _: Mapping[str, Any]) -> str:
    v = str(v)
    if v in ("linear", "cosine", "constant"):
        return v
    if v == "constant_with_warmup":
        return "constant"
    raise ConfigError(f"TRL lr_scheduler_type={v!r}: alignkit has linear, cosine and constant (after warmup_steps)")


def _targets(v: Any, _: Mapping[str, Any]) -> list[str]:
    if v in ("all-linear", ["all-linear"]):
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [v] if isinstance(v, str) else list(v)


def _global_accum(v: Any, _: Mapping[str, Any]) -> int:
    return int(v) * _world()  # TRL's is per device; ours counts the step's micro-batches over all ranks


def _loss_type_to_agg(v: Any, _: Mapping[str, Any]) -> str:
    table = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "token_sum_constant"}
    if v not in table:
        raise ConfigError(f"TRL GRPO loss_type={v!r}: alignkit aggregates as {sorted(table)} map ({table})")
    return table[v]


def _scale_rewards(v: Any, _: Mapping[str, Any]) -> str:
    if isinstance(v, bool) or str(v).lower() in ("true", "false"):
        return "group" if _bool(v) else "none"
    return str(v)


def _backend(v: Any, trl: Mapping[str, Any]) -> str:
    return f"vllm_{trl.get('vllm_mode', 'server')}" if _bool(v) else "hf"


COMMON: dict[str, Rename | Refuse | Ignore] = {
    "model_name_or_path": Rename("model"),
    "dataset_name": Rename("dataset"),
    "dataset_train_split": Rename("dataset_split"),
    "dataset_test_split": Rename("eval_split"),
    "learning_rate": Rename("lr"),
    "num_train_epochs": Rename("epochs"),
    "lr_scheduler_type": Rename("schedule", _schedule),
    "warmup_ratio": Rename("warmup_ratio"),
    "logging_steps": Rename("log_every"),
    "save_steps": Rename("save_every"),
    "save_total_limit": Rename("keep_last"),
    "eval_steps": Rename("eval_every"),
    "overwrite_output_dir": Rename("overwrite"),
    "bf16": Rename("precision", lambda v, _: "bf16-mixed" if _bool(v) else "fp32", "bf16 autocast, fp32 weights"),
    "use_peft": Rename("lora_r", lambda v, trl: int(trl.get("lora_r", 16)) if _bool(v) else 0, "lora_r (TRL's 16)"),
    "lora_target_modules": Rename("lora_targets", _targets),
    "per_device_train_batch_size": Rename("batch_size"),
    "gradient_accumulation_steps": Rename("grad_accum", _global_accum, "x WORLD_SIZE: ours is the global count"),
    "eval_strategy": Ignore("evaluation runs every eval_every steps when eval_dataset is set"),
    "logging_first_step": Ignore("the first step is always logged"),
    "remove_unused_columns": Ignore("rows keep their columns (rewards read them)"),
    "eos_token": Ignore("the chat format adds its own end-of-turn token (chat_format)"),
    "gradient_checkpointing_kwargs": Ignore("checkpointing is non-reentrant (use_reentrant=False)"),
    "use_liger_kernel": Ignore("the chunked LM-head log-probs already never build [B,T,V] logits"),
    "fp16": Refuse("fp16 training is not supported: use bf16 (precision=bf16-mixed)"),
    "push_to_hub": Refuse("no Hub upload from a run: push RUN_DIR/final_model (an HF folder) yourself"),
    "trust_remote_code": Refuse("alignkit never runs a model repo's own code"),
    "load_in_4bit": Refuse("quantized (QLoRA) training is not supported yet"),
    "load_in_8bit": Refuse("quantized (QLoRA) training is not supported yet"),
    "deepspeed": Refuse("alignkit scales out with torchrun + FSDP2 (parallel=fsdp2), not DeepSpeed"),
    "fsdp": Rename("parallel", lambda v, _: "fsdp2" if v else "auto", "alignkit's FSDP is FSDP2"),
    "datasets": Rename("dataset_mixture", lambda v, _: _mixture(v), "the datasets read as one, in order"),
    "streaming": Refuse("rows are read from memory-mapped Arrow files, not streamed"),
    "test_split_size": Refuse("split off the evaluation rows yourself and pass eval_dataset"),
}

PER_LOOP: dict[str, dict[str, Rename | Refuse | Ignore]] = {
    "sft": {
        "assistant_only_loss": Rename("train_on", lambda v, _: "assistant" if _bool(v) else "all"),
        "completion_only_loss": Rename("train_on", lambda v, _: "completion" if _bool(v) else "all"),
        "dataset_text_field": Refuse("text rows are read from their `text` column"),
    },
    "dpo": {
        "precompute_ref_log_probs": Rename("reference", lambda v, _: "precomputed" if _bool(v) else "model"),
        "sync_ref_model": Rename("reference", lambda v, _: "tr_dpo" if _bool(v) else "precomputed"),
        "ref_model_mixup_alpha": Rename("tr_dpo_alpha"),
        "ref_model_sync_steps": Rename("tr_dpo_sync_steps"),
        "rpo_alpha": Refuse("RPO's NLL term: use loss_type=[sigmoid, sft] with loss_weights=[1, rpo_alpha]"),
    },
    "reward": {"center_rewards_coefficient": Rename("center_coef")},
    "grpo": {},
    "rloo": {},
}
for _rl in RL:  # keys GRPO and RLOO share
    PER_LOOP[_rl].update({
        "num_generations": Rename("group_size"),
        "max_completion_length": Rename("max_new_tokens"),
        "reward_funcs": Rename("rewards", lambda v, _: [v] if isinstance(v, str) else list(v)),
        "beta": Rename("kl_coef"),
        "epsilon": Rename("ratio_low", lambda v, _: 1.0 - float(v), "1 - epsilon"),
        "epsilon_high": Rename("ratio_high", lambda v, _: 1.0 + float(v), "1 + epsilon_high"),
        "delta": Rename("dual_clip"),
        "use_vllm": Rename("backend", _backend, "vllm_mode picks colocate or server"),
        "vllm_mode": Ignore("read with use_vllm"),
        "loss_type": Rename("agg", _loss_type_to_agg),
        "scale_rewards": Rename("scale_rewards", _scale_rewards),
        "mask_truncated_completions": Rename("mask_truncated"),
        "log_completions": Rename("log_completions_every", lambda v, trl: int(trl.get("logging_steps", 10)) if _bool(v)
                                  else 0, "every logging_steps"),
        "num_completions_to_print": Rename("log_completions_n"),
        # completions per device per micro-batch: our micro_batch_size; with the accumulation it fixes the step's
        # prompts (below, in translate)
        "per_device_train_batch_size": Rename("micro_batch_size"),
        "gradient_accumulation_steps": Ignore("with per_device_train_batch_size it sets prompts_per_step"),
    })  # fmt: skip


def _mixture(v: Any) -> list[dict[str, Any]]:
    from alignkit.data.loading import MIXTURE_KEYS

    if not isinstance(v, list) or not all(isinstance(e, Mapping) and e.get("path") for e in v):
        raise ConfigError("TRL datasets: a list of {path, name, split, data_dir, data_files, columns} entries")
    for e in v:
        unknown = set(e) - MIXTURE_KEYS
        if unknown:
            raise ConfigError(f"TRL datasets entry {e['path']!r}: unknown keys {sorted(unknown)}")
    return [{k: x for k, x in e.items() if x is not None} for e in v]


def rules_for(loop: str) -> dict[str, Rename | Refuse | Ignore]:
    return {**COMMON, **PER_LOOP.get(loop, {})}


def translate(cls: type, values: Mapping[str, Any], notice: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``values`` (TRL keys among ours) as alignkit keys of ``cls``; one ``notice`` line per TRL key (stderr by
    default); a TRL key without an equivalent raises :class:`ConfigError` with the reason."""
    import dataclasses

    say = notice or (lambda line: print(line, file=sys.stderr))
    ours = {f.name for f in dataclasses.fields(cls)}
    loop = LOOPS.get(cls.__name__, "")
    rules = rules_for(loop)
    out: dict[str, Any] = {}
    trl = {k: v for k, v in values.items() if k not in ours or k in PER_LOOP.get(loop, {})}
    for k, v in values.items():
        if k == "max_steps" and _number(v) is not None and _number(v) <= 0:  # TRL's -1: "no cap"
            say(f"[alignkit] TRL max_steps={v!r} -> max_steps=None (the epochs decide)")
            out[k] = None
            continue
        if k == "warmup_steps" and _is_fraction(v):  # transformers reads warmup_steps < 1 as a ratio of the run
            out["warmup_ratio"] = float(v)
            say(f"[alignkit] TRL warmup_steps={v!r} (a ratio) -> warmup_ratio={float(v)}")
            continue
        rule = rules.get(k) if k in trl else None
        if rule is None:
            out[k] = v  # ours (or unknown: the strict check names it)
            continue
        if isinstance(rule, Refuse):
            raise ConfigError(f"TRL key {k}={v!r} has no alignkit equivalent: {rule.reason}")
        if isinstance(rule, Ignore):
            say(f"[alignkit] TRL {k}={v!r}: ignored ({rule.why})")
            continue
        new = rule.convert(v, values) if rule.convert else v
        out[rule.key] = new
        if k in ours and new == v:  # one of ours, given in our form: nothing to say
            continue
        why = f" ({rule.why})" if rule.why else ""
        say(f"[alignkit] TRL {k}={v!r} -> {rule.key}={new!r}{why}")
    if loop in RL and ("per_device_train_batch_size" in values or "gradient_accumulation_steps" in values):
        # TRL: completions per step = per_device x accumulation x ranks, num_generations of them per prompt
        per_step = int(values.get("per_device_train_batch_size", 8)) * int(values.get("gradient_accumulation_steps", 1))
        per_step *= _world()
        group = int(out.get("group_size", values.get("num_generations", 8)))
        if per_step % group:
            raise ConfigError(
                f"TRL batch: {per_step} completions per step is not a multiple of num_generations={group}"
            )
        out["prompts_per_step"] = per_step // group
        say(f"[alignkit] TRL per-device batch x accumulation x ranks = {per_step} completions -> prompts_per_step="
            f"{per_step // group} (of {group} completions each)")  # fmt: skip
    return out


def trl_flags_to_overrides(args: list[str], known: set[str]) -> list[str]:
    """``--learning_rate 2e-5 --packing --no_remove_unused_columns`` (TRL / HfArgumentParser flags) as
    ``key=value`` overrides; ``known`` flags (ours, e.g. ``--config``) and ``key=value`` items pass unchanged."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a.split("=", 1)[0] in known:
            out.append(a)
            if a in known and i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                out.append(args[i + 1])  # a known flag's value (--config FILE)
                i += 1
            i += 1
            continue
        name, eq, value = a[2:].partition("=")
        key = name.replace("-", "_")  # --per-device-train-batch-size is HfArgumentParser's too (values untouched)
        if eq:
            out.append(f"{key}={value}")
        elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
            out.append(f"{key}={args[i + 1]}")
            i += 1
        elif key.startswith("no_"):
            out.append(f"{key[3:]}=false")
        else:
            out.append(f"{key}=true")
        i += 1
    return out
