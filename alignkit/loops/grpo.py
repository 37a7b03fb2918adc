"""GRPO: group-relative policy optimisation, from a prompt dataset and reward functions.

For each prompt, sample G completions, score them, and take ``A = (R − mean_group) / std`` (``scale_rewards``:
group / batch / none = Dr.GRPO) as every token's advantage in a clipped policy-gradient loss. The recipe knobs
(loss kind, ratio level, aggregation, KL, rollout IS) are ``pg_loss``'s; the loop is ``loops.policy_gradient``'s.

    from alignkit.loops.grpo import GRPOConfig, train_grpo
    train_grpo(GRPOConfig(model="path", dataset="prompts.jsonl", rewards=["math_answer"], output_dir="runs/grpo"))

Common recipes: DAPO = ``agg="token_mean", ratio_high=1.28, mask_truncated=True``; Dr.GRPO =
``scale_rewards="none", agg="token_sum_constant"``; GSPO = ``ratio_level="sequence"`` with tight bounds
(e.g. ``ratio_low=1-3e-4, ratio_high=1+4e-4``); CISPO = ``loss="cispo", ratio_high=5.0``.

Composes: the online RL loop of `loops.policy_gradient` with `advantage="grpo"` and TRL 1.16's GRPO defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.loops.policy_gradient import RLConfig, train_policy_gradient
from alignkit.rollout import Generator
from alignkit.rollout.round import evaluate_rewards

__all__ = ["GRPOConfig", "evaluate_rewards", "train_grpo"]


@dataclass
class GRPOConfig(RLConfig):
    output_dir: str = "runs/grpo"
    advantage: str = "grpo"  # alignkit.losses.advantages.grpo_advantages (scale_rewards, multi_reward)
    loss: str = "ppo_clip"
    agg: str = "token_mean"  # TRL 1.16 default loss_type "dapo"
    kl_coef: float = 0.0  # TRL beta


def train_grpo(
    cfg: GRPOConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    reward_funcs: Sequence[Callable[..., list] | str] = (),
    generator: Generator | None = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    tools: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]] = (),
    environment_factory: Callable[[], Any] | Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Run GRPO. Pass objects (model, tokenizer, prompt rows, reward functions, a ``Generator``, tools or an
    environment class) or let ``cfg`` name them. Returns ``{"steps", "last": last metrics record, "run_dir"}``."""
    return train_policy_gradient(
        cfg,
        name="grpo",
        model=model,
        tokenizer=tokenizer,
        train_data=train_data,
        reward_funcs=reward_funcs,
        generator=generator,
        callbacks=callbacks,
        tools=tools,
        environment_factory=environment_factory,
    )
