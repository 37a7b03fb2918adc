"""Prompt rows for online RL: rows -> token ids (with the chat format's generation prompt), and the seeded order
in which a run visits them."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.data.rows import RowError
from alignkit.data.tokenize import resolve_format, tokenizer_switches

__all__ = ["Prompt", "load_prompts", "round_prompts"]


@dataclass
class Prompt:
    prompt: Any  # as given in the row (str or messages): what reward functions receive
    ids: list[int]
    columns: dict[str, Any]  # the row's other fields (e.g. `answer`), passed to reward functions


def load_prompts(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    chat_format: str | None = None,
    max_prompt_length: int | None = None,
) -> list[Prompt]:
    """Rows -> token ids. Message prompts go through the chat format (``chat_format``, or detected from the
    tokenizer) with the generation prompt appended; plain string prompts are used as they are. A `messages`
    row loses its trailing assistant turns. Prompts over ``max_prompt_length`` tokens keep their last ones."""
    fmt = None
    texts, prompts, columns = [], [], []
    for i, row in enumerate(rows):
        if "prompt" in row:
            prompt = row["prompt"]
        elif "messages" in row:
            prompt = list(row["messages"])
            while prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
                prompt.pop()
        else:
            raise RowError(i, "prompt", "a `prompt` (string or list of messages) or a `messages` list", row)
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            fmt = fmt or resolve_format(tokenizer, chat_format)
            text = fmt.render(prompt, add_generation_prompt=True, **tokenizer_switches(tokenizer, fmt)).text
        else:
            raise RowError(i, "prompt", "a non-empty string or list of {role, content} messages", prompt)
        texts.append(text)
        prompts.append(prompt)
        columns.append({k: v for k, v in row.items() if k not in ("prompt", "messages", "completion")})
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, ids, cols) in enumerate(zip(prompts, enc, columns)):
        if not ids:
            raise RowError(i, "prompt", "a prompt that tokenizes to at least one token", p)
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        out.append(Prompt(p, list(ids), cols))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def round_prompts(n_rows: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """Prompt indices of a round: the rows in shuffled epochs, fixed by the seed (resume = recompute)."""
    start = round_idx * per_round
    return [_epoch_order(n_rows, seed, p // n_rows)[p % n_rows] for p in range(start, start + per_round)]
