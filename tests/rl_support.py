"""Pieces the RL-loop tests share: a tiny chat policy, the prompt rows and a learnable reward."""

from __future__ import annotations

import torch

from alignkit.models import build_tiny_model, tiny_llama_config

PROMPT_ROWS = [{"prompt": f"q{i}:"} for i in range(16)]


def tiny_policy(tok, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 32-wide Llama over ``tok`` that ends its turns with ``<|im_end|>``."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = tiny_llama_config(len(tok), hidden=32, layers=2, eos_token_id=end, pad_token_id=tok.pad_token_id)
    return build_tiny_model(cfg, seed=seed)


def even_first(prompts, completions, completion_ids, **columns):
    """1 when the first sampled token id is even: ~0.5 for a random model (a coin flip per completion), learnable
    in a few steps. Module level, so rollout worker processes can import it."""
    return [float(c[0] % 2 == 0) for c in completion_ids]
