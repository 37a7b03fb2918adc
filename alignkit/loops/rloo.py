"""RLOO: REINFORCE with a leave-one-out baseline, from a prompt dataset and reward functions.

For each prompt, sample G completions and take ``A_i = R_i − mean_{j≠i} R_j`` (optionally z-scored over the
round). TRL 1.16's defaults: the KL to the reference folded into the reward (sequence-summed k1, β=0.05) and a
sequence-level clipped ratio (product of token ratios), one loss per sequence averaged over sequences.

    from alignkit.loops.rloo import RLOOConfig, train_rloo
    train_rloo(RLOOConfig(model="path", dataset="prompts.jsonl", rewards=["math_answer"], output_dir="runs/rloo"))

Composes: the online RL loop of `loops.policy_gradient` with `advantage="rloo"` and TRL's RLOO defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from alignkit.loops.policy_gradient import RLConfig, train_policy_gradient


@dataclass
class RLOOConfig(RLConfig):
    output_dir: str = "runs/rloo"
    advantage: str = "rloo"  # alignkit.losses.advantages.rloo_advantages (normalize_advantages)
    loss: str = "ppo_clip"
    ratio_level: str = "sequence_sum"  # TRL RLOO: exp(Σ_t log ρ_t)
    agg: str = "seq_mean_token_mean"  # the (constant-over-tokens) sequence loss, averaged over sequences
    kl_coef: float = 0.05  # TRL beta
    kl_kind: str = "k1"
    kl_placement: Literal["loss", "reward"] = "reward"


def train_rloo(cfg: RLOOConfig, **objects: Any) -> dict[str, Any]:
    """Run RLOO; the same keyword arguments (``model, tokenizer, train_data, reward_funcs, generator,
    callbacks, tools, environment_factory``) and return value as ``train_grpo``."""
    return train_policy_gradient(cfg, name="rloo", **objects)
