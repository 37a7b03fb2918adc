"""Batching: padded batches, best-fit-decreasing packing, and padding-free packed batches.

Packed batches are one row holding several documents back to back. What keeps documents apart:

* ``position_ids`` restart at 0 for every document (RoPE sees each document as if alone);
* attention never crosses a document boundary. In transformers >= 4.5x ``create_causal_mask`` detects packing
  from ``position_ids`` (a step that is not +1 starts a new document) and builds a block-diagonal causal mask
  for sdpa, eager and flex, *but only when* ``attention_mask is None`` *and there is no KV cache*. Llama-style
  models create a cache whenever ``use_cache`` is true, which is the config default even in training mode,
  so :func:`packed_forward_kwargs` always passes ``use_cache=False``. Flash-attention (varlen) takes
  ``cu_seq_lens_*`` / ``max_length_*`` directly.
* the first token of every document has label ``-100``, so the shifted next-token loss never predicts a
  document's first token from the previous document.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import masking_utils

from alignkit.logprobs import IGNORE_INDEX

_SPECIAL_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


def _as_list(values: Any) -> list[Any]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _per_token_keys(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    """Extra keys whose value has one entry per token in every example (same length as input_ids)."""
    keys = []
    for key in examples[0]:
        if key in _SPECIAL_KEYS:
            continue
        values = [ex[key] for ex in examples]
        if all(
            isinstance(v, (list, tuple, torch.Tensor)) and len(v) == len(ex["input_ids"])
            for v, ex in zip(values, examples)
        ):
            keys.append(key)
    return keys


def _per_example_value(values: list[Any]) -> torch.Tensor | list[Any]:
    """Numbers become a [B] tensor; anything else stays a list."""
    if all(isinstance(v, (bool, int, float)) for v in values):
        return torch.tensor(values)
    return values


def _labels_of(example: Mapping[str, Any]) -> list[int]:
    # No labels means plain language modelling on every token.
    labels = _as_list(example.get("labels", example["input_ids"]))
    if len(labels) != len(example["input_ids"]):
        raise ValueError(f"labels has length {len(labels)} but input_ids has length {len(example['input_ids'])}")
    return labels


def pad_collate(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
    label_pad: int = IGNORE_INDEX,
    pad_values: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Pad examples into a [B, T] batch.

    Args:
        examples: dicts with ``input_ids`` (list of int) and ``labels`` (same length; defaults to a copy of
            ``input_ids``). Any other key whose value has the same length as ``input_ids`` is padded too (with
            ``pad_values[key]``, default 0); number-valued keys become a [B] tensor; other keys stay lists.
        pad_to_multiple_of: round T up to a multiple of this (tensor-core friendly shapes).
        padding_side: "right" (training) or "left" (generation: the last column is every row's last token).

    Returns:
        ``input_ids`` [B, T] long, ``labels`` [B, T] long (``label_pad`` on pads), ``attention_mask`` [B, T]
        long (1 = real token), ``position_ids`` [B, T] long (0.. per row from the first real token, 0 on pads),
        plus the extra keys.
    """
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    extra = _per_token_keys(examples)
    fill = {"input_ids": pad_token_id, "labels": label_pad, "attention_mask": 0, "position_ids": 0}
    fill.update({key: (pad_values or {}).get(key, 0) for key in extra})
    rows: dict[str, list[list[Any]]] = {key: [] for key in fill}
    for ex, n in zip(examples, lengths):
        values = {
            "input_ids": _as_list(ex["input_ids"]),
            "labels": _labels_of(ex),
            "attention_mask": [1] * n,
            "position_ids": list(range(n)),
            **{key: _as_list(ex[key]) for key in extra},
        }
        pad = width - n
        for key, seq in values.items():
            padding = [fill[key]] * pad
            rows[key].append(seq + padding if padding_side == "right" else padding + seq)

    batch: dict[str, Any] = {key: torch.tensor(rows[key], dtype=torch.long) for key in _SPECIAL_KEYS}
    for key in extra:
        batch[key] = torch.tensor(rows[key])
    for key in examples[0]:
        if key not in batch:
            batch[key] = _per_example_value([ex[key] for ex in examples])
    return batch


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity, best-fit decreasing.

    Longest first; each example goes to the bin it fills most tightly (ties: the oldest bin), else a new bin.
    Deterministic: ties in length keep index order. Bins are listed in creation order; within a bin, indices
    are in placement order (longest first).

    An example longer than ``capacity`` (or of length < 1) raises ``ValueError`` naming its index: truncation
    changes the data, so it is the caller's decision (truncate the example, then pack).

    Cost: O(n log n) comparisons; list inserts are O(open bins) memmoves, negligible below millions of bins.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"example {i} has length {n}; packing needs non-empty examples")
        if n > capacity:
            raise ValueError(f"example {i} has length {n} > capacity {capacity}; truncate it before packing")

    bins: list[list[int]] = []
    # Open bins sorted by (remaining space, bin index): the first entry with room >= n is the best fit.
    open_bins: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(open_bins, (n, -1))
        if k == len(open_bins):
            bins.append([i])
            space, b = capacity - n, len(bins) - 1
        else:
            space, b = open_bins.pop(k)
            bins[b].append(i)
            space -= n
        if space > 0:  # full bins leave the search list for good
            bisect.insort(open_bins, (space, b))
    return bins


