"""The generation protocol every rollout backend implements (HF ``generate``, vLLM colocate, vLLM server).

Token ids in, token ids and per-token sampler log-probs out. The loops only ever talk to a ``Generator``, so a
backend can be swapped without touching loss code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
    """A sampling engine. ``logprobs`` are the behaviour log-probs at the sampling temperature."""

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
        seed: int | None = None,
    ) -> Rollouts: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...  # push trainer weights into the engine

    def close(self) -> None: ...
