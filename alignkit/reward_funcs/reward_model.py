"""A trained scalar reward model used as a reward (``alignkit.reward_model``: HF sequence classification with
``num_labels=1``, or a ``ScalarHeadModel``).

Each (prompt, completion) is tokenised exactly as alignkit tokenises training rows (``alignkit.data.tokenize``):
plain strings become ``prompt + completion + eos``; with a ``chat_format`` (or conversational prompts) the
pair is rendered as a user turn and an assistant turn. Scores come from ``alignkit.reward_model.score``: the
head at the last real token, found from the attention mask, exactly as in reward-model training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alignkit.data.rows import Sample, normalize_row
from alignkit.data.tokenize import encode_samples, resolve_format, tokenizer_switches
from alignkit.models import pad_token_id
from alignkit.reward_funcs.core import RewardFunc, completion_text, register_reward
from alignkit.reward_model import load_reward_model, score
from alignkit.templates import ChatFormat

__all__ = ["reward_model_reward"]


def reward_model_reward(
    model: nn.Module | str,
    tokenizer: Any = None,
    chat_format: str | ChatFormat | None = None,
    batch_size: int = 8,
    *,
    max_length: int | None = None,
    name: str = "reward_model",
    dtype: str | torch.dtype = "float32",
) -> RewardFunc:
    """A reward that scores ``prompt + completion`` with ``model`` (a reward model, or a folder / hub id loaded
    by ``load_reward_model`` together with its tokenizer).

    Args:
        chat_format: render each pair as a conversation with this format (a name or a ``ChatFormat``); None
            scores plain ``prompt + completion + eos`` (prompts already rendered by the generation path), except
            that conversational prompts (lists of messages) are rendered with the format detected from the
            tokenizer.
        batch_size: rows per forward; rows are sorted by length first so batches carry little padding.
        max_length: longest input; longer ones lose tokens on the left, keeping the completion's end.

    The model is put in eval mode and run under ``torch.inference_mode``; scores are returned as floats.
    """
    if isinstance(model, str):
        model, loaded_tok = load_reward_model(model, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    if tokenizer is None:
        raise ValueError("reward_model_reward needs the reward model's tokenizer")
    if getattr(model, "score", None) is not None and getattr(model.config, "num_labels", 1) != 1:
        raise ValueError(f"a reward model needs a scalar head (num_labels=1), got {model.config.num_labels}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    pad_id = pad_token_id(tokenizer)
    fmt_cache: dict[str, ChatFormat] = {}

    def fmt() -> ChatFormat:
        if "fmt" not in fmt_cache:
            fmt_cache["fmt"] = resolve_format(tokenizer, chat_format)
        return fmt_cache["fmt"]

    def sample(prompt: Any, completion: Any) -> Sample:
        if isinstance(prompt, str) and chat_format is None:
            return Sample(prompt=prompt, text=completion_text(completion))
        pm = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        cm = [{"role": "assistant", "content": completion_text(completion)}]
        return normalize_row({"prompt": pm, "completion": cm})

    @torch.inference_mode()
    def reward(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **_: Any) -> list[float]:
        samples = [sample(p, c) for p, c in zip(prompts, completions, strict=True)]
        chat = any(s.messages is not None for s in samples)
        f = fmt() if chat else None  # plain rows never touch the format
        sw = tokenizer_switches(tokenizer, f) if f is not None else {}
        enc = encode_samples(
            tokenizer, samples, chat_format=f, switches=sw, train_on="all", max_length=max_length, truncation="left"
        )
        ids = [e.input_ids for e in enc]
        device = next(model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [0.0] * len(ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            T = max(len(ids[i]) for i in chunk)
            x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            am = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, i in enumerate(chunk):  # right padding: positions of real tokens start at 0
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                am[r, : len(ids[i])] = 1
            s = score(model, x.to(device), am.to(device)).float().cpu().tolist()
            for r, i in enumerate(chunk):
                out[i] = s[r]
        return out

    reward.__name__ = name
    return reward


@register_reward("reward_model")
def _reward_model(model: nn.Module | str, tokenizer: Any = None, **kw: Any) -> RewardFunc:
    return reward_model_reward(model, tokenizer, **kw)
