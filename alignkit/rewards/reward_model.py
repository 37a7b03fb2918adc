"""A trained scalar reward model (``AutoModelForSequenceClassification``, ``num_labels=1``) used as a reward.

Each (prompt, completion) is tokenised exactly as alignkit tokenises training rows (``alignkit.data.tokenize``):
plain strings become ``prompt + completion + eos``; with a ``chat_format`` (or conversational prompts) the
pair is rendered as a user turn and an assistant turn. The score is the head's value at the last real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.data.rows import Sample, normalize_row
from alignkit.data.tokenize import encode_samples, resolve_format, tokenizer_switches
from alignkit.rewards.core import RewardFunc, register_reward
from alignkit.rewards.math import _text
from alignkit.templates import ChatFormat

__all__ = ["last_token_scores", "reward_model_reward"]


def last_token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar head value at each row's last real token: ``[B,T] -> [B]`` float32.

    Runs the backbone and applies the ``score`` head to the last real token's hidden state only. We do not use
    the model's own pooled output: HF pools at the last token that is not ``pad_token_id``, which is wrong when
    pad == eos and the text ends with eos (as our rows do). Models without a ``score`` head fall back to
    ``model(...).logits`` (``[B,T,1]`` gathered here, or ``[B,1]`` already pooled by the model).
    """
    am = attention_mask.long()
    T = input_ids.shape[1]
    last = (torch.arange(T, device=am.device) * am).argmax(-1)  # rightmost real token, either padding side
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "score", None)
    if isinstance(backbone, nn.Module) and isinstance(head, nn.Module) and backbone is not model:
        h = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(h[rows, last])[:, 0].float()
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.dim() == 3:
        logits = logits[rows, last]
    return logits[:, 0].float()


def _score_fn() -> Any:
    # Prefer the shared scorer of alignkit.reward_model (the reward-model trainer's) when it exists, so training
    # and rewarding read the head the same way; fall back to ours.
    try:
        from alignkit.reward_model import score  # type: ignore[attr-defined]
    except ImportError:
        return last_token_scores
    return score


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
    """A reward that scores ``prompt + completion`` with ``model`` (a module, or a path loaded as
    ``AutoModelForSequenceClassification`` with its tokenizer).

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
        from transformers import AutoModelForSequenceClassification

        from alignkit.models import load_model_and_tokenizer

        model, loaded_tok = load_model_and_tokenizer(
            model, dtype=dtype, auto_class=AutoModelForSequenceClassification, num_labels=1
        )
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    if tokenizer is None:
        raise ValueError("reward_model_reward needs the reward model's tokenizer")
    if getattr(getattr(model, "config", None), "num_labels", 1) != 1:
        raise ValueError(f"a reward model needs a scalar head (num_labels=1), got {model.config.num_labels}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    score = _score_fn()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    fmt_cache: dict[str, ChatFormat] = {}

    def fmt() -> ChatFormat:
        if "fmt" not in fmt_cache:
            fmt_cache["fmt"] = resolve_format(tokenizer, chat_format)
        return fmt_cache["fmt"]

    def sample(prompt: Any, completion: Any) -> Sample:
        if isinstance(prompt, str) and chat_format is None:
            return Sample(prompt=prompt, text=_text(completion))
        pm = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        cm = [{"role": "assistant", "content": _text(completion)}]
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
