"""Log-probs of sequences under a model: the one home every loop scores through (docs/LOSSES.md §2).

Built on the chunked LM-head kernel of :mod:`alignkit.logprobs` (``[B,T,V]`` logits never exist):

* :func:`model_token_logps`: per-token log-probs of a Hugging Face causal LM on padded or packed rows, only the
  labelled positions projected through the head (SFT, and everything below);
* :func:`shared_prefix_token_logps`: the G completions of one prompt, the prompt run through the backbone once;
* :func:`batch_sequence_logps`: per-sequence sums (and LD-DPO / WPO reductions from :mod:`alignkit.losses`) of a
  ``collate_pairs`` / ``collate_unpaired`` / ``collate_sequences`` batch (the DPO / KTO policy and reference);
* :func:`completion_logps` / :func:`frozen_completion_logps`: completion-aligned ``[N, L]`` log-probs of
  prompt + completion token lists (the RL trainer, its old policy and its reference), shared-prompt or padded;
* :class:`SequenceScorer`: the no-grad settings object a reference calls (and hashes into its cache key).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit import distributed
from alignkit.data.collate import pad_collate
from alignkit.distributed import backbone_route
from alignkit.hardware import to_device
from alignkit.logprobs import DEFAULT_TOKEN_CHUNK, IGNORE_INDEX, chunked_token_logps
from alignkit.losses.preference import ld_token_weights, wpo_sequence_weights
from alignkit.models import decoder_of, eval_mode
from alignkit.ops import segment_sum
from alignkit.vision import is_vision_model, vision_backbone

__all__ = [
    "backbone",
    "head_transform",
    "model_token_logps",
    "cache_kwarg",
    "shared_prefix_token_logps",
    "batch_sequence_logps",
    "SequenceScorer",
    "completion_mask",
    "completion_logps",
    "frozen_completion_logps",
    "is_checkpointing",
]


# ----------------------------------------------------------------------------------------------------------
# Hugging Face causal LMs
# ----------------------------------------------------------------------------------------------------------


def backbone(model: torch.nn.Module) -> Any:  # noqa: ANN401
    """What runs the decoder stack of a Hugging Face model (hidden states after the final norm, no head): the
    decoder module (:func:`alignkit.models.decoder_of`), or on a DDP / FSDP2 model the wrapper's forward that
    runs it (:func:`alignkit.distributed.backbone_route`), so gradients are reduced and shards gathered."""
    route = backbone_route(model)
    if route is not None:
        return route
    return vision_backbone(model) if is_vision_model(model) else decoder_of(model)


def head_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """(logit_scale, softcap) applied by the model's forward after the LM head."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere: logits * logit_scale
    scale /= float(getattr(cfg, "logits_scaling", None) or 1.0)  # Granite: logits / logits_scaling
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    return scale, softcap


def model_head_logps(model: torch.nn.Module, hidden: Tensor, targets: Tensor, **kw: Any) -> dict[str, Tensor]:
    """:func:`chunked_token_logps` through ``model``'s output embedding and its logit scale / softcap."""
    head = model.get_output_embeddings()
    scale, softcap = head_transform(model)
    return chunked_token_logps(
        hidden, head.weight, targets, bias=getattr(head, "bias", None), logit_scale=scale, softcap=softcap, **kw
    )


