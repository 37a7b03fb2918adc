"""Rollouts from a Hugging Face causal LM: the default backend and the CPU path.

Prompts are repeated ``n`` times (groups contiguous), left-padded and decoded in batches by a short loop over
the model's forward with a KV cache (``DynamicCache``), not ``model.generate``:

* the sampler log-prob of each token is ``log_softmax(logits / τ)`` at the sampled token, the quantity the
  trainer computes (top-k / top-p truncation is not reflected in it, as with vLLM's ``processed_logprobs``);
* sampling is an inverse-CDF draw (one uniform per row, ``searchsorted`` in the running sum): ~3 ms for
  32 x 32k on one CPU core, where ``torch.multinomial`` (what ``generate`` uses) and ``exponential_`` (the
  Gumbel / exponential race) each took ~20 ms, a third of the decode time of a small model;
* rows that emitted a stop token leave the batch (their KV-cache rows are dropped), so a group whose answers
  differ in length stops paying for the finished ones; ``generate`` keeps computing them as padding;
* the model's ``generation_config`` (repetition penalty, top_k=20, ...) plays no part: RL samples exactly the
  distribution the trainer scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignkit import distributed
from alignkit.models import eval_mode
from alignkit.rollout.base import Rollouts, check_request, prompt_seeds, stop_ids_from_config
from alignkit.scoring import cache_kwarg

__all__ = ["HFGenerator", "sample_tokens"]


def sample_tokens(
    logps: Tensor,
    *,
    top_k: int = -1,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> Tensor:
    """Draw one token per row from ``exp(logps)`` (``[B,V]`` log-probs), optionally truncated to the ``top_k``
    most likely tokens and the smallest set whose mass reaches ``top_p``. Returns ``[B]`` int64. Each row uses
    one uniform in [0, 1): ``uniforms`` ``[B]`` when given, else drawn from ``generator`` (or the global RNG)."""
    z = logps
    if top_k > 0 and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        mass_before = sorted_z.softmax(-1).cumsum(-1) - sorted_z.softmax(-1)
        drop = mass_before >= top_p  # keep each token whose predecessors' mass is below top_p (the first always)
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # inverse CDF: one uniform per row against the running sum (fp64, so 150k-token vocabularies lose nothing)
    cdf = (z - z.amax(-1, keepdim=True)).exp().double().cumsum(-1)
    if uniforms is None:
        uniforms = torch.rand(z.shape[0], dtype=torch.float64, device=z.device, generator=generator)
    u = uniforms.to(z.device, torch.float64)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=z.shape[-1] - 1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the HF model inside


def stream_uniforms(streams: Tensor, t: int) -> Tensor:
    """The ``t``-th uniform in [0, 1) of each random stream in ``streams`` (``[B]`` int64): splitmix64 of
    (stream, t), so a sample's draws depend on its own stream only, never on the batch it was decoded in."""
    golden, mix1, mix2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
    with np.errstate(over="ignore"):
        x = streams.cpu().numpy().astype(np.uint64) * np.uint64(golden) + np.uint64(
            (t + 1) * 0xD1B54A32D192ED03 % 2**64
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(mix1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(mix2)
        x ^= x >> np.uint64(31)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0**-53)


class HFGenerator:
    """``Generator`` over a Hugging Face causal LM's forward (see ``alignkit.rollout.base`` and the module doc).

    Args:
        model: a causal LM; usually the training model itself, so ``update_weights`` is free.
        pad_token_id: id used for left padding (any id works: padded slots are masked).
        max_batch_size: sequences (prompts × n) decoded together; None = all at once.
        vision: a vision-language model's :class:`alignkit.vision.VisionProcessor`: ``generate`` then takes each
            prompt's ``images`` (the prompt's forward runs the vision encoder; image tokens are never sampled;
            Qwen2-VL's M-RoPE positions are laid out from the image grid at the prompt and carried on per row).
    """

    def __init__(
        self, model: torch.nn.Module, pad_token_id: int, *, max_batch_size: int | None = None, vision: Any = None
    ) -> None:
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max_batch_size
        self.vision = vision
        self.suppress = sorted(vision.image_token_ids()) if vision is not None else []

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
        seed: int | Sequence[int] | None = None,
        images: Sequence[Sequence[Any] | None] | None = None,
    ) -> Rollouts:
        """Sample ``n`` completions per prompt. ``temperature=0`` is greedy (log-probs then at τ=1).
        ``images``: each prompt's images (a vision-language generator only).

        With a ``seed`` (seeds as in ``Generator``) sample j of a prompt with seed s draws from stream ``s + j``
        (:func:`stream_uniforms`; the global RNG is left alone): the same prompt and seed give the same
        completion whatever else is in the batch, and however prompts are split over calls or ranks.
        """
        check_request(prompt_ids, n, max_new_tokens)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        stops = list(stop_token_ids) if stop_token_ids is not None else self._default_stops()
        seeds = prompt_seeds(seed, len(prompt_ids), n)
        streams = None if seeds is None else [s + j for s in seeds for j in range(n)]
        if images is not None and self.vision is None:
            raise ValueError("prompts with images need a generator made with the model's VisionProcessor (vision=)")
        expanded = [list(p) for p in prompt_ids for _ in range(n)]
        row_images = None if images is None else [im for im in images for _ in range(n)]
        step = self.max_batch_size or len(expanded)
        out = Rollouts([], [], [], [])
        with eval_mode(self.model):  # no dropout while sampling
            for i in range(0, len(expanded), step):
                chunk = expanded[i : i + step]
                mine = None if streams is None else torch.tensor(streams[i : i + step], dtype=torch.long)
                chunk_images = None if row_images is None else row_images[i : i + step]
                ids, lps, fin = self._decode(
                    chunk, max_new_tokens, temperature, top_p, top_k, stops, mine, chunk_images
                )
                out.prompt_ids += chunk
                out.completion_ids += ids
                out.logprobs += lps
                out.finished += fin
        return out

    def _decode(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stops: list[int],
        streams: Tensor | None,
        images: Sequence[Sequence[Any] | None] | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        from transformers import DynamicCache

        model = self.model
        device = next(model.parameters()).device
        B, width = len(prompts), max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.zeros(B, width + max_new_tokens, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            mask[r, width - len(p) : width] = 1
        positions = (mask[:, :width].cumsum(1) - 1).clamp(min=0)
        stop_ids = torch.tensor(stops, device=device)
        cache = DynamicCache(config=_unwrap(model).config)
        kw = {cache_kwarg(model): cache, "use_cache": True}
        vision_kw: dict[str, Any] = {}
        family, pos_state = None, None  # a VLM family whose positions follow the image layout, and its state
        prefill_positions = positions
        if images is not None and self.vision is not None:  # the prompts' images enter with the prompt forward
            vision_kw = {k: v.to(device) for k, v in self.vision.row_inputs(images, input_ids).items()}
            if any(images) and self.vision.family.own_positions:
                from alignkit.vision import vision_backbone

                family = self.vision.family
                prefill_positions, pos_state = family.prefill_positions(
                    vision_backbone(model), input_ids, mask[:, :width], positions, vision_kw
                )
        suppress = torch.tensor(self.suppress, dtype=torch.long, device=device) if self.suppress else None
        logits = model(input_ids=input_ids, attention_mask=mask[:, :width], position_ids=prefill_positions,
                       logits_to_keep=1, **kw, **vision_kw).logits[:, -1]  # fmt: skip
        pos = positions[:, -1]
        rows = torch.arange(B, device=device)  # original row of each live sequence (-1: a placeholder)
        record: list[tuple[Tensor, Tensor, Tensor]] = []  # per step: (rows, tokens, log-probs)
        sample = temperature > 0
        # FSDP2: each forward gathers shards with the other ranks, so every rank decodes as many steps as the
        # longest; a rank whose sequences have all stopped steps one placeholder row until then
        in_step = distributed.is_fsdp(model) and distributed.world_size() > 1
        for t in range(max_new_tokens):
            if suppress is not None:  # image tokens are filled by the vision encoder, never written by the model
                logits = logits.index_fill(-1, suppress, float("-inf"))
            logps = torch.log_softmax(logits.float() / (temperature if sample else 1.0), dim=-1)
            u = None if streams is None else stream_uniforms(streams[rows.clamp(min=0).cpu()], t)
            tok = sample_tokens(logps, top_k=top_k, top_p=top_p, uniforms=u) if sample else logps.argmax(-1)
            real = rows >= 0
            record.append((rows[real], tok[real], logps.gather(1, tok[:, None]).squeeze(1)[real]))
            live = ~torch.isin(tok, stop_ids) & real
            more = bool(live.any())
            if in_step:
                more = bool(distributed.all_reduce_sum(torch.tensor(int(more))) > 0)
            if t == max_new_tokens - 1 or not more:
                break
            if not bool(live.all()):  # drop finished rows from the batch and the cache
                keep = (
                    live.nonzero().squeeze(1) if bool(live.any()) else torch.zeros(1, dtype=torch.long, device=device)
                )
                cache.batch_select_indices(keep)
                rows, tok, pos, mask = rows[keep], tok[keep], pos[keep], mask[keep]
                pos_state = None if pos_state is None else pos_state[keep]
                if not bool(live.any()):
                    rows = torch.full_like(rows, -1)
            mask[:, width + t] = 1
            pos = pos + 1
            step_pos = pos[:, None] if family is None else family.decode_positions(pos, pos_state)
            logits = model(input_ids=tok[:, None], attention_mask=mask[:, : width + t + 1],
                           position_ids=step_pos, **kw).logits[:, -1]  # fmt: skip
        ids: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        for r_, tok_, lp_ in record:
            for r, x, lp in zip(r_.tolist(), tok_.tolist(), lp_.tolist()):
                ids[r].append(x)
                lps[r].append(lp)
        stop_set = set(stops)
        return ids, lps, [bool(c) and c[-1] in stop_set for c in ids]

    def _default_stops(self) -> list[int]:
        inner = _unwrap(self.model)
        return stop_ids_from_config(inner.config, getattr(inner, "generation_config", None))

    def update_weights(self, model: torch.nn.Module) -> None:
        """No-op when generating with the training model itself; otherwise copy its weights in place."""
        if model is self.model:
            return
        self.model.load_state_dict(model.state_dict())

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
