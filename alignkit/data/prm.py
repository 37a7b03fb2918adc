"""Process-reward data: stepwise rows, solution text <-> steps, and tokenization with step labels.

A stepwise row (TRL's PRM format):

    {"prompt": str | [messages], "completions": [step_1, ..., step_K], "labels": [bool | 0/1 | probability, ...]}

Token layout of one example (docs/LOSSES.md §6, TRL placement):

    [bos] prompt, step_1 + sep, step_2 + sep, ..., step_K + sep

Step k's label sits on the last token of `step_k + sep`; every other position, the prompt included, is -100.
Unlike SFT (render once, tokenize once) each piece is tokenized on its own: the separator is then always the
same tokens, so every label has a fixed, decodable position, and scoring (`alignkit.prm.score_steps`) builds
exactly the layout training saw. A plain string prompt gets the tokenizer's BOS like TRL; a conversational
prompt is rendered by its chat format with the generation prompt (the template brings its own BOS).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.data.rows import RowError, check_messages
from alignkit.data.tokenize import resolve_format, tokenizer_switches
from alignkit.logprobs import IGNORE_INDEX
from alignkit.templates import TemplateError

MATH_SHEPHERD_MARKER = "ки"
STEP_HEADER = r"Step\s*\d+\s*:"

# --------------------------------------------------------------------------------------------------------------------
# Solution text <-> steps
# --------------------------------------------------------------------------------------------------------------------


def prm_labels(
    step_token_counts: Sequence[int],
    sep_len: int,
    prompt_len: int,
    step_labels: Sequence[int | bool],
    train_on_last_step_only: bool = False,
    max_len: int | None = None,
) -> Tensor:
    """Token labels of one PRM example laid out as `prompt, step_1 + sep, ..., step_K + sep` (TRL placement).

    The label of step k sits on the last token of step k + its separator; every other position, the prompt included,
    is −100. The logit is read at that same position (no shift). Truncation to `max_len` drops the labels of steps
    whose separator was cut. For soft labels, call with any 0/1 labels and write q at `labels != -100`.

    Args:
        step_token_counts: `[K]` token counts of the steps (without separator).
        sep_len: tokens in the separator appended to each step.
        prompt_len: tokens before the first step.
        step_labels: `[K]` 0/1 correctness labels.
        train_on_last_step_only: keep only the last step's label (training only).
        max_len: optional truncation length of the whole sequence.

    Returns:
        `[L]` long tensor, `L = prompt_len + Σ(count + sep_len)`, truncated to `max_len`.
    """
    if len(step_token_counts) != len(step_labels):
        raise ValueError(f"{len(step_token_counts)} steps but {len(step_labels)} labels")
    if sep_len < 0 or prompt_len < 0 or (max_len is not None and max_len < 0):
        raise ValueError("sep_len, prompt_len and max_len must be >= 0")
    if any(c < 0 or c + sep_len < 1 for c in step_token_counts):
        raise ValueError("every step plus its separator must span at least one token")
    if any(int(v) not in (0, 1) for v in step_labels):
        raise ValueError(f"step labels must be 0/1, got {list(step_labels)}")
    ends = torch.tensor([c + sep_len for c in step_token_counts], dtype=torch.long).cumsum(0) + prompt_len - 1
    values = torch.tensor([int(v) for v in step_labels], dtype=torch.long)
    if train_on_last_step_only:
        ends, values = ends[-1:], values[-1:]
    length = prompt_len + sum(c + sep_len for c in step_token_counts)
    if max_len is not None:
        length = min(length, max_len)
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    kept = ends < length
    labels[ends[kept]] = values[kept]
    return labels


def _clean(pieces: Sequence[str]) -> list[str]:
    return [p.strip() for p in pieces if p.strip()]


def _split_separator(sp: StepSplitter, text: str) -> list[str]:
    return _clean(text.split(sp.separator))


def _join_separator(sp: StepSplitter, steps: Sequence[str]) -> str:
    return sp.separator.join(steps)


def _split_paragraphs(sp: StepSplitter, text: str) -> list[str]:
    return _clean(re.split(r"\n[ \t]*\n", text))


def _join_paragraphs(sp: StepSplitter, steps: Sequence[str]) -> str:
    return "\n\n".join(steps)


def _split_headers(sp: StepSplitter, text: str) -> list[str]:
    # A header starts a step only at the start of the text or after whitespace ("x Step 2:" yes, "xStep 2:" no).
    # Text before the first header is kept as a step of its own so that nothing is lost.
    starts = [m.start() for m in re.finditer(rf"(?<!\S){sp.header}", text)]
    bounds = [0, *starts, len(text)]
    return _clean([text[a:b] for a, b in zip(bounds, bounds[1:])])


def _join_headers(sp: StepSplitter, steps: Sequence[str]) -> str:
    return "\n".join(steps)


def _split_marker(sp: StepSplitter, text: str) -> list[str]:
    # Each step ends with the marker (Math-Shepherd's "ки"); unmarked trailing text is a step too.
    return _clean(text.split(sp.marker))


def _join_marker(sp: StepSplitter, steps: Sequence[str]) -> str:
    return "\n".join(f"{s} {sp.marker}" for s in steps)


STEP_SPLITS: dict[str, tuple[Callable[[Any, str], list[str]], Callable[[Any, Sequence[str]], str]]] = {
    "separator": (_split_separator, _join_separator),
    "paragraphs": (_split_paragraphs, _join_paragraphs),
    "headers": (_split_headers, _join_headers),
    "marker": (_split_marker, _join_marker),
}
"""Ways to cut a solution text into steps: name -> (split, join)."""


@dataclass(frozen=True)
class StepSplitter:
    """Splits a solution text into steps and joins steps back.

    `how`:
      * `separator`: pieces between occurrences of `separator` (default one newline);
      * `paragraphs`: pieces between blank lines; joined with one blank line;
      * `headers`: a step starts at each `header` match ("Step 1:", "Step 2:" ...) and keeps its header;
        text before the first header is a step of its own; joined with newlines;
      * `marker`: each step ends with `marker` (Math-Shepherd's "ки"); joined as "step ки" lines.

    Steps are stripped and empty pieces dropped. Round trips: `split(join(steps)) == steps` for stripped,
    non-empty steps that do not contain the delimiter; `join(split(text)) == text` for text already in that
    canonical form.
    """

    how: str = "separator"
    separator: str = "\n"
    marker: str = MATH_SHEPHERD_MARKER
    header: str = STEP_HEADER

    def __post_init__(self) -> None:
        if self.how not in STEP_SPLITS:
            raise ValueError(f"unknown step split {self.how!r}; expected one of {list(STEP_SPLITS)}")
        if self.how == "separator" and not self.separator:
            raise ValueError("how='separator' needs a non-empty separator")
        if self.how == "marker" and not self.marker:
            raise ValueError("how='marker' needs a non-empty marker")

    def split(self, text: str) -> list[str]:
        """`text` -> `[step, ...]` (possibly empty)."""
        return STEP_SPLITS[self.how][0](self, text)

    def join(self, steps: Sequence[str]) -> str:
        """`[step, ...]` -> text in this splitter's canonical form."""
        return STEP_SPLITS[self.how][1](self, steps)

    __call__ = split


def as_splitter(splitter: str | StepSplitter | Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    """A splitter name ("paragraphs"), a `StepSplitter`, or any `text -> [step]` function, as a function."""
    if isinstance(splitter, str):
        return StepSplitter(splitter)
    if not callable(splitter):
        raise TypeError(f"step_splitter must be a name, a StepSplitter or a callable, got {type(splitter).__name__}")
    return splitter


def split_steps(text: str, how: str = "separator", **kwargs: Any) -> list[str]:
    """`StepSplitter(how, **kwargs).split(text)`."""
    return StepSplitter(how, **kwargs).split(text)


def join_steps(steps: Sequence[str], how: str = "separator", **kwargs: Any) -> str:
    """`StepSplitter(how, **kwargs).join(steps)`."""
    return StepSplitter(how, **kwargs).join(steps)


def parse_math_shepherd(
    text: str,
    label_text: str | None = None,
    *,
    marker: str = MATH_SHEPHERD_MARKER,
    header: str = STEP_HEADER,
    positive: str = "+",
    negative: str = "-",
) -> dict[str, Any]:
    """A Math-Shepherd record -> stepwise row.

    `text` is "question Step 1: ... ки\\nStep 2: ... ки"; `label_text` is the same text with "+" or "-" in place
    of each marker. The prompt is the text before the first header; the steps keep their headers. Without
    `label_text` the row has no "labels".
    """
    m = re.search(rf"(?<!\S){header}", text)
    if m is None:
        raise ValueError(f"no step header matching {header!r} in {text[:80]!r}")
    prompt, rest = text[: m.start()], text[m.start() :]
    steps = StepSplitter("marker", marker=marker).split(rest)
    row: dict[str, Any] = {"prompt": prompt.strip(), "completions": steps}
    if label_text is None:
        return row
    if not label_text.startswith(prompt):
        raise ValueError("label_text does not start with the same question as text")
    # Walk both texts: they agree except that each marker became a one-character tag.
    tagged, pos, labels = label_text[len(prompt) :], 0, []
    segments = rest.split(marker)
    for seg in segments[:-1]:
        if tagged[pos : pos + len(seg)] != seg:
            raise ValueError(f"label_text differs from text near {seg[:40]!r}")
        tag = tagged[pos + len(seg) : pos + len(seg) + 1]
        if tag not in (positive, negative):
            raise ValueError(f"expected {positive!r} or {negative!r} in place of the marker, got {tag!r}")
        labels.append(tag == positive)
        pos += len(seg) + 1
    if tagged[pos:] != segments[-1]:
        raise ValueError("label_text differs from text after the last marker")
    if segments[-1].strip():
        raise ValueError("text has an unmarked final step, which has no label")
    row["labels"] = labels
    return row


# --------------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StepRow:
    """A validated stepwise row. `labels[k]` is the probability that step k is correct (1.0/0.0 for bools)."""

    prompt: str | list[dict[str, Any]]
    steps: list[str]
    labels: list[float] | None


def _label_value(v: Any, index: int | None, k: int) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0:
        return float(v)
    raise RowError(index, f"labels[{k}]", "a bool, 0/1 or a probability in [0, 1]", v)


def normalize_prm_row(row: Mapping[str, Any], index: int | None = None, *, require_labels: bool = True) -> StepRow:
    """Validate `{"prompt", "completions", "labels"}`; errors name the row, the field and the expectation."""
    if not isinstance(row, Mapping):
        raise RowError(index, None, "a dict (one object per row)", type(row))
    for key in ("prompt", "completions", *(("labels",) if require_labels else ())):
        if key not in row or row[key] is None:
            raise RowError(index, key, "present (stepwise rows are {prompt, completions: [step], labels: [bool]})")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        prompt = check_messages(prompt, index, "prompt", alternate=False)
    steps = row["completions"]
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise RowError(index, "completions", "a list of step strings (cut a solution with split_steps)", type(steps))
    for k, s in enumerate(steps):
        if not isinstance(s, str):
            raise RowError(index, f"completions[{k}]", "a string", type(s))
    labels = None
    if row.get("labels") is not None:
        raw = row["labels"]
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise RowError(index, "labels", "a list with one label per step", type(raw))
        if len(raw) != len(steps):
            raise RowError(index, "labels", f"{len(steps)} labels (one per step)", f"{len(raw)} labels")
        labels = [_label_value(v, index, k) for k, v in enumerate(raw)]
    return StepRow(prompt=prompt, steps=list(steps), labels=labels)


# --------------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StepLayout:
    """Token layout of one example: `input_ids = prompt_ids + Σ(step_ids[k] + sep_ids)` before truncation."""

    prompt_ids: list[int]
    step_ids: list[list[int]]
    sep_ids: list[int]
    prompt_truncated: bool = False  # the prompt lost its first tokens to max_prompt_length

    @property
    def counts(self) -> list[int]:
        return [len(s) for s in self.step_ids]

    def label_ends(self) -> list[int]:
        """Position of every step's label token (last token of step + separator), before truncation."""
        ends, pos = [], len(self.prompt_ids) - 1
        for s in self.step_ids:
            pos += len(s) + len(self.sep_ids)
            ends.append(pos)
        return ends

    def input_ids(self) -> list[int]:
        out = list(self.prompt_ids)
        for s in self.step_ids:
            out += s + self.sep_ids
        return out


def _prompt_texts(
    tokenizer: Any, prompts: Sequence[Any], chat_format: Any, start_index: int = 0
) -> tuple[list[str], list[bool]]:
    """Prompt strings to tokenize, and whether each was rendered by a chat format (which brings its own BOS)."""
    fmt = sw = None
    texts, rendered = [], []
    for k, p in enumerate(prompts):
        if isinstance(p, str):
            texts.append(p)
            rendered.append(False)
            continue
        if fmt is None:
            fmt = resolve_format(tokenizer, chat_format)
            sw = tokenizer_switches(tokenizer, fmt)
        try:
            texts.append(fmt.render(p, add_generation_prompt=True, **sw).text)
        except TemplateError as e:
            raise RowError(start_index + k, "prompt", f"a conversation chat format {fmt.name!r} accepts ({e})") from e
        rendered.append(True)
    return texts, rendered


def step_layouts(
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, Any]]],
    step_lists: Sequence[Sequence[str]],
    *,
    step_separator: str = "\n",
    max_prompt_length: int | None = None,
    chat_format: Any = None,
    add_bos: bool | None = None,
    start_index: int = 0,
) -> list[StepLayout]:
    """Tokenize prompts and steps (one batched tokenizer call) into `StepLayout`s.

    `add_bos=None` prepends the tokenizer's BOS to plain string prompts (TRL) and not to rendered chat prompts.
    `max_prompt_length` keeps the prompt's last tokens (after the BOS, which is kept). `start_index` is the
    first prompt's row number, for errors.
    """
    if len(prompts) != len(step_lists):
        raise ValueError(f"{len(prompts)} prompts but {len(step_lists)} step lists")
    texts, rendered = _prompt_texts(tokenizer, prompts, chat_format, start_index)
    flat = [s for steps in step_lists for s in steps]
    enc = tokenizer([*texts, *flat, step_separator], add_special_tokens=False)["input_ids"]
    sep_ids = list(enc[-1])
    bos = getattr(tokenizer, "bos_token_id", None)
    out, j = [], len(texts)
    for i, steps in enumerate(step_lists):
        head = [bos] if bos is not None and (add_bos if add_bos is not None else not rendered[i]) else []
        prompt_ids = list(enc[i])
        cut = False
        if max_prompt_length is not None:
            keep = max(max_prompt_length - len(head), 0)
            cut = len(prompt_ids) > keep
            prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep else []
        out.append(StepLayout(head + prompt_ids, [list(e) for e in enc[j : j + len(steps)]], sep_ids, cut))
        j += len(steps)
    return out


