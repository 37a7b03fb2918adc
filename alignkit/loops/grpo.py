"""GRPO: group-relative policy optimisation, from a prompt dataset and reward functions.

For each prompt, sample G completions, score them, and take ``A = (R − mean_group) / std`` (``scale_rewards``:
group / batch / none = Dr.GRPO) as every token's advantage in a clipped policy-gradient loss. The recipe knobs
(loss kind, ratio level, aggregation, KL, rollout IS) are ``pg_loss``'s; the loop is ``_rl_common``'s.

    from alignkit.loops.grpo import GRPOConfig, train_grpo
    train_grpo(GRPOConfig(model="path", dataset="prompts.jsonl", rewards=["math_answer"], output_dir="runs/grpo"))

Common recipes: DAPO = ``agg="token_mean", ratio_high=1.28, mask_truncated=True``; Dr.GRPO =
``scale_rewards="none", agg="token_sum_constant"``; GSPO = ``ratio_level="sequence"`` with tight bounds
(e.g. ``ratio_low=1-3e-4, ratio_high=1+4e-4``); CISPO = ``loss="cispo", ratio_high=5.0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.loops._rl_common import RLConfig, evaluate_rewards, train_policy_gradient
from alignkit.losses.advantages import grpo_advantages
from alignkit.rollout import Generator

__all__ = ["GRPOConfig", "evaluate_rewards", "grpo_round_advantages", "train_grpo"]


@dataclass
class GRPOConfig(RLConfig):
    output_dir: str = "runs/grpo"
    loss: str = "ppo_clip"
    agg: str = "token_mean"  # TRL 1.16 default loss_type "dapo"
    kl_coef: float = 0.0  # TRL beta


def grpo_round_advantages(R: Tensor, weights: Tensor | None, cfg: RLConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """``[N,K]`` rewards (groups of ``cfg.group_size`` contiguous) -> ``[N]`` group-relative advantages."""
    return grpo_advantages(
        R,
        group_size=cfg.group_size,
        scale=cfg.scale_rewards,
        eps=cfg.advantage_eps,
        reward_weights=weights,
        multi_reward=cfg.multi_reward,
    )


def train_grpo(
    cfg: GRPOConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    reward_funcs: Sequence[Callable[..., list] | str] = (),
    generator: Generator | None = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Run GRPO. Pass objects (model, tokenizer, prompt rows, reward functions, a ``Generator``) or let ``cfg``
    name them. Returns ``{"steps", "last": last metrics record, "run_dir"}``."""
    return train_policy_gradient(
        cfg,
        grpo_round_advantages,
        name="grpo",
        model=model,
        tokenizer=tokenizer,
        train_data=train_data,
        reward_funcs=reward_funcs,
        generator=generator,
        callbacks=callbacks,
    )
