"""Rollouts with Hugging Face ``model.generate``: the default backend and the CPU path.

Prompts are repeated ``n`` times (groups contiguous), left-padded and decoded in batches with the KV cache.
The sampler log-probs are recorded *while* generating by a logits processor that sits before HF's warpers:
at each step it keeps ``log_softmax(logits / τ)`` and, one step later, reads off the token that was sampled.
This stores one ``[B,V]`` fp32 tensor instead of HF's ``output_logits`` (``[steps,B,V]``).

The log-probs are those of the tempered full distribution, the quantity the trainer computes; top-k / top-p
truncation is not reflected in them (as with vLLM's ``processed_logprobs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from alignkit.rollout.base import Rollouts

__all__ = ["HFGenerator"]


class _SamplerLogps:
    """Logits processor that records the log-prob of each sampled token at temperature ``τ`` (no warping)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.prev: Tensor | None = None  # [B,V] log-softmax of the previous step
        self.steps: list[Tensor] = []  # one [B] per generated token

    def _take(self, tokens: Tensor) -> None:
        assert self.prev is not None
        self.steps.append(self.prev.gather(-1, tokens.view(-1, 1).to(self.prev.device)).squeeze(-1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:  # input_ids now ends with the token sampled from the previous scores
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """Read the last sampled token and return ``[B, steps]`` log-probs."""
        if self.prev is not None:
            self._take(last_tokens)
            self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(0, 0)


def _stop_ids(model: torch.nn.Module, stop_token_ids: Sequence[int] | None) -> list[int]:
    if stop_token_ids is not None:
        return list(stop_token_ids)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        raise ValueError("no stop_token_ids given and the model has no eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos)


@contextlib.contextmanager
def _clean_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide the model's own generation defaults (repetition penalty, top_k=20, ...) for the duration.

    transformers fills every unset field from ``model.generation_config``; RL sampling must be exactly the
    distribution the trainer scores, so only what ``generate`` passes explicitly may apply.
    """
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the HF model inside
    saved = getattr(inner, "generation_config", None)
    inner.generation_config = GenerationConfig()
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        yield
    finally:
        inner.generation_config = saved
        model.train(was_training)


class HFGenerator:
    """``Generator`` over ``model.generate`` (see ``alignkit.rollout.base``).

    Args:
        model: a causal LM with ``generate``; usually the training model itself, so ``update_weights`` is free.
        pad_token_id: id used for left padding (any id works: padded slots are masked).
        max_batch_size: sequences (prompts × n) per ``generate`` call; None = all at once.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, *, max_batch_size: int | None = None) -> None:
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max_batch_size

    @torch.no_grad()
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
    ) -> Rollouts:
        """Sample ``n`` completions per prompt. ``temperature=0`` is greedy (log-probs then at τ=1)."""
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt: every prompt needs at least one token")
        stops = _stop_ids(self.model, stop_token_ids)
        expanded = [list(p) for p in prompt_ids for _ in range(n)]
        step = self.max_batch_size or len(expanded)
        out = Rollouts([], [], [], [])
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None), _clean_generation_config(self.model):
            if seed is not None:
                torch.manual_seed(seed)
            for i in range(0, len(expanded), step):
                chunk = expanded[i : i + step]
                ids, lps, fin = self._generate_chunk(chunk, max_new_tokens, temperature, top_p, top_k, stops)
                out.prompt_ids += chunk
                out.completion_ids += ids
                out.logprobs += lps
                out.finished += fin
        return out

    def _generate_chunk(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stops: list[int],
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        from transformers import LogitsProcessorList

        device = next(self.model.parameters()).device
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sample = temperature > 0
        recorder = _SamplerLogps(temperature if sample else 1.0)
        seqs = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=(top_k if top_k > 0 else 0) if sample else None,
            num_beams=1,
            eos_token_id=stops,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            logits_processor=LogitsProcessorList([recorder]),
        )
        gen = seqs[:, width:]
        logps = recorder.finish(gen[:, -1]).cpu()
        stop_set = set(stops)
        ids_out, lps_out, fin_out = [], [], []
        for row, lp in zip(gen.tolist(), logps.tolist()):
            # cut after the first stop token (HF pads finished rows); the stop token stays in the completion
            end = next((j + 1 for j, t in enumerate(row) if t in stop_set), None)
            ids_out.append(row[: end or len(row)])
            lps_out.append(lp[: end or len(row)])
            fin_out.append(end is not None)
        return ids_out, lps_out, fin_out

    def update_weights(self, model: torch.nn.Module) -> None:
        """No-op when generating with the training model itself; otherwise copy its weights in place."""
        if model is self.model:
            return
        self.model.load_state_dict(model.state_dict())

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