def pack_collate(examples: Sequence[Mapping[str, Any]], *, capacity: int | None = None) -> dict[str, Any]:
    """Concatenate examples into one padding-free row of D documents and T = sum of lengths tokens.

    Args:
        examples: as for :func:`pad_collate` (``labels`` default to ``input_ids``; extra per-token keys are
            concatenated, number-valued keys become a [D] tensor, other keys stay lists). No example may be empty.
        capacity: if given, T > capacity raises ``ValueError`` (choose the examples with
            :func:`pack_best_fit_decreasing`). The row is never padded.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``, ``document_ids``: [1, T] long. ``labels`` has ``-100`` at
        each document's first token; ``position_ids`` restart at 0 per document; ``document_ids`` is 0..D-1.
        ``seq_lens``: [D] long. ``cu_seqlens``: [D+1] int32 (0, then cumulative lengths), the flash-attention
        varlen layout. ``max_seqlen``: python int. No ``attention_mask`` on purpose (see module docstring).
    """
    if not examples:
        raise ValueError("pack_collate needs at least one example")
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"example {i} is empty; packed documents must have at least one token")
    total = sum(lengths)
    if capacity is not None and total > capacity:
        raise ValueError(f"{len(examples)} examples hold {total} tokens > capacity {capacity}")

    extra = _per_token_keys(examples)
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    doc_ids: list[int] = []
    extra_rows: dict[str, list[Any]] = {key: [] for key in extra}
    for d, (ex, n) in enumerate(zip(examples, lengths)):
        input_ids += _as_list(ex["input_ids"])
        labels += [IGNORE_INDEX, *_labels_of(ex)[1:]]
        positions += range(n)
        doc_ids += [d] * n
        for key in extra:
            extra_rows[key] += _as_list(ex[key])

    seq_lens = torch.tensor(lengths, dtype=torch.long)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "document_ids": torch.tensor([doc_ids], dtype=torch.long),
        "seq_lens": seq_lens,
        "cu_seqlens": torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32),
        "max_seqlen": max(lengths),
    }
    for key in extra:
        batch[key] = torch.tensor([extra_rows[key]])
    for key in examples[0]:
        if key not in batch and key not in _SPECIAL_KEYS:
            batch[key] = _per_example_value([ex[key] for ex in examples])
    return batch