def label_positions(layout: StepLayout, max_length: int | None = None) -> list[int]:
    """Positions of the steps' label tokens that survive truncation to `max_length`, in step order."""
    return [e for e in layout.label_ends() if max_length is None or e < max_length]


@dataclass
class PRMTokenizeReport:
    rows: int = 0
    steps: int = 0
    rows_truncated: int = 0
    steps_dropped: int = 0  # steps whose label token was cut by max_length
    rows_dropped: int = 0  # rows left with no labelled step
    dropped_indices: list[int] = field(default_factory=list)
    prompts_truncated: int = 0  # prompts cut to their last max_prompt_length tokens

    def __str__(self) -> str:
        return (
            f"{self.rows} rows / {self.steps} steps tokenized, {self.rows_truncated} rows truncated "
            f"({self.steps_dropped} steps lost their label), {self.rows_dropped} rows dropped with no labelled step"
            + (f" (first: {self.dropped_indices[:10]})" if self.dropped_indices else "")
            + (f"; {self.prompts_truncated} prompts cut to max_prompt_length" if self.prompts_truncated else "")
        )


def _encode_one(
    layout: StepLayout, labels: list[float], soft: bool, max_length: int | None, last_only: bool
) -> tuple[dict[str, Any], int]:
    hard = [int(q > 0.5) for q in labels]
    lab = prm_labels(
        layout.counts, len(layout.sep_ids), len(layout.prompt_ids), hard, train_on_last_step_only=last_only
    )
    ids = layout.input_ids()
    full = len(ids)
    if max_length is not None and full > max_length:
        lab = lab[:max_length]
    kept = (lab != IGNORE_INDEX).nonzero().flatten().tolist()
    # Causal attention and no shift: tokens after the last kept label change no labelled logit, so drop them.
    end = kept[-1] + 1 if kept else 0
    example: dict[str, Any] = {"input_ids": ids[:end], "labels": lab[:end].tolist()}
    if soft:
        q = [0.0] * end
        # Labelled positions hold the steps in order; with last_only the only one is the last step.
        values = labels[-len(kept) :] if last_only else labels[: len(kept)]
        for p, v in zip(kept, values):
            q[p] = v
        example["soft_labels"] = q
    example["num_steps"] = len(kept)
    example["num_steps_dropped"] = len(labels) - len(label_positions(layout, max_length))
    return example, full


