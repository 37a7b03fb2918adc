"""Preference rows -> tokens, and batches for one concatenated chosen+rejected forward.

Accepted rows (TRL's field names):

    {"prompt": p, "chosen": c, "rejected": r}          explicit prompt
    {"chosen": c, "rejected": r}                       implicit prompt: the longest common prefix is the prompt
    {"prompt": p, "completion": c, "label": bool}      unpaired (KTO/BCO); paired rows are unpaired automatically

`p`, `c`, `r` are all plain strings or all lists of `{"role", "content"}` messages. Each (prompt, completion) is
rendered once by the chat format and tokenized once (`encode_samples` with `train_on="completion"`), so the
tokens are exactly what inference sees. Bad rows raise `RowError` naming the row, the field and the expectation.

Tokenized examples are plain dicts with a dense `id` (position in the returned list): pairs hold
`chosen_input_ids/labels` and `rejected_input_ids/labels`; unpaired examples hold `input_ids/labels`, `desirable`
and optionally `kl_input_ids/kl_labels` (the example's prompt with another prompt's completion, for KTO's
reference point). Reference tables index sequences by id: pair k -> `2k` (chosen), `2k+1` (rejected); unpaired
example k of N -> `k` (its completion), `N+k` (its mismatched KL sequence). `pair_sequences` /
`unpaired_sequences` list the sequences in that order, and the collators put the ids in `global_ids`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.data.collate import pack_best_fit_decreasing, pack_rows, pad_collate
from alignkit.data.images import image_digest
from alignkit.data.rows import (
    RowError,
    Verbatim,
    check_messages,
    check_turns,
    count_image_parts,
    prompt_completion_sample,
    row_images,
)
from alignkit.data.tokenize import (
    IGNORE_INDEX,
    encode_samples,
    encode_vision_samples,
    resolve_format,
    tokenizer_switches,
)
from alignkit.ops import split_pairs

__all__ = [
    "PreferenceReport",
    "normalize_preference_row",
    "extract_prompt",
    "unpair_rows",
    "tokenize_pairs",
    "tokenize_unpaired",
    "collate_sequences",
    "collate_pairs",
    "collate_unpaired",
    "pair_sequences",
    "unpaired_sequences",
    "split_pairs",
]

Content = str | list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------
# Row normalisation
# ----------------------------------------------------------------------------------------------------------


def _kind(x: Any) -> str | None:
    """ "text" for a string, "chat" for a list of message dicts, None otherwise."""
    if isinstance(x, str):
        return "text"
    if isinstance(x, Sequence) and not isinstance(x, bytes) and all(isinstance(m, Mapping) for m in x):
        return "chat"
    return None


def extract_prompt(chosen: Content, rejected: Content, index: int | None = None) -> tuple[Content, Content, Content]:
    """Split two full conversations (or strings) into (shared prompt, chosen completion, rejected completion).

    The prompt is the longest common prefix, in messages for conversations and in characters for strings, cut
    so that both completions keep at least one message / character. As in TRL, a string prompt never ends in
    the space before the completions: that space moves into them ("... A: 4" / "... A: 5" -> "... A:", " 4", " 5").
    """
    if chosen == rejected:
        raise RowError(index, "chosen/rejected", "two different completions (they are identical)")
    n = min(len(chosen), len(rejected))
    k = 0
    while k < n and chosen[k] == rejected[k]:
        k += 1
    k = min(k, n - 1) if n > 0 else 0  # each completion keeps at least one message / character
    if isinstance(chosen, str) and k > 0 and chosen[k - 1] == " ":
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def _check_chat(fields: Mapping[str, Any], index: int | None, explicit: bool) -> dict[str, Any]:
    """Validate conversational fields by the names the row gives them, before any prompt is split off, so
    that an error names ``chosen[1].role``, never an internal completion. Returns cleaned copies."""
    out = {k: check_messages(v, index, k, alternate=not explicit) for k, v in fields.items()}
    if explicit:
        for k in ("chosen", "rejected"):
            check_turns([("prompt", out["prompt"]), (k, out[k])], index)
    return out


def normalize_preference_row(row: Mapping[str, Any], index: int | None = None) -> tuple[Content, Content, Content]:
    """A paired row -> (prompt, chosen, rejected), all strings or all message lists (implicit prompt extracted)."""
    if not isinstance(row, Mapping):
        raise RowError(index, None, "a dict (one object per row)", type(row))
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise RowError(index, key, "a string or a list of messages", "missing")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    fields = {"chosen": chosen, "rejected": rejected} | ({} if prompt is None else {"prompt": prompt})
    kinds = {k: _kind(v) for k, v in fields.items()}
    for k, kind in kinds.items():
        if kind is None:
            raise RowError(index, k, "a string or a list of {'role', 'content'} dicts", type(fields[k]))
    if len(set(kinds.values())) > 1:
        raise RowError(index, "/".join(fields), "all strings or all lists of messages (not mixed)", kinds)
    for k in ("chosen", "rejected"):
        if len(fields[k]) == 0:
            raise RowError(index, k, "a non-empty completion", fields[k])
    if kinds["chosen"] == "chat":
        fields = _check_chat(fields, index, explicit=prompt is not None)
    if prompt is None:
        return extract_prompt(fields["chosen"], fields["rejected"], index)
    return fields["prompt"], fields["chosen"], fields["rejected"]


def _is_label(x: Any) -> bool:
    # 0/1 and 0.0/1.0 too: a label column with a missing value reads back as floats
    return isinstance(x, bool) or (isinstance(x, (int, float)) and x in (0, 1))


def _unpaired_row(row: Mapping[str, Any], index: int | None) -> tuple[Content, Content, bool]:
    for key in ("prompt", "completion"):
        if key not in row or row[key] is None:
            raise RowError(index, key, "a string or a list of messages", "missing")
    label = row.get("label")
    if label is None:  # a file's null, and also its NaN: datasets reads both as None
        raise RowError(index, "label", "a bool (True = desirable) in every unpaired row", Verbatim("null or NaN"))
    if not _is_label(label):
        raise RowError(index, "label", "a bool (True = desirable)", label)
    p, c = row["prompt"], row["completion"]
    kp, kc = _kind(p), _kind(c)
    for key, kind in (("prompt", kp), ("completion", kc)):
        if kind is None:
            raise RowError(index, key, "a string or a list of {'role', 'content'} dicts", type(row[key]))
    if kp != kc:
        raise RowError(index, "prompt/completion", "both strings or both lists of messages", (type(p), type(c)))
    if len(c) == 0:
        raise RowError(index, "completion", "a non-empty completion", c)
    if kp == "chat":  # checked here, by the row's names: the encoder also pairs prompts with OTHER rows' completions
        p = check_messages(p, index, "prompt", alternate=False)
        c = check_messages(c, index, "completion", alternate=False)
        check_turns([("prompt", p), ("completion", c)], index)
    return p, c, bool(label)


def _is_unpaired(row: Any) -> bool:
    """A row with a label, or with no chosen but a `completion` / `label` field (a file's rows share columns): a
    missing label or completion is then named as such, not as a missing `chosen`."""
    if not isinstance(row, Mapping):
        return False
    return row.get("label") is not None or (row.get("chosen") is None and ("completion" in row or "label" in row))


def unpair_rows(rows: Sequence[Mapping[str, Any]], start_index: int = 0) -> list[dict[str, Any]]:
    """Rows -> unpaired `{"prompt", "completion", "label", "index"}` rows.

    Unpaired rows (with `label`) pass through; a paired row gives its chosen completion as desirable and its
    rejected completion as undesirable, in that order, both tagged with the source row's index.
    """
    out = []
    for k, row in enumerate(rows):
        i = start_index + k
        images = row_images(row)  # a vision-language row's (column, images): its prompt's, in each example
        if _is_unpaired(row):
            p, c, label = _unpaired_row(row, i)
            out.append({"prompt": p, "completion": c, "label": label, "index": i, "images": images})
        else:
            p, c, r = normalize_preference_row(row, i)
            out.append({"prompt": p, "completion": c, "label": True, "index": i, "images": images})
            out.append({"prompt": p, "completion": r, "label": False, "index": i, "images": images})
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceReport:
    """What tokenization did: rows read, examples kept, truncations per field, rows dropped (nothing to score)."""

    rows: int = 0
    examples: int = 0
    truncated: dict[str, int] = field(default_factory=dict)
    dropped_indices: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        cut = ", ".join(f"{k} {v}" for k, v in self.truncated.items()) or "none"
        drop = f"{len(self.dropped_indices)} dropped with an empty completion after truncation"
        first = f" (first: {self.dropped_indices[:10]})" if self.dropped_indices else ""
        return f"{self.rows} rows -> {self.examples} examples; truncated: {cut}; {drop}{first}"


class _Encoder:
    """Tokenizes (prompt, completion) pairs in batched tokenizer calls with one fixed format and settings; with
    ``vision`` (an :class:`alignkit.vision.VisionProcessor`), vision-language rows, their images expanded."""

    def __init__(
        self, tokenizer: Any, chat_format: Any, max_length: int | None, truncation: str, switches: Any,
        vision: Any = None,
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.fmt = resolve_format(tokenizer, chat_format)
        self.sw = tokenizer_switches(tokenizer, self.fmt, switches)
        self.max_length, self.truncation = max_length, truncation
        self.vision = vision

    def __call__(
        self, items: Sequence[tuple[Content, Content, int]], field: str = "completion",
        images: Sequence[tuple[str | None, list[Any]]] | None = None,
    ) -> list[tuple[list[int], list[int], bool]]:  # fmt: skip
        """(prompt, completion, row index) items -> (input_ids, labels, truncated); ``field`` is the row's name
        for the completion (``chosen``, ``rejected``), for errors; ``images``: each row's (column, images)."""
        samples = [prompt_completion_sample(p, c, i, fields=("prompt", field)) for p, c, i in items]
        for k, s in enumerate(samples):
            col, values = images[k] if images is not None else (None, [])
            parts = count_image_parts(s.messages or [])
            if parts != len(values):
                want = f"{parts} image(s), one per image part of the messages"
                raise RowError(items[k][2], col or "images", want, Verbatim(f"{len(values)} image(s)"))
            if values:
                s.images, s.image_field = list(values), col
        kw = dict(chat_format=self.fmt, switches=self.sw, train_on="completion", max_length=self.max_length,
                  truncation=self.truncation, indices=[i for _, _, i in items])  # fmt: skip
        if self.vision is not None:
            encs: Sequence[Any] = encode_vision_samples(self.vision, samples, **kw)
        else:
            encs = encode_samples(self.tokenizer, samples, **kw)
        out = []
        for e in encs:
            labels = list(e.labels)
            if labels:  # the first token has no context: it can never be scored, so it is never labelled
                labels[0] = IGNORE_INDEX
            out.append((list(e.input_ids), labels, e.truncated))
        return out


def _n_labelled(labels: Sequence[int]) -> int:
    return len(labels) - list(labels).count(IGNORE_INDEX)


def tokenize_pairs(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    chat_format: Any = None,
    max_length: int | None = None,
    truncation: str = "right",
    switches: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    start_index: int = 0,
    vision: Any = None,
) -> tuple[list[dict[str, Any]], PreferenceReport]:
    """Tokenize paired rows: each of prompt+chosen and prompt+rejected rendered once, tokenized once.
    With ``vision`` (an :class:`alignkit.vision.VisionProcessor`), rows with images (TRL's ``images`` column, the
    image parts in the prompt); each example then also holds its ``images`` and their ``image_digest``.

    `max_length` applies to each sequence (prompt + completion); `truncation` "right" cuts the end, "left" the
    start, "error" raises. A pair whose chosen or rejected completion is left with no token is dropped and
    reported. Returns (examples, report); each example is `{"id", "index", "chosen_input_ids", "chosen_labels",
    "rejected_input_ids", "rejected_labels"}` with labels -100 outside the completion.
    """
    enc = _Encoder(tokenizer, chat_format, max_length, truncation, switches, vision)
    report = PreferenceReport(truncated={"chosen": 0, "rejected": 0})
    out: list[dict[str, Any]] = []
    for b in range(0, len(rows), batch_size):
        idx = range(start_index + b, start_index + b + len(rows[b : b + batch_size]))
        triples = [normalize_preference_row(r, i) for r, i in zip(rows[b : b + batch_size], idx)]
        images = [row_images(r) for r in rows[b : b + batch_size]]
        chosen = enc([(p, c, i) for (p, c, _), i in zip(triples, idx)], "chosen", images)
        rejected = enc([(p, r, i) for (p, _, r), i in zip(triples, idx)], "rejected", images)
        for i, (ci, cl, ct), (ri, rl, rt), (_, imgs) in zip(idx, chosen, rejected, images):
            report.rows += 1
            report.truncated["chosen"] += ct
            report.truncated["rejected"] += rt
            if _n_labelled(cl) == 0 or _n_labelled(rl) == 0:
                report.dropped_indices.append(i)
                continue
            out.append(
                {
                    "id": len(out),
                    "index": i,
                    "chosen_input_ids": ci,
                    "chosen_labels": cl,
                    "rejected_input_ids": ri,
                    "rejected_labels": rl,
                    **({"images": imgs, "image_digest": image_digest(imgs)} if imgs else {}),
                }
            )
    report.examples = len(out)
    return out, report


def _prompt_key(prompt: Content) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _kl_partners(prompts: Sequence[Content]) -> list[int]:
    """Partner j of each example i: the next example (cyclically) whose prompt differs, else i+1.

    Paired data unpairs into adjacent chosen/rejected rows with one prompt, so a plain `i+1` rotation would
    often pair a prompt with its own other completion, which is not a mismatched sample. O(n): a backward scan
    over the list written twice finds the next differing prompt of every position.
    """
    n = len(prompts)
    keys = [_prompt_key(p) for p in prompts]
    nxt: list[int | None] = [None] * (2 * n)
    for k in range(2 * n - 2, -1, -1):
        nxt[k] = k + 1 if keys[(k + 1) % n] != keys[k % n] else nxt[k + 1]
    return [(nxt[i] if nxt[i] is not None else i + 1) % n for i in range(n)]


def tokenize_unpaired(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    chat_format: Any = None,
    max_length: int | None = None,
    truncation: str = "right",
    switches: Mapping[str, Any] | None = None,
    kl_completions: bool = True,
    batch_size: int = 256,
    vision: Any = None,
) -> tuple[list[dict[str, Any]], PreferenceReport]:
    """Tokenize unpaired rows (paired rows are unpaired first: chosen -> desirable, rejected -> undesirable).
    With ``vision``, rows with images (a KL sequence keeps its own prompt's images), as :func:`tokenize_pairs`.

    With `kl_completions`, each example also gets `kl_input_ids/kl_labels`: its own prompt followed by the
    completion of a partner example with a different prompt (see `_kl_partners`), rendered and tokenized like
    any row. These mismatched samples estimate KTO's reference point z0 (docs/LOSSES.md §5); a KL sequence left
    empty by truncation keeps `kl_labels` all -100 and is left out of z0.
    Returns (examples, report); each example is `{"id", "index", "input_ids", "labels", "desirable", ...}`.
    """
    flat = unpair_rows(rows)
    if kl_completions and len(flat) < 2:
        raise ValueError(f"KTO's reference point needs at least 2 examples (mismatched completions), got {len(flat)}")
    if kl_completions:  # a prompt is paired with other rows' completions: all rows must be of one kind
        first = _kind(flat[0]["prompt"])
        for u in flat:
            if _kind(u["prompt"]) != first:
                raise RowError(u["index"], "prompt", f"the same kind as the first row's ({first}) in one dataset")
    partners = _kl_partners([u["prompt"] for u in flat]) if kl_completions else []
    enc = _Encoder(tokenizer, chat_format, max_length, truncation, switches, vision)
    report = PreferenceReport(rows=len(rows), truncated={"completion": 0} | ({"kl": 0} if kl_completions else {}))
    out: list[dict[str, Any]] = []
    for b in range(0, len(flat), batch_size):
        chunk = list(range(b, min(b + batch_size, len(flat))))
        images = [flat[k]["images"] for k in chunk]
        main = enc([(flat[k]["prompt"], flat[k]["completion"], flat[k]["index"]) for k in chunk], images=images)
        kl = (
            enc([(flat[k]["prompt"], flat[partners[k]]["completion"], flat[k]["index"]) for k in chunk], images=images)
            if kl_completions
            else [None] * len(chunk)
        )
        for k, (ids, labels, cut), kl_enc in zip(chunk, main, kl):
            report.truncated["completion"] += cut
            if _n_labelled(labels) == 0:
                report.dropped_indices.append(flat[k]["index"])
                continue
            ex = {"id": len(out), "index": flat[k]["index"], "input_ids": ids, "labels": labels}
            ex["desirable"] = flat[k]["label"]
            if flat[k]["images"][1]:
                ex["images"] = flat[k]["images"][1]
                ex["image_digest"] = image_digest(ex["images"])
            if kl_enc is not None:
                ex["kl_input_ids"], ex["kl_labels"] = kl_enc[0], kl_enc[1]
                report.truncated["kl"] += kl_enc[2]
            out.append(ex)
    if kl_completions:
        for ex in out:
            ex["kl_id"] = len(out) + ex["id"]
    report.examples = len(out)
    return out, report


def _digest(example: Mapping[str, Any]) -> tuple[str, ...]:
    return (example["image_digest"],) if "image_digest" in example else ()


def pair_sequences(pairs: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Every (input_ids, labels) sequence of `tokenize_pairs` output in reference-table order (2k, 2k+1); a
    vision-language pair's sequences also carry its image digest (hashed into a cached reference's key)."""
    out = []
    for p in pairs:
        d = _digest(p)
        out += [(p["chosen_input_ids"], p["chosen_labels"], *d), (p["rejected_input_ids"], p["rejected_labels"], *d)]
    return out


def unpaired_sequences(examples: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Every sequence of `tokenize_unpaired` output in reference-table order: completions, then KL sequences (a
    vision-language example's with its image digest)."""
    out: list[tuple[Any, ...]] = [(e["input_ids"], e["labels"], *_digest(e)) for e in examples]
    if examples and "kl_input_ids" in examples[0]:
        out += [(e["kl_input_ids"], e["kl_labels"], *_digest(e)) for e in examples]
    return out


# ----------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------


def _token_rank(labels: torch.Tensor, sequence_ids: torch.Tensor, n: int) -> torch.Tensor:
    """1-based rank of each labelled token within its sequence (0 elsewhere); sequences are contiguous spans
    of the row-major flattened batch, so rank = running count − count before the sequence's first token."""
    m = ((labels != IGNORE_INDEX) & (sequence_ids >= 0)).reshape(-1).long()
    seq = sequence_ids.reshape(-1)
    run = m.cumsum(0)
    before = run - m
    start = torch.full((n,), torch.iinfo(torch.long).max, dtype=torch.long)
    valid = seq >= 0
    start = start.scatter_reduce(0, seq[valid], before[valid], reduce="amin")
    rank = torch.where(m.bool(), run - start[seq.clamp_min(0)], 0)
    return rank.view_as(labels)


def collate_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_token_id: int,
    packing: bool = False,
    capacity: int | None = None,
    global_ids: Sequence[int] | None = None,
    images: Sequence[Sequence[Any]] | None = None,
    vision: Any = None,
    image_repeat: int = 1,
) -> dict[str, Any]:
    """Batch n (input_ids, labels) sequences for one forward, padded or packed into bounded rows.

    With ``vision`` (an :class:`alignkit.vision.VisionProcessor`) and ``images`` (each sequence's images),
    ``vision_inputs`` holds the model's image inputs, the images in the order their sequences sit in the batch.
    ``image_repeat=r``: sequence ``k`` has the images of sequence ``k mod n/r`` (a DPO batch: chosen, then
    rejected); padded, each image is then encoded once (``vision_repeat``, :func:`alignkit.vision.encode_images_once`).

    Padded: `input_ids`, `labels`, `attention_mask`, `position_ids` are `[n, T]` (row k = sequence k).
    Packed (`packing=True`): `pack_rows` rows `[R, L]` of at most `capacity` tokens, documents kept apart by
    restarting `position_ids` and no `attention_mask` (see `alignkit.data.collate`).

    Always: `sequence_ids` `[R, L]` (which sequence each token belongs to, -1 for padding), `token_rank` `[R, L]`
    (1-based rank of each labelled token within its sequence, 0 elsewhere), `lengths` `[n]` (labelled tokens per
    sequence), `n_sequences`, `n_tokens` (real tokens), `global_ids` `[n]` (reference-table ids, default 0..n-1).
    """
    if not sequences:
        raise ValueError("collate_sequences needs at least one sequence")
    examples = [{"input_ids": list(ids), "labels": list(lab)} for ids, lab in sequences]
    for k, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["labels"]) or not ex["input_ids"]:
            raise ValueError(f"sequence {k}: input_ids and labels must be non-empty and of equal length")
        ex["labels"][0] = IGNORE_INDEX  # never scorable (no context); packed rows do this per document anyway
    n = len(examples)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    if packing:
        cap = capacity if capacity is not None else int(lengths.max())
        b = pack_rows(examples, capacity=cap, pad_token_id=pad_token_id)
        bins = pack_best_fit_decreasing(lengths.tolist(), cap)  # the same bins pack_rows built
        lut = torch.full((len(bins), max(map(len, bins)) + 1), -1, dtype=torch.long)
        for r, members in enumerate(bins):
            lut[r, : len(members)] = torch.tensor(members)
        doc = b["document_ids"].clamp(max=lut.shape[1] - 1)
        seq_ids = lut.gather(1, doc)
        batch = {k: b[k] for k in ("input_ids", "labels", "position_ids")}
        batch["attention_mask"] = None
        order = [i for members in bins for i in members]
    else:
        b = pad_collate(examples, pad_token_id=pad_token_id)
        batch = {k: b[k] for k in ("input_ids", "labels", "position_ids", "attention_mask")}
        seq_ids = torch.where(b["attention_mask"].bool(), torch.arange(n)[:, None], -1)
        order = list(range(n))
    if vision is not None:
        if packing:
            vision.require_packing()
        if vision.family.own_positions:
            batch["position_ids"] = None  # the model lays out its positions from the image grid
        once = image_repeat > 1 and not packing and n % image_repeat == 0
        order = order[: n // image_repeat] if once else order
        rows_images = [images[i] for i in order] if images else []
        batch["vision_inputs"] = vision.row_inputs(rows_images, batch["input_ids"])
        if once and any(rows_images):
            batch["vision_inputs"]["vision_repeat"] = image_repeat
    batch["sequence_ids"] = seq_ids
    batch["token_rank"] = _token_rank(batch["labels"], seq_ids, n)
    batch["lengths"] = torch.tensor([_n_labelled(e["labels"]) for e in examples])
    batch["n_sequences"] = n
    batch["n_tokens"] = int(lengths.sum())
    batch["global_ids"] = torch.arange(n) if global_ids is None else torch.as_tensor(list(global_ids))
    return batch


def collate_pairs(
    pairs: Sequence[Mapping[str, Any]], *, pad_token_id: int, packing: bool = False, capacity: int | None = None,
    vision: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """P tokenized pairs -> one batch of 2P sequences, chosen 0..P-1 then rejected 0..P-1 (so per-sequence
    results split with `split_pairs`). Adds `pair_min_lengths` `[2P]` (min(n_c, n_r) of each row's pair, for
    LD-DPO). With ``vision``, a pair's images serve both its sequences. See `collate_sequences` for the rest."""
    seqs = [(p["chosen_input_ids"], p["chosen_labels"]) for p in pairs]
    seqs += [(p["rejected_input_ids"], p["rejected_labels"]) for p in pairs]
    ids = [2 * p["id"] for p in pairs] + [2 * p["id"] + 1 for p in pairs]
    images = [p.get("images") or [] for p in pairs] * 2
    batch = collate_sequences(seqs, pad_token_id=pad_token_id, packing=packing, capacity=capacity, global_ids=ids,
                              images=images, vision=vision, image_repeat=2)  # fmt: skip
    n_c, n_r = split_pairs(batch["lengths"])
    batch["pair_min_lengths"] = torch.minimum(n_c, n_r).repeat(2)
    return batch


def collate_unpaired(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    kl: bool = False,
    packing: bool = False,
    capacity: int | None = None,
    vision: Any = None,
) -> dict[str, Any]:
    """N unpaired examples -> a batch of their completions (or, with `kl`, their mismatched KL sequences), plus
    `desirable` `bool[N]`. With ``vision``, each sequence with its example's images. See `collate_sequences`."""
    pre = "kl_" if kl else ""
    seqs = [(e[pre + "input_ids"], e[pre + "labels"]) for e in examples]
    ids = [e["kl_id"] if kl else e["id"] for e in examples]
    images = [e.get("images") or [] for e in examples]
    batch = collate_sequences(seqs, pad_token_id=pad_token_id, packing=packing, capacity=capacity, global_ids=ids,
                              images=images, vision=vision)  # fmt: skip
    batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
    return batch
