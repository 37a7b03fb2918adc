"""Importable by dotted path from the processes torchrun starts (tests/test_distributed.py): a generator whose
completions are a pure function of the prompt, and a reward. With them a GRPO round is the same however its
prompts are split over ranks, so a 2-rank run can be compared with one process step by step."""

from __future__ import annotations

import random
from typing import Any

from alignkit.rollout.base import Rollouts


class PromptFunctionGenerator:
    """Completion k of prompt p: 1..max_new_tokens printable byte ids drawn from ``Random(f"{p}/{k}")``."""

    def __init__(self, tokenizer: Any) -> None:
        self.first = tokenizer.convert_tokens_to_ids("a")  # the byte tokenizer: consecutive printable bytes

    def generate(self, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, **_: Any) -> Rollouts:
        prompts, completions, logps = [], [], []
        for p in prompt_ids:
            for k in range(n):
                rng = random.Random(f"{list(p)}/{k}")
                c = [self.first + rng.randrange(20) for _ in range(rng.randint(1, max_new_tokens))]
                prompts.append(list(p))
                completions.append(c)
                logps.append([-1.0] * len(c))
        return Rollouts(prompts, completions, logps, [False] * len(completions))

    def update_weights(self, model: Any) -> None:
        pass

    def close(self) -> None:
        pass


def prompt_function_generator(model: Any, tokenizer: Any, **_: Any) -> PromptFunctionGenerator:
    """The ``backend=tests.distributed_support.prompt_function_generator`` factory."""
    return PromptFunctionGenerator(tokenizer)


def even_tokens(prompts: list, completions: list, completion_ids: list, **_: Any) -> list[float]:
    """The fraction of even token ids: a reward that differs within a group."""
    return [sum(t % 2 == 0 for t in c) / len(c) for c in completion_ids]
