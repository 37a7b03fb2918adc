"""Conversation -> input_ids + labels, rendered once and tokenized once, exactly as inference sees it.

The chat format renders the whole conversation to text plus labelled character spans; the tokenizer
encodes that text in one call (never piecewise concatenation, which breaks merges at turn boundaries);
token offsets map the trainable character spans onto tokens. A token is trained on when its characters
overlap a trainable span.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignkit.data.rows import RowError, Sample, Verbatim, normalize_row
from alignkit.logprobs import IGNORE_INDEX
from alignkit.templates import ChatFormat, Rendered, TemplateError, detect, get_format

TRAIN_ON = ("assistant", "last", "completion", "all")
TRUNCATION = ("right", "left", "error")


def resolve_format(tokenizer: Any, chat_format: str | ChatFormat | None) -> ChatFormat:
    """A format by name, or detected from the tokenizer's own template (generic path when none matches)."""
    if chat_format is not None:
        return get_format(chat_format)
    fmt = detect(tokenizer)
    if fmt is not None:
        return fmt
    from alignkit.templates.detection import GenericFormat

    return GenericFormat(tokenizer)


def tokenizer_switches(tokenizer: Any, fmt: ChatFormat, switches: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """bos/eos as the official template would see them (the tokenizer's own), then explicit overrides."""
    sw: dict[str, Any] = {}
    for key in ("bos_token", "eos_token"):
        if key in fmt.switches and getattr(tokenizer, key, None) is not None:
            sw[key] = getattr(tokenizer, key)
    sw.update(switches or {})
    return sw


def _trainable_ranges(r: Rendered, train_on: str, completion_start: int | None) -> list[tuple[int, int]]:
    """Character ranges [start, end) to train on, in order."""
    if train_on == "all":
        return [(0, len(r.text))]
    spans = r.trainable_spans()
    if train_on == "last":
        last = max((s.message_index for s in spans), default=None)
        spans = [s for s in spans if s.message_index == last]
    elif train_on == "completion":
        if completion_start is None:
            raise ValueError("train_on='completion' needs prompt/completion rows")
        spans = [s for s in spans if s.message_index is not None and s.message_index >= completion_start]
    return [(s.start, s.end) for s in spans]


def _labels_by_offsets(ids: list[int], offsets: list[tuple[int, int]], ranges: list[tuple[int, int]], n: int):
    """General path: a token is trained iff its characters overlap a trainable range."""
    mask = np.zeros(n + 1, dtype=np.int32)
    for a, b in ranges:
        mask[a:b] = 1
    cum = np.concatenate([[0], np.cumsum(mask[:n])])  # trainable characters before i
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    lo = off[:, 0]
    hi = np.minimum(np.maximum(off[:, 1], lo + 1), n)  # zero-width tokens count by the character they sit on
    lo = np.minimum(lo, hi)
    return np.where(cum[hi] - cum[lo] > 0, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def _labels(ids: list[int], encoding: Any, ranges: list[tuple[int, int]], n: int) -> list[int]:
    """Fast path: the first and last token of each range via char_to_token, then one slice copy per range.
    Falls back to offsets when a boundary character belongs to no token (e.g. normalised-away spaces)."""
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in ranges:
        if b <= a:
            continue
        first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if first is None or last is None:
            return _labels_by_offsets(ids, encoding.offsets, ranges, n)
        labels[first : last + 1] = ids[first : last + 1]
    return labels


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    num_trained_tokens: int = -1

    def __post_init__(self) -> None:
        if self.num_trained_tokens < 0:
            self.num_trained_tokens = len(self.labels) - self.labels.count(IGNORE_INDEX)

    def as_dict(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "labels": self.labels, "num_trained_tokens": self.num_trained_tokens}


def _truncate(ids: list[int], labels: list[int], max_length: int | None, truncation: str, index: int | None):
    if max_length is None or len(ids) <= max_length:
        return ids, labels, False
    if truncation == "right":
        return ids[:max_length], labels[:max_length], True
    if truncation == "left":
        return ids[-max_length:], labels[-max_length:], True
    want = f"at most max_length={max_length} tokens (truncation='error')"
    raise RowError(index, None, want, Verbatim(f"{len(ids)} tokens"))


def _render_sample(sample: Sample, fmt: ChatFormat, sw: dict[str, Any], add_generation_prompt: bool) -> Rendered:
    if sample.tools is not None and "tools" in fmt.switches:
        sw = {**sw, "tools": sample.tools}
    return fmt.render(sample.messages, add_generation_prompt=add_generation_prompt, **sw)


def _plain_text(sample: Sample, tokenizer: Any, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """Plain rows: `text` (all trained) or plain `prompt` + `completion` (+ eos, completion trained)."""
    eos = tokenizer.eos_token or ""
    if sample.prompt is None:
        text = sample.text + eos
        return text, [(0, len(text))]
    text = sample.prompt + sample.text + eos
    return text, [(0 if train_on == "all" else len(sample.prompt), len(text))]


def encode_samples(
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    chat_format: ChatFormat,
    switches: Mapping[str, Any],
    train_on: str = "assistant",
    max_length: int | None = None,
    truncation: str = "right",
    add_generation_prompt: bool = False,
    indices: Sequence[int] | None = None,
) -> list[Encoded]:
    """Render each sample, tokenize all texts in ONE batched tokenizer call, map spans to labels."""
    _check_options(train_on, truncation)
    with_images = next((k for k, s in enumerate(samples) if s.images), None)
    if with_images is not None:
        idx = indices[with_images] if indices is not None else with_images
        raise RowError(idx, samples[with_images].image_field or "images",
                       "no images: this is a text model's tokenizer (vision-language rows need a model with a vision "
                       "encoder, tokenized by alignkit.data.tokenize.tokenize_vision_rows)",
                       Verbatim(f"{len(samples[with_images].images or [])} image(s)"))  # fmt: skip
    texts, ranges = [], []
    for k, s in enumerate(samples):
        idx = indices[k] if indices is not None else None
        if s.messages is None:
            text, rng = _plain_text(s, tokenizer, train_on)
        else:
            r = _render_row(s, chat_format, switches, add_generation_prompt, idx)
            text, rng = r.text, _trainable_ranges(r, train_on, s.completion_start)
        texts.append(text)
        ranges.append(rng)
    out = []
    for k, (ids, labels) in enumerate(_tokenize_texts(tokenizer, texts, ranges)):
        idx = indices[k] if indices is not None else None
        ids, labels, cut = _truncate(ids, labels, max_length, truncation, idx)
        out.append(Encoded(ids, labels, cut))
    return out


def _check_options(train_on: str, truncation: str) -> None:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; expected one of {TRAIN_ON}")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATION}")


def _render_row(
    sample: Sample, fmt: ChatFormat, switches: Mapping[str, Any], add_generation_prompt: bool, index: int | None
) -> Rendered:
    """The sample rendered by ``fmt``; a conversation the format refuses is a RowError naming the row's field."""
    try:
        return _render_sample(sample, fmt, dict(switches), add_generation_prompt)
    except TemplateError as e:
        raise RowError(index, sample.source_field, f"a conversation chat format {fmt.name!r} accepts ({e})") from e


def _tokenize_texts(
    tokenizer: Any, texts: list[str], ranges: list[list[tuple[int, int]]]
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each text, all in ONE batched tokenizer call; labels from the trainable ranges."""
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=not fast)
    out = []
    for k, ids in enumerate(enc["input_ids"]):
        if fast:
            labels = _labels(ids, enc.encodings[k], ranges[k], len(texts[k]))
        else:
            labels = _labels_by_offsets(ids, enc["offset_mapping"][k], ranges[k], len(texts[k]))
        out.append((list(ids), labels))
    return out


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    chat_format: str | ChatFormat | None = None,
    train_on: str = "assistant",
    max_length: int | None = None,
    truncation: str = "right",
    add_generation_prompt: bool = False,
    switches: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize one conversation (a list of messages, or any accepted row dict).

    Returns {"input_ids": list[int], "labels": list[int] (-100 where not trained), "num_trained_tokens": int,
    "truncated": bool}. `train_on`: "assistant" (every assistant turn), "last" (last assistant turn),
    "completion" (completion messages of prompt/completion rows), "all".
    """
    row = messages if isinstance(messages, Mapping) else {"messages": messages}
    sample = normalize_row(row)
    fmt = resolve_format(tokenizer, chat_format)
    (e,) = encode_samples(
        tokenizer,
        [sample],
        chat_format=fmt,
        switches=tokenizer_switches(tokenizer, fmt, switches),
        train_on=train_on,
        max_length=max_length,
        truncation=truncation,
        add_generation_prompt=add_generation_prompt,
    )
    return {**e.as_dict(), "truncated": e.truncated}


def expand_images(
    r: Rendered, expansions: Sequence[str], ranges: list[tuple[int, int]]
) -> tuple[str, list[tuple[int, int]]]:
    """The render with image span k replaced by ``expansions[k]``, and the trainable ranges moved with it (an
    image's tokens are never trained, even with ``train_on="all"``)."""
    pieces, moved, pos, k = [], [], 0, 0
    for s in r.spans:
        text = expansions[k] if s.image else r.text[s.start : s.end]
        k += s.image
        if not s.image:  # the part of each trainable range inside this span, in the new coordinates
            moved += [
                (pos + max(a, s.start) - s.start, pos + min(b, s.end) - s.start)
                for a, b in ranges
                if a < s.end and b > s.start
            ]
        pieces.append(text)
        pos += len(text)
    return "".join(pieces), moved


@dataclass
class VisionEncoded(Encoded):
    """An encoded vision-language row: its images (as the row gave them: decoded again when batched)."""

    images: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "images": self.images}


def encode_vision_samples(
    vision: Any,
    samples: Sequence[Sample],
    *,
    chat_format: ChatFormat,
    switches: Mapping[str, Any],
    train_on: str = "assistant",
    max_length: int | None = None,
    truncation: str = "right",
    add_generation_prompt: bool = False,
    indices: Sequence[int] | None = None,
) -> list[VisionEncoded]:
    """:func:`encode_samples` for vision-language rows: each image placeholder the chat format rendered is
    expanded into the model's image tokens (``vision``: an :class:`alignkit.vision.VisionProcessor`) before the one
    tokenizer call. Image tokens are never trained. Truncation that would cut through an image raises RowError."""
    from alignkit.data.images import sample_images

    _check_options(train_on, truncation)
    if not chat_format.multimodal and any(s.images for s in samples):
        raise ValueError(
            f"chat format {chat_format.name!r} is text-only; vision-language rows need a multimodal format "
            "(e.g. llava-1.5, qwen2.5-vl, smolvlm; `alignkit.templates.list_formats()`)"
        )
    texts, ranges, image_lists = [], [], []
    for k, s in enumerate(samples):
        idx = indices[k] if indices is not None else None
        if s.messages is None:
            raise RowError(idx, s.source_field, "a conversation (messages) for a vision-language model")
        r = _render_row(s, chat_format, switches, add_generation_prompt, idx)
        images = sample_images(s, idx)
        if len(r.image_spans()) != len(images):
            want = f"every image rendered once by chat format {chat_format.name!r}"
            got = Verbatim(f"{len(images)} images, {len(r.image_spans())} rendered")
            raise RowError(idx, s.image_field or "images", want, got)
        text, rng = expand_images(r, vision.expansions(images), _trainable_ranges(r, train_on, s.completion_start))
        texts.append(text)
        ranges.append(rng)
        image_lists.append(list(s.images or []))
    out = []
    for k, (ids, labels) in enumerate(_tokenize_texts(vision.tokenizer, texts, ranges)):
        idx = indices[k] if indices is not None else None
        want = texts[k].count(vision.family.image_token)
        if vision.family.image_count(ids, vision.token_ids) != want:
            raise ValueError(
                f"the tokenizer does not encode {vision.family.image_token!r} as one token ({want} expected, "
                f"{vision.family.image_count(ids, vision.token_ids)} found): add it as a special token"
            )
        n = len(ids)
        ids, labels, cut = _truncate(ids, labels, max_length, truncation, idx)
        if cut and vision.family.image_count(ids, vision.token_ids) != want:
            field_name = samples[k].image_field or "images"
            exp = f"at most max_length={max_length} tokens without cutting an image's tokens"
            raise RowError(idx, field_name, exp, Verbatim(f"{n} tokens, an image among those cut"))
        out.append(VisionEncoded(ids, labels, cut, images=image_lists[k]))
    return out


def tokenize_vision_rows(
    vision: Any, rows: Sequence[Mapping[str, Any]], **kwargs: Any
) -> tuple[list[dict[str, Any]], TokenizeReport]:
    """:func:`tokenize_rows` of vision-language rows (a list or ``datasets.Dataset``) with ``vision``'s tokenizer;
    each example keeps its ``images`` (decoded again when batched: pixel tensors are not held in memory)."""
    return tokenize_rows(vision.tokenizer, rows if isinstance(rows, list) else list(rows), vision=vision, **kwargs)


@dataclass
class TokenizeReport:
    rows: int = 0
    truncated: int = 0
    dropped_no_trainable: int = 0
    dropped_indices: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.rows} rows tokenized, {self.truncated} truncated, "
            f"{self.dropped_no_trainable} dropped with zero trainable tokens"
            + (f" (first: {self.dropped_indices[:10]})" if self.dropped_indices else "")
        )


