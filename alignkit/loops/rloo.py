"""RLOO: REINFORCE with a leave-one-out baseline, from a prompt dataset and reward functions.

For each prompt, sample G completions and take ``A_i = R_i − mean_{j≠i} R_j`` (optionally z-scored over the
round). TRL 1.16's defaults: the KL to the reference folded into the reward (sequence-summed k1, β=0.05) and a
sequence-level clipped ratio (product of token ratios), one loss per sequence averaged over sequences.

    from alignkit.loops.rloo import RLOOConfig, train_rloo
    train_rloo(RLOOConfig(model="path", dataset="prompts.jsonl", rewards=["math_answer"], output_dir="runs/rloo"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from alignkit.loops._rl_common import RLConfig, train_policy_gradient
from alignkit.losses.advantages import rloo_advantages
from alignkit.rollout import Generator


@dataclass
class RLOOConfig(RLConfig):
    output_dir: str = "runs/rloo"
    loss: str = "ppo_clip"
    ratio_level: str = "sequence_sum"  # TRL RLOO: exp(Σ_t log ρ_t)
    agg: str = "seq_mean_token_mean"  # the (constant-over-tokens) sequence loss, averaged over sequences
    kl_coef: float = 0.05  # TRL beta
    kl_kind: str = "k1"
    kl_placement: Literal["loss", "reward"] = "reward"


def rloo_round_advantages(R: Tensor, weights: Tensor | None, cfg: RLConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """``[N,K]`` rewards (groups of ``cfg.group_size`` contiguous) -> ``[N]`` leave-one-out advantages."""
    return rloo_advantages(
        R,
        group_size=cfg.group_size,
        normalize=cfg.normalize_advantages,
        eps=cfg.advantage_eps,
        reward_weights=weights,
    )


def train_rloo(
    cfg: RLOOConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    reward_funcs: Sequence[Callable[..., list] | str] = (),
    generator: Generator | None = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Run RLOO; same arguments and return value as ``train_grpo``."""
    return train_policy_gradient(
        cfg,
        rloo_round_advantages,
        name="rloo",
        model=model,
        tokenizer=tokenizer,
        train_data=train_data,
        reward_funcs=reward_funcs,
        generator=generator,
        callbacks=callbacks,
    )
