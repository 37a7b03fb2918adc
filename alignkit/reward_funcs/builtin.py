"""Built-in shaping rewards: reasoning format (``<think>...</think>`` then an answer) and length penalties."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alignkit.losses.policy import overlong_penalty
from alignkit.reward_funcs.core import RewardFunc, completion_text, register_reward

__all__ = ["format_reward", "length_penalty", "matches_format"]


def matches_format(
    text: str,
    think: tuple[str, str] = ("<think>", "</think>"),
    answer: tuple[str, str] | None = None,
) -> bool:
    """True when ``text`` is one think block, then a non-empty answer, and nothing else.

    ``answer=None``: any non-blank text after the think block (containing no think tag). With answer tags the
    part after the think block must be exactly one ``open ... close`` block (whitespace around it allowed).
    The think block may be empty: this reward checks shape, not effort.
    """
    t_open, t_close = think
    body = text.strip()
    if not body.startswith(t_open) or body.count(t_open) != 1 or body.count(t_close) != 1:
        return False
    rest = body[len(t_open) :].split(t_close, 1)
    if len(rest) != 2:
        return False
    tail = rest[1].strip()
    if answer is None:
        return bool(tail)
    a_open, a_close = answer
    if tail.count(a_open) != 1 or tail.count(a_close) != 1 or not (tail.startswith(a_open) and tail.endswith(a_close)):
        return False
    return bool(tail[len(a_open) : len(tail) - len(a_close)].strip())


def format_reward(
    think: tuple[str, str] = ("<think>", "</think>"),
    answer: tuple[str, str] | None = None,
    *,
    prompt_opens_think: bool | None = None,
    value: float = 1.0,
) -> RewardFunc:
    """Reward ``value`` (else 0.0) for completions shaped as a think block then an answer (``matches_format``).

    ``prompt_opens_think``: the chat template already put the opening tag at the end of the prompt (Qwen3 /
    DeepSeek-R1 style), so the completion starts inside the block. ``None`` decides per sample: the prompt
    ends (ignoring whitespace) with the opening tag.
    """
    t_open = think[0]

    def reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **_: Any):
        out: list[float | None] = []
        for p, c in zip(prompts, completions, strict=True):
            text = completion_text(c)
            opened = prompt_opens_think
            if opened is None:
                opened = isinstance(p, str) and p.rstrip().endswith(t_open)
            if opened:
                text = t_open + text
            out.append(value if matches_format(text, think, answer) else 0.0)
        return out

    reward.__name__ = "format"
    return reward


def length_penalty(max_len: int, buffer: int, factor: float = 1.0) -> RewardFunc:
    """DAPO soft overlong shaping on the completion's token count ``L = len(completion_ids[i])``:
    0 up to ``max_len − buffer``, then linear down to ``−factor`` at ``max_len`` (and below it beyond).

    Add it to a task reward with weight 1 (``RewardSet([math, length_penalty(...)])``).
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")

    def overlong(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **_: Any):
        lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float32)
        return (overlong_penalty(lengths, max_len, buffer, factor) + 0.0).tolist()  # +0.0: no "-0.0" in logs

    return overlong


def _think_tags(think: Sequence[str] | str | None) -> tuple[str, str]:
    if think is None:
        return ("<think>", "</think>")
    if isinstance(think, str):  # "think" -> <think>, </think>
        return (f"<{think}>", f"</{think}>")
    a, b = think
    return (a, b)


@register_reward("format")
def _format(
    think: Sequence[str] | str | None = None, answer: Sequence[str] | str | None = None, **kw: Any
) -> RewardFunc:
    """Registry entry; tags may be given as a bare name (``think="reasoning"``) for the CLI."""
    return format_reward(_think_tags(think), None if answer is None else _think_tags(answer), **kw)


register_reward("overlong")(length_penalty)
register_reward("length")(length_penalty)
