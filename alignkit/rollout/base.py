"""The generation protocol every rollout backend implements (HF ``generate``, vLLM colocate, vLLM server).

Token ids in, token ids and per-token sampler log-probs out. The loops only ever talk to a ``Generator``, so a
backend can be swapped without touching loss code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class Rollouts:
    """Completions for a batch of prompts, ``n`` per prompt, grouped contiguously.

    With P prompts and group size n there are N = P * n items; group g is items ``[g*n, (g+1)*n)``.
    """

    prompt_ids: list[list[int]]  # one per completion (repeated n times per prompt, grouped contiguously)
    completion_ids: list[list[int]]  # len = len(prompts) * n; group g = items [g*n, (g+1)*n)
    logprobs: list[list[float]]  # sampler log-prob of each completion token (same lengths)
    finished: list[bool]  # True if ended with a stop token, False if cut at max_new_tokens

    def __len__(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class Generator(Protocol):
    """A sampling engine. ``logprobs`` are the behaviour log-probs at the sampling temperature.

    ``seed``: an int gives prompt i the seed ``seed + i*n``; a sequence gives each prompt its own (the RL loops
    pass seeds fixed by a prompt's place in the round, so the samples do not depend on how ranks split it);
    sample j of a prompt with seed s is drawn from stream ``s + j``.
    """

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: list[int] | None = None,
        seed: int | Sequence[int] | None = None,
        # images: each prompt's images, passed only to engines of vision-language models (HFGenerator(vision=))
    ) -> Rollouts: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...  # push trainer weights into the engine

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# helpers every backend uses
# ---------------------------------------------------------------------------------------------------------------


def check_request(prompt_ids: Sequence[Sequence[int]], n: int, max_new_tokens: int) -> None:
    """Refuse a request no backend can serve: ``n`` or ``max_new_tokens`` below 1, or an empty prompt."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt: every prompt needs at least one token")


def prompt_seeds(seed: int | Sequence[int] | None, n_prompts: int, n: int) -> list[int] | None:
    """One seed per prompt (see :class:`Generator`): ``seed + i*n`` from an int, a sequence as given."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return [seed + i * n for i in range(n_prompts)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts: give one per prompt, or one int")
    return seeds


def stop_ids_from_config(config: Any, generation_config: Any = None) -> list[int]:
    """EOS id(s) from a generation config, else the model config (HF objects or dicts): the default stops."""

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    eos = get(generation_config, "eos_token_id") if generation_config is not None else None
    if eos is None:
        eos = get(config, "eos_token_id")
    if eos is None:
        raise ValueError("no stop_token_ids given and the model has no eos_token_id")
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def stop_token_ids(model: torch.nn.Module, tokenizer: Any, extra_tokens: Sequence[str] = ()) -> list[int]:
    """The ids a rollout stops at: the model's generation-config EOS id(s), the tokenizer's EOS, and
    ``extra_tokens`` (each must be a single token of the tokenizer)."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if x is not None and x not in ids:
            ids.append(int(x))
    for tok in extra_tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"stop token {tok!r} is not a single token of the tokenizer")
        ids.append(int(tid))
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos_token and no stop_tokens were given")
    return ids


def read_json(path: Path) -> dict:
    """A model folder's JSON file (config.json, generation_config.json) as a dict; {} when it is absent."""
    return json.loads(path.read_text()) if path.exists() else {}