def model_token_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    temperature: float = 1.0,
    extras: tuple[str, ...] | list[str] = (),
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = None,
    keep_logits_mb: float = 0.0,
    **backbone_kwargs: Any,
) -> dict[str, Tensor]:
    """Aligned per-token log-probs of a Hugging Face causal LM, scoring only labelled positions.

    Runs the backbone (last-layer hidden states after the final norm), picks the positions t−1 whose next
    label ``labels[:,t]`` is not −100, and projects only those through the output embedding with
    :func:`chunked_token_logps`, honouring ``config.logit_scale`` (Cohere), ``config.logits_scaling``
    (Granite) and ``config.final_logit_softcapping`` (Gemma). Other model-specific head tweaks are not known.

    Packed input: ``input_ids[1,ΣL]`` with ``position_ids`` restarting at 0 per document and
    ``attention_mask=None`` (transformers then isolates documents); the caller sets −100 at each document's
    first token.

    Args:
        input_ids, labels: ``[B,T]``; labels hold −100 where not scored.
        attention_mask, position_ids: ``[B,T]``, passed to the backbone.
        extras, keep_logits_mb: as in :func:`chunked_token_logps`.
        backbone_kwargs: passed on to the backbone (e.g. ``cu_seq_lens_q`` for flash-attention packing, a
            vision-language batch's image inputs; with ``vision_repeat=r`` its rows hold each image ``r`` times and
            the vision encoder runs once per image: :func:`alignkit.vision.encode_images_once`).

    Returns:
        ``{"logps": [B,T], **extras [B,T], "mask": [B,T] bool}``; slot t holds the value for predicting
        ``labels[:,t]`` from tokens ``< t``; slots with ``mask=False`` (t=0, label −100) are 0 (False for
        ``is_top1``) and carry no gradient.
    """
    backbone_kwargs.setdefault("use_cache", False)
    repeat = backbone_kwargs.pop("vision_repeat", None)
    if repeat is not None:  # each image's rows appear `repeat` times: its features are computed once
        from alignkit.vision import encode_images_once, vision_family

        backbone_kwargs = encode_images_once(model, vision_family(model), dict(backbone_kwargs), int(repeat))
    out = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **backbone_kwargs
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    B, T = labels.shape
    sel = labels[:, 1:] != IGNORE_INDEX  # [B,T-1]: hidden at t−1 scores labels[:, t]
    res = model_head_logps(
        model,
        hidden[:, :-1][sel],
        labels[:, 1:][sel],
        temperature=temperature,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        extras=extras,
        keep_logits_mb=keep_logits_mb,
    )
    mask = torch.cat([sel.new_zeros(B, 1), sel], dim=1)
    per_token = {k: torch.zeros(B, T, dtype=v.dtype, device=v.device).masked_scatter(mask, v) for k, v in res.items()}
    per_token["mask"] = mask
    return per_token