def tokenize_prm_rows(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    step_separator: str = "\n",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    train_on_last_step_only: bool = False,
    chat_format: Any = None,
    add_bos: bool | None = None,
    soft_labels: bool | None = None,
    batch_size: int = 512,
    start_index: int = 0,
) -> tuple[list[dict[str, Any]], PRMTokenizeReport]:
    """Stepwise rows -> examples `{input_ids, labels, [soft_labels], num_steps, num_steps_dropped}`.

    `labels` holds 0/1 (label > 0.5) at each step's label token and -100 elsewhere. `soft_labels=None` adds the
    float `soft_labels` key to every example when any label in `rows` is not exactly 0 or 1. Truncation to
    `max_length` cuts from the right; steps whose label token is cut are counted, rows left with no labelled
    step are dropped and counted (never trained on). The sequence ends at its last label token.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    parsed = [normalize_prm_row(r, start_index + i) for i, r in enumerate(rows)]
    soft = soft_labels if soft_labels is not None else any(q not in (0.0, 1.0) for r in parsed for q in r.labels)
    if not step_separator:
        empty = [(i, k) for i, r in enumerate(parsed) for k, s in enumerate(r.steps) if not s]
        if empty:
            i, k = empty[0]
            raise RowError(start_index + i, f"completions[{k}]", "a non-empty step when step_separator is ''", "")
    report = PRMTokenizeReport()
    out: list[dict[str, Any]] = []
    for b in range(0, len(parsed), batch_size):
        chunk = parsed[b : b + batch_size]
        layouts = step_layouts(
            tokenizer,
            [r.prompt for r in chunk],
            [r.steps for r in chunk],
            step_separator=step_separator,
            max_prompt_length=max_prompt_length,
            chat_format=chat_format,
            add_bos=add_bos,
            start_index=start_index + b,
        )
        for i, (r, lay) in enumerate(zip(chunk, layouts)):
            report.prompts_truncated += lay.prompt_truncated
            ex, full = _encode_one(lay, r.labels, soft, max_length, train_on_last_step_only)
            report.rows += 1
            report.steps += len(r.steps)
            report.rows_truncated += max_length is not None and full > max_length
            report.steps_dropped += ex["num_steps_dropped"]
            if ex["num_steps"] == 0:
                report.rows_dropped += 1
                report.dropped_indices.append(start_index + b + i)
                continue
            out.append(ex)
    return out, report


def tokenize_prm_row(tokenizer: Any, row: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    """One stepwise row -> example (see `tokenize_prm_rows`); `num_steps == 0` when truncation left no label."""
    parsed = normalize_prm_row(row)
    soft = kwargs.pop("soft_labels", None)
    soft = soft if soft is not None else any(q not in (0.0, 1.0) for q in parsed.labels)
    max_length = kwargs.pop("max_length", None)
    last_only = kwargs.pop("train_on_last_step_only", False)
    (lay,) = step_layouts(tokenizer, [parsed.prompt], [parsed.steps], **kwargs)
    return _encode_one(lay, parsed.labels, soft, max_length, last_only)[0]