def tokenize_rows(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    chat_format: str | ChatFormat | None = None,
    train_on: str = "assistant",
    max_length: int | None = None,
    truncation: str = "right",
    switches: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    start_index: int = 0,
    vision: Any = None,
) -> tuple[list[dict[str, Any]], TokenizeReport]:
    """Tokenize many rows; rows left with no trainable token are dropped and counted, never trained on. With
    ``vision`` (an :class:`alignkit.vision.VisionProcessor` around ``tokenizer``), rows with images
    (:func:`encode_vision_samples`)."""
    fmt = resolve_format(tokenizer, chat_format)
    sw = tokenizer_switches(tokenizer, fmt, switches)
    report = TokenizeReport()
    out: list[dict[str, Any]] = []
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="tokenize", unit="batch")
    for b in starts:
        chunk = rows[b : b + batch_size]
        idx = list(range(start_index + b, start_index + b + len(chunk)))
        samples = [normalize_row(r, i) for r, i in zip(chunk, idx)]
        kw = dict(chat_format=fmt, switches=sw, train_on=train_on, max_length=max_length, truncation=truncation,
                  indices=idx)  # fmt: skip
        encs: Sequence[Encoded] = (
            encode_vision_samples(vision, samples, **kw)
            if vision is not None
            else encode_samples(tokenizer, samples, **kw)
        )
        for i, e in zip(idx, encs):
            report.rows += 1
            report.truncated += e.truncated
            if e.num_trained_tokens == 0:
                report.dropped_no_trainable += 1
                report.dropped_indices.append(i)
                continue
            out.append(e.as_dict())
    return out, report