def cache_kwarg(module: torch.nn.Module) -> str:
    """The name ``module``'s forward takes its KV cache under: transformers renamed ``past_key_values`` to
    ``cache`` (5.2x). A peft wrapper passes either on through ``**kwargs``, so its base model is asked."""
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def shared_prefix_token_logps(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    extras: tuple[str, ...] | list[str] = (),
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = None,
    keep_logits_mb: float = 0.0,
    prompt_inputs: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Log-probs of ``G`` completions of ONE prompt, running the prompt through the backbone once.

    GRPO / RLOO score a group of completions that share their prompt. The padded path recomputes the prompt in
    every row; here the prompt runs once with a (differentiable) KV cache, the cache is repeated ``G`` times and
    the completions attend to it, so the prompt's backbone cost is paid once and its gradient is accumulated
    once. Values equal :func:`model_token_logps` on the ``G`` concatenated sequences (up to float summation
    order). Needs a backbone that fills a ``DynamicCache`` (Hugging Face decoder LMs, sliding windows
    included); it refuses when the cache stays empty (gradient checkpointing turns caching off).

    Args:
        prompt_ids: ``[P]`` prompt token ids (P >= 1).
        completion_ids: ``[G,L]`` completions, right-padded (pad slots may hold any id).
        completion_mask: ``[G,L]`` bool, True on real completion tokens (a prefix of each row).
        temperature, extras, token_chunk, vocab_chunk, keep_logits_mb: as in :func:`chunked_token_logps`.
        prompt_inputs: more inputs of the prompt's forward (a vision-language prompt's image inputs: its images
            then run through the vision encoder once for all ``G`` completions).

    Returns:
        ``{"logps": [G,L], **extras [G,L], "mask": completion_mask}`` completion-aligned: slot t holds
        ``log p(completion[:, t] | prompt, completion[:, <t])``; masked slots are 0 with no gradient.
    """
    from transformers import DynamicCache

    if prompt_ids.ndim != 1 or prompt_ids.numel() == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1-D tensor, got shape {tuple(prompt_ids.shape)}")
    if completion_ids.shape != completion_mask.shape or completion_ids.ndim != 2:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [G,L]")  # fmt: skip
    decoder = backbone(model)
    dev = next(model.parameters()).device
    P, (G, L) = prompt_ids.numel(), completion_ids.shape
    mask = completion_mask.to(dev, torch.bool)
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(decoder_of(model))
    extra = to_device(dict(prompt_inputs or {}), dev)
    out = decoder(input_ids=prompt_ids.to(dev)[None], use_cache=True, **{kw: cache}, **extra)
    if cache.get_seq_length() != P:
        raise RuntimeError(
            f"{type(decoder).__name__} did not fill the KV cache for the prompt (gradient checkpointing turns "
            "caching off); score with model_token_logps on the concatenated sequences instead"
        )
    cache.batch_repeat_interleave(G)
    attention_mask = torch.cat([mask.new_ones(G, P), mask], dim=1).long()
    position_ids = torch.arange(P, P + L, device=dev).expand(G, L)
    out_c = decoder(
        input_ids=completion_ids.to(dev),
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{kw: cache},
    )
    h_prompt = out.last_hidden_state[:, -1:]  # [1,1,H]: predicts each completion's first token
    hidden = torch.cat([h_prompt.expand(G, 1, h_prompt.shape[-1]), out_c.last_hidden_state[:, :-1]], dim=1)
    res = model_head_logps(
        model,
        hidden[mask],
        completion_ids.to(dev)[mask],
        temperature=temperature,
        token_chunk=token_chunk,
        vocab_chunk=vocab_chunk,
        extras=extras,
        keep_logits_mb=keep_logits_mb,
    )
    per_token = {k: torch.zeros(G, L, dtype=v.dtype, device=dev).masked_scatter(mask, v) for k, v in res.items()}
    per_token["mask"] = mask
    return per_token


# ----------------------------------------------------------------------------------------------------------
# Per-sequence log-probs of a collated batch (DPO / KTO policy and reference)
# ----------------------------------------------------------------------------------------------------------


def batch_sequence_logps(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    *,
    temperature: float = 1.0,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    ld_alpha: float | None = None,
    wpo: bool = False,
) -> dict[str, Tensor]:
    """One forward over a `collate_*` batch, reduced per sequence (padded or packed alike).

    Returns `[n]` fp32 tensors (n = `batch["n_sequences"]`):
        `sum`: Σ_t m·ℓ_t over the completion; `n_tokens`: completion tokens;
        `ld_sum` (if `ld_alpha`): LD-DPO `Σ_{k_t≤ℓ_s} ℓ_t + α·Σ_{k_t>ℓ_s} ℓ_t`, ℓ_s = `batch["pair_min_lengths"]`
        (token weights from `losses.preference.ld_token_weights`);
        `wpo` (if `wpo`): no-grad WPO weight `exp(mean_t (ℓ_t − log Σ_v p_v²))` (`wpo_sequence_weights`).
    Gradients flow through `sum` and `ld_sum` when the caller has grad enabled. The batch's tensors are moved to
    the model's device.
    """
    batch = to_device(batch, next(model.parameters()).device)
    out = model_token_logps(
        model,
        batch["input_ids"],
        batch["labels"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        temperature=temperature,
        token_chunk=token_chunk,
        extras=("log_sum_sq_probs",) if wpo else (),
        **(batch.get("vision_inputs") or {}),
    )
    n = int(batch["n_sequences"])
    dev = out["logps"].device
    m = out["mask"]
    seq = torch.where(m, batch["sequence_ids"].to(dev), -1)
    res = {"sum": segment_sum(out["logps"], seq, n), "n_tokens": segment_sum(m.float(), seq, n)}
    if ld_alpha is not None:
        shared = batch["pair_min_lengths"].to(dev)[seq.clamp_min(0)]
        w = ld_token_weights(batch["token_rank"].to(dev), shared, ld_alpha)
        res["ld_sum"] = segment_sum(out["logps"] * w, seq, n)
    if wpo:
        with torch.no_grad():
            aligned = segment_sum(out["logps"].detach() - out["log_sum_sq_probs"].detach(), seq, n)
            res["wpo"] = wpo_sequence_weights(aligned, res["n_tokens"])
    return res


@dataclass(frozen=True)
class SequenceScorer:
    """No-grad per-sequence reference values of a batch (the sum, or the LD-DPO sum); part of the cache key."""

    temperature: float = 1.0
    token_chunk: int = DEFAULT_TOKEN_CHUNK
    ld_alpha: float | None = None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
        r = batch_sequence_logps(
            model, batch, temperature=self.temperature, token_chunk=self.token_chunk, ld_alpha=self.ld_alpha
        )
        return r["ld_sum"] if self.ld_alpha is not None else r["sum"]

    def key_settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "ld_alpha": self.ld_alpha}


# ----------------------------------------------------------------------------------------------------------
# Completion-aligned log-probs of prompt + completion token lists (online RL)
# ----------------------------------------------------------------------------------------------------------


def completion_mask(lengths: Sequence[int]) -> Tensor:
    """``[N, L_max]`` bool, True on each row's first ``length`` slots."""
    L = max(lengths, default=0)
    return torch.arange(L).unsqueeze(0) < torch.tensor(list(lengths)).unsqueeze(1)


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on for ``model``."""
    # transformers >= 5.2x renamed is_gradient_checkpointing (now deprecated) to is_activation_checkpointing
    new, old = "is_activation_checkpointing", "is_gradient_checkpointing"
    return bool(getattr(model, new if hasattr(model, new) else old, False))


def _prompt_completion_rows(
    prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int
) -> dict[str, Tensor]:
    rows = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in zip(prompt_ids, completion_ids)]
    b = pad_collate(rows, pad_token_id=pad_id)
    return {k: b[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    *,
    temperature: float = 1.0,
    shared_prefix: bool = True,
    pad_id: int = 0,
    extras: tuple[str, ...] = (),
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    keep_logits_mb: float = 0.0,
    images: Sequence[Sequence[Any] | None] | None = None,
    vision: Any = None,
) -> dict[str, Tensor]:
    """Log-probs (and ``extras``) of ``n`` completions at ``temperature``, completion-aligned.

    With ``shared_prefix``, each run of consecutive rows with the same prompt (a GRPO group, or the part of
    one in this micro-batch) runs its prompt once (:func:`shared_prefix_token_logps`); otherwise, and under
    activation checkpointing (which leaves the KV cache empty), rows are padded prompt + completion sequences
    (:func:`model_token_logps`). Returns ``{"logps": [n, L], ..., "mask": [n, L]}`` with ``L`` the longest
    completion; slot t is completion token t.

    ``images`` (each row's prompt images) and ``vision`` (an :class:`alignkit.vision.VisionProcessor`): a
    vision-language model's rows; a shared prompt's images then run through the vision encoder once. Families
    that lay out their own positions (Qwen2-VL) score padded rows.
    """
    cm = completion_mask([len(c) for c in completion_ids])
    dev = next(model.parameters()).device
    # keep_logits_mb only acts where a backward follows (chunked_token_logps checks grad mode itself)
    kw = {"temperature": temperature, "extras": extras, "token_chunk": token_chunk, "keep_logits_mb": keep_logits_mb}
    # FSDP2 over several ranks: every forward gathers shards with the others, so each rank must run as many; runs of
    # equal prompts depend on the data, the padded rows are one forward
    in_step = distributed.is_fsdp(model) and distributed.world_size() > 1
    with_images = images is not None and any(images)
    own_positions = with_images and vision.family.own_positions
    if not shared_prefix or is_checkpointing(model) or in_step or own_positions:
        b = _prompt_completion_rows(prompt_ids, completion_ids, pad_id)
        if with_images:
            b.update(vision.row_inputs(images, b["input_ids"]))
            if own_positions:
                b.pop("position_ids")
        b = to_device(b, dev)
        res = model_token_logps(model, labels=b.pop("labels"), **b, **kw)
        cm = cm.to(dev)
        out = {k: torch.zeros(cm.shape, dtype=v.dtype, device=dev).masked_scatter(cm, v[res["mask"]])
               for k, v in res.items() if k != "mask"}  # fmt: skip
        return {**out, "mask": cm}
    parts: list[dict[str, Tensor]] = []
    i, n, L = 0, len(prompt_ids), cm.shape[1]
    while i < n:
        j = i + 1
        while j < n and prompt_ids[j] == prompt_ids[i] and (images is None or images[j] == images[i]):
            j += 1
        width = max(len(c) for c in completion_ids[i:j])
        comp = torch.tensor([list(c) + [pad_id] * (width - len(c)) for c in completion_ids[i:j]])
        prompt = torch.tensor(prompt_ids[i])
        pin = vision.row_inputs([images[i]], prompt[None]) if with_images and images[i] else None
        res = shared_prefix_token_logps(model, prompt, comp, cm[i:j, :width], prompt_inputs=pin, **kw)
        parts.append({k: torch.nn.functional.pad(v, (0, L - width)) for k, v in res.items()})
        i = j
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def frozen_completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    images: Sequence[Sequence[Any] | None] | None = None,
    *,
    micro_batch_size: int,
    **kw: Any,
) -> Tensor:
    """No-grad, eval-mode :func:`completion_logps` in micro-batches: ``[N, L_max]`` fp32 on the CPU (the RL
    loop's old-policy and reference log-probs of a round). ``images``: each row's prompt images (a
    vision-language round; ``kw`` then holds ``vision``). ``kw`` go to :func:`completion_logps`."""
    with eval_mode(model):
        cm = completion_mask([len(c) for c in completion_ids])
        out = torch.zeros(cm.shape)
        for i in range(0, len(completion_ids), micro_batch_size):
            sl = slice(i, i + micro_batch_size)
            rows_images = None if images is None else images[sl]
            lp = completion_logps(model, prompt_ids[sl], completion_ids[sl], images=rows_images, **kw)["logps"]
            out[sl, : lp.shape[1]] = lp.float().cpu()
    return out
