"""Reward functions for online RL (GRPO / RLOO): the contract, a weighted set, built-ins and lookup.

    from alignkit.reward_funcs import RewardSet, get_reward
    rs = RewardSet(["math_answer", "format"], weights=[1.0, 0.2])
    R, metrics = rs(prompts, completions, completion_ids, answer=answers)   # R [N,2] float32, NaN = None/failed
    A, _ = grpo_advantages(R, group_size=G, reward_weights=rs.weights)

A reward is ``f(prompts, completions, completion_ids, **columns) -> list[float | None]`` (sync or ``async``), or a
TRL-style ``f(completions, **kwargs)`` called with keywords (detected from the signature; see ``core``).
Built-ins by name: ``math_answer``, ``format``, ``overlong`` / ``length``, ``reward_model``; anything else by
dotted path ``"package.module:function"``.
"""

from alignkit.reward_funcs.builtin import format_reward, length_penalty, matches_format
from alignkit.reward_funcs.core import (
    REWARDS,
    RewardFunc,
    RewardSet,
    RewardState,
    combine_rewards,
    get_reward,
    register_reward,
    reward_name,
    weighted_reward_sum,
)
from alignkit.reward_funcs.math import (
    answers_match,
    extract_boxed,
    extract_final_answer,
    math_answer_reward,
    normalize_answer,
    parse_number,
)
from alignkit.reward_funcs.reward_model import reward_model_reward

__all__ = [
    "REWARDS",
    "RewardFunc",
    "RewardSet",
    "RewardState",
    "answers_match",
    "combine_rewards",
    "extract_boxed",
    "extract_final_answer",
    "format_reward",
    "get_reward",
    "length_penalty",
    "matches_format",
    "math_answer_reward",
    "normalize_answer",
    "parse_number",
    "register_reward",
    "reward_model_reward",
    "reward_name",
    "weighted_reward_sum",
]