def tokenize_batch_fn(tokenizer: Any, **kwargs: Any) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """A function for `datasets.Dataset.map(fn, batched=True, with_indices=True, remove_columns=...)`.

    Rows with zero trainable tokens come out with `num_trained_tokens == 0`; filter them and count them
    (`tokenize_dataset` does both).
    """
    fmt = resolve_format(tokenizer, kwargs.pop("chat_format", None))
    sw = tokenizer_switches(tokenizer, fmt, kwargs.pop("switches", None))

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        keys = list(batch)
        rows = [{k: batch[k][j] for k in keys} for j in range(len(indices))]
        samples = [normalize_row(r, i) for r, i in zip(rows, indices)]
        encs = encode_samples(tokenizer, samples, chat_format=fmt, switches=sw, indices=indices, **kwargs)
        return {
            "input_ids": [e.input_ids for e in encs],
            "labels": [e.labels for e in encs],
            "num_trained_tokens": [e.num_trained_tokens for e in encs],
            "truncated": [e.truncated for e in encs],
        }

    return fn


def tokenize_dataset(dataset: Any, tokenizer: Any, *, num_proc: int | None = None, **kwargs: Any):  # noqa: ANN201
    """Tokenize a `datasets.Dataset` with `map` (batched; several processes for large sets), drop and report
    rows with zero trainable tokens. Returns (dataset with input_ids/labels/num_trained_tokens, report)."""
    fn = tokenize_batch_fn(tokenizer, **kwargs)
    if num_proc is None:  # process start-up costs more than it saves below ~20k rows
        import os

        num_proc = min(os.cpu_count() or 1, 4) if len(dataset) >= 20_000 else None
    ds = dataset.map(
        fn, batched=True, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="tokenize"
    )
    report = TokenizeReport(rows=len(ds), truncated=int(sum(ds["truncated"])))
    counts = ds["num_trained_tokens"]
    report.dropped_indices = [i for i, n in enumerate(counts) if n == 0]
    report.dropped_no_trainable = len(report.dropped_indices)
    if report.dropped_indices:
        ds = ds.filter(lambda n: n > 0, input_columns="num_trained_tokens")
    return ds.remove_columns("truncated"), report
