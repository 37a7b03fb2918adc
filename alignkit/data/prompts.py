"""Prompt rows for online RL: rows -> token ids (with the chat format's generation prompt), and the seeded order
in which a run visits them."""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.data.rows import RowError, Verbatim, check_messages, count_image_parts, row_images
from alignkit.data.tokenize import expand_images, resolve_format, tokenizer_switches
from alignkit.templates import TemplateError

__all__ = ["Prompt", "Prompts", "load_prompts", "round_prompts"]


@dataclass
class Prompt:
    prompt: Any  # as given in the row (str or messages): what reward functions receive
    ids: list[int]
    columns: dict[str, Any]  # the row's other fields (e.g. `answer`), passed to reward functions
    images: list[Any] | None = None  # a vision-language prompt's images (as the row gave them), one per image part


class Prompts(list):
    """`load_prompts`' list of `Prompt`, with the rows whose prompt was cut to ``max_prompt_length``."""

    truncated_rows: list[int]
    max_prompt_length: int | None

    def __init__(self, items: Sequence[Prompt], truncated_rows: Sequence[int], max_prompt_length: int | None) -> None:
        super().__init__(items)
        self.truncated_rows, self.max_prompt_length = list(truncated_rows), max_prompt_length

    def report(self) -> str:
        """One line on the cut prompts ("" when none was cut)."""
        if not self.truncated_rows:
            return ""
        k, rows = self.max_prompt_length, self.truncated_rows
        first = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        return (
            f"{len(rows)} of {len(self)} prompts longer than max_prompt_length={k} keep their last {k} tokens "
            f"(rows {first})"
        )


def _prompt_of(row: Any, i: int) -> tuple[str, Any, Any]:
    """(field, prompt as given, messages to render or the string) of row ``i``; errors name the row's field."""
    if not isinstance(row, Mapping):
        raise RowError(i, None, "a dict (one object per row)", type(row))
    if row.get("prompt") is not None:
        field, prompt = "prompt", row["prompt"]
    elif row.get("messages") is not None:
        field, prompt = "messages", row["messages"]
    else:
        raise RowError(i, "prompt", "a `prompt` (string or list of messages) or a `messages` list", "missing")
    if isinstance(prompt, str):
        if not prompt:
            raise RowError(i, field, "a non-empty string or list of {role, content} messages", prompt)
        return field, prompt, prompt
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
        raise RowError(i, field, "a non-empty string or list of {role, content} messages", prompt)
    # user and assistant alternate from a user turn: a prompt of only an assistant message is refused here
    full = check_messages(prompt, i, field, alternate=True)
    msgs = full
    if field == "messages":  # a conversation: its trailing assistant turns are the reference answer, not prompt
        n = len(full)
        while n and full[n - 1]["role"] == "assistant":
            n -= 1
        prompt, msgs = list(prompt[:n]), full[:n]
    if not any(m["role"] == "user" for m in msgs):
        roles = Verbatim(f"roles {[m['role'] for m in full]}")
        raise RowError(i, field, "a conversation with a user message to answer", roles)
    return field, prompt, msgs


def load_prompts(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    chat_format: str | None = None,
    max_prompt_length: int | None = None,
    name: str | None = None,
    verbose: bool = True,
    vision: Any = None,
    switches: Mapping[str, Any] | None = None,
) -> Prompts:
    """Rows -> token ids. Message prompts go through the chat format (``chat_format``, or detected from the
    tokenizer) with the generation prompt appended; plain string prompts are used as they are. A `messages`
    row loses its trailing assistant turns. Bad rows raise `RowError` naming the row and the field.

    With ``vision`` (an :class:`alignkit.vision.VisionProcessor`), rows with images (TRL's ``images`` column): each
    image placeholder expands into the model's image tokens and the prompt keeps its ``images``.

    Prompts over ``max_prompt_length`` tokens keep their last ones; they are counted in the returned
    `Prompts`' ``truncated_rows`` and, with ``verbose``, reported in one printed line (``[alignkit NAME]``); a cut
    through an image's tokens raises RowError. ``switches``: chat format switches over the tokenizer's (e.g. the
    ``tools`` a tool rollout shows)."""
    from alignkit.data.images import decode_image

    fmt = None
    texts, prompts, columns, fields, images = [], [], [], [], []
    for i, row in enumerate(rows):
        field, prompt, content = _prompt_of(row, i)
        col, values = row_images(row)
        parts = 0 if isinstance(content, str) else count_image_parts(content)
        if parts != len(values):
            want = f"{parts} image(s), one per image part of the messages"
            raise RowError(i, col or "images", want, Verbatim(f"{len(values)} image(s)"))
        if values and vision is None:
            want = "no images: this is a text model (vision-language rows need a model with a vision encoder)"
            raise RowError(i, col or "images", want, Verbatim(f"{len(values)} image(s)"))
        if isinstance(content, str):
            text = content
        else:
            fmt = fmt or resolve_format(tokenizer, chat_format)
            try:
                sw = {**tokenizer_switches(tokenizer, fmt), **(switches or {})}
                r = fmt.render(content, add_generation_prompt=True, **sw)
            except TemplateError as e:
                raise RowError(i, field, f"a conversation chat format {fmt.name!r} accepts ({e})") from e
            text = r.text
            if values:
                names = [f"{col}[{k}]" if col == "images" else str(col) for k in range(len(values))]
                decoded = [decode_image(v, i, f) for v, f in zip(values, names)]
                text = expand_images(r, vision.expansions(decoded), [])[0]
        texts.append(text)
        prompts.append(prompt)
        fields.append(field)
        images.append((col, list(values)) if values else None)
        columns.append({k: v for k, v in row.items() if k not in ("prompt", "messages", "completion")})
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, cut = [], []
    for i, (p, ids, cols) in enumerate(zip(prompts, enc, columns)):
        if not ids:
            raise RowError(i, fields[i], "a prompt that tokenizes to at least one token", p)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if images[i] is not None and vision.family.image_count(ids[:-max_prompt_length], vision.token_ids):
                want = f"at most max_prompt_length={max_prompt_length} tokens without cutting an image's tokens"
                raise RowError(i, images[i][0], want, Verbatim(f"{len(ids)} tokens, an image among those cut"))
            ids = ids[-max_prompt_length:]
            cut.append(i)
        out.append(Prompt(p, list(ids), cols, images[i][1] if images[i] is not None else None))
    result = Prompts(out, cut, max_prompt_length)
    if verbose and cut:
        print(f"[alignkit{'' if name is None else ' ' + name}] {result.report()}")
    return result


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def round_prompts(n_rows: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """Prompt indices of a round: the rows in shuffled epochs, fixed by the seed (resume = recompute)."""
    start = round_idx * per_round
    return [_epoch_order(n_rows, seed, p // n_rows)[p % n_rows] for p in range(start, start + per_round)]