def pack_rows(
    examples: Sequence[Mapping[str, Any]],
    *,
    capacity: int,
    pad_token_id: int,
    bins: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Pack examples into R rows of at most `capacity` tokens (best-fit decreasing), stacked as [R, L].

    Each row is a :func:`pack_collate` row; rows shorter than the longest are filled with one padding
    "document" (its own restarting positions, labels -100), so no real token attends to it and no loss
    sees it. Use this on sdpa/eager: attention is dense over a row, so cost grows as R·L², and bounded
    rows are far cheaper than one [1, ΣL] row. With flash-attention varlen, one row (:func:`pack_collate`)
    is best.

    ``bins`` (the examples of each row, in order) defaults to :func:`pack_best_fit_decreasing`; pass it to know
    the order of the documents (a vision-language batch lists its images in that order).

    Returns ``input_ids``, ``labels``, ``position_ids``, ``document_ids`` [R, L] and ``n_rows``.
    """
    if bins is None:
        bins = pack_best_fit_decreasing([len(e["input_ids"]) for e in examples], capacity)
    rows = [pack_collate([examples[i] for i in b]) for b in bins]
    width = max(r["input_ids"].shape[1] for r in rows)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "labels", "position_ids", "document_ids")}
    for r in rows:
        pad = width - r["input_ids"].shape[1]
        fill = {
            "input_ids": torch.full((1, pad), pad_token_id),
            "labels": torch.full((1, pad), IGNORE_INDEX),
            "position_ids": torch.arange(pad)[None],
            "document_ids": torch.full((1, pad), int(r["document_ids"].max()) + 1),
        }
        for k in out:
            out[k].append(torch.cat([r[k], fill[k]], dim=1))
    batch: dict[str, Any] = {k: torch.cat(v) for k, v in out.items()}
    batch["n_rows"] = len(rows)
    return batch


def block_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """4D mask letting token q see token k iff k <= q and both are in the same document.

    Args:
        document_ids: [B, T] document index per token (non-decreasing along T).
        dtype: None -> bool mask (True = attend; what sdpa takes); a float dtype -> additive mask with 0 and
            ``finfo(dtype).min`` (what eager attention adds to its scores).

    Returns:
        [B, 1, T, T]. Memory is O(T^2): fine for CPU tests and moderate T; use flash varlen for long rows.
    """
    t = document_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    mask = (same_doc & causal)[:, None]
    if dtype is None:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


# transformers versions that infer document boundaries from position_ids (attention_mask None, no cache).
_HF_DETECTS_PACKING = hasattr(masking_utils, "find_packed_sequence_indices")


def packed_forward_kwargs(
    batch: Mapping[str, Any],
    attn_implementation: str,
    *,
    explicit_mask: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)`` on a :func:`pack_collate` batch, per attention implementation.

    * flash (``"flash_attention_2"``, ``"flash_attention_3"``, kernels hub names containing "flash"):
      ``cu_seq_lens_q/k`` and ``max_length_q/k`` from the batch, so the varlen kernel runs without
      re-deriving them from ``position_ids`` (which costs a device sync per layer).
    * ``"sdpa"``, ``"eager"``, ``"flex_attention"``: ``position_ids`` and no ``attention_mask``; transformers
      builds the block-diagonal causal mask. With ``explicit_mask=True`` (or a transformers without packing
      detection) a 4D :func:`block_causal_mask` is passed instead (``dtype`` = the model's compute dtype,
      needed for eager's additive mask; flex is not supported this way).

    Always ``use_cache=False``: a KV cache disables the packing detection (and is useless in training).
    Labels are not included: compute the loss from the logits and ``batch["labels"]``.
    """
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    if "flash" in attn_implementation:
        cu = batch["cu_seqlens"].to(device=batch["input_ids"].device, dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"])
        kwargs["max_length_k"] = batch["max_seqlen"]
        return kwargs
    if attn_implementation not in ("sdpa", "eager", "flex_attention"):
        raise ValueError(f"no packing recipe for attn_implementation={attn_implementation!r}")
    if explicit_mask or not _HF_DETECTS_PACKING:
        if attn_implementation == "flex_attention":
            raise ValueError("explicit 4D masks are not supported for flex_attention; rely on position_ids")
        mask_dtype = None if attn_implementation == "sdpa" else dtype
        kwargs["attention_mask"] = block_causal_mask(batch["document_ids"], dtype=mask_dtype)
    return kwargs
