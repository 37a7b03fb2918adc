"""Row formats accepted everywhere (TRL's field names), normalised to one shape with clear errors.

Accepted rows:
    {"messages": [{"role", "content"}, ...]}                         conversational
    {"conversations": [{"from", "value"}, ...]}                       ShareGPT
    {"prompt": str, "completion": str}                                plain prompt / completion
    {"prompt": [messages], "completion": [messages]}                  conversational prompt / completion
    {"text": str}                                                     plain language modelling

Every row becomes a `Sample`: either `messages` (+ `completion_start`, the index of the first completion
message, for prompt/completion rows) or plain `prompt` / `text` strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}


class Verbatim(str):
    """A `got` description shown as it is, not quoted like the row's own string values (``got an empty file``)."""

    def __repr__(self) -> str:
        return str(self)


class RowError(ValueError):
    """A dataset row (or data file) that does not have the expected shape.

    The message names where (``file``, ``line`` and ``row``, whichever are known), the field as the user wrote
    it, the expectation and what was found: ``data.jsonl, line 3 (row 2), field 'chosen': expected a string;
    got 5``. ``field`` is None for errors about a whole row or file (invalid JSON, not UTF-8, empty file).
    Functions that see only rows raise without ``file``; whoever knows where the rows came from adds it with
    :meth:`located` (see ``alignkit.data.loading.track_sources``).
    """

    def __init__(
        self,
        index: int | None,
        field: str | None,
        expected: str,
        got: Any = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        self.index, self.field, self.expected, self.got = index, field, expected, got
        self.file, self.line = file, line
        super().__init__(self._message())

    def _message(self) -> str:
        where = [] if self.file is None else [str(self.file)]
        if self.line is not None:
            where.append(f"line {self.line}" + ("" if self.index is None else f" (row {self.index})"))
        elif self.index is not None:
            where.append(f"row {self.index}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        got = "" if self.got is None else f"; got {_short(self.got)}"
        return f"{', '.join(where) or 'row'}: expected {self.expected}{got}"

    def located(self, file: str, line: int | None = None) -> RowError:
        """This error naming the file (and line) its row came from; one that names a file already is returned."""
        if self.file is not None:
            return self
        return RowError(self.index, self.field, self.expected, self.got, file, line)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled across processes (datasets.map with num_proc): rebuild from the parts, not the message
        return (type(self), (self.index, self.field, self.expected, self.got, self.file, self.line))


def _short(x: Any, n: int = 80) -> str:
    s = repr(x) if not isinstance(x, type) else x.__name__
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass
class Sample:
    """A normalised row: `messages` for chat rows, or plain strings for `text` / plain prompt-completion rows."""

    messages: list[dict[str, Any]] | None = None
    completion_start: int | None = None  # first message index of the completion (prompt/completion rows)
    prompt: str | None = None  # plain prompt (with `text` holding the completion)
    text: str | None = None
    tools: list[dict] | None = None
    source_field: str = "messages"  # the row's field(s) the messages came from, for errors found when rendering
    images: list[Any] | None = None  # a vision-language row's images, one per image part (not yet decoded)
    image_field: str | None = None  # the row's column they came from (`images` or `image`), for errors


def check_messages(msgs: Any, index: int | None, field: str, *, alternate: bool = True) -> list[dict[str, Any]]:
    """Validate a list of `{"role", "content"}` messages (errors name ``field[j].role`` etc.); returns copies
    without None-valued keys. ``alternate`` also checks the turn order (see :func:`check_turns`)."""
    if not isinstance(msgs, Sequence) or isinstance(msgs, (str, bytes)):
        raise RowError(index, field, "a list of {'role', 'content'} dicts", type(msgs))
    if len(msgs) == 0:
        raise RowError(index, field, "a non-empty list of messages", msgs)
    out = []
    for j, m in enumerate(msgs):
        f = f"{field}[{j}]"
        if not isinstance(m, Mapping):
            raise RowError(index, f, "a dict with 'role' and 'content'", type(m))
        if "role" not in m:
            raise RowError(index, f + ".role", f"one of {ROLES}", "missing")
        if m["role"] not in ROLES:
            raise RowError(index, f + ".role", f"one of {ROLES}", m["role"])
        c = m.get("content")
        if c is None and not m.get("tool_calls"):
            raise RowError(index, f + ".content", "a string", "missing")
        if isinstance(c, (list, tuple)):
            c = check_parts(c, index, f + ".content")
        elif c is not None and not isinstance(c, str):
            raise RowError(index, f + ".content", "a string or a list of text/image parts", type(c))
        out.append({**{k: v for k, v in m.items() if v is not None}, **({"content": c} if c is not None else {})})
    if alternate:
        check_turns([(field, out)], index)
    return out


PART_TYPES = ("text", "image", "image_url")
IMAGE_COLUMNS = ("images", "image")  # TRL's image columns: a list of images, or one


def count_image_parts(messages: Sequence[Mapping[str, Any]]) -> int:
    """How many image parts (`{"type": "image"}` / OpenAI `image_url`) the messages hold."""
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for p in content if isinstance(p, Mapping) and p.get("type") in ("image", "image_url"))
    return n


def row_images(row: Mapping[str, Any]) -> tuple[str | None, list[Any]]:
    """(the row's image column, its images as a list): ``images`` (a list, or one value) or ``image``."""
    for col in IMAGE_COLUMNS:
        if col in row and row[col] is not None:
            value = row[col]
            many = isinstance(value, (list, tuple)) and not is_array(value)
            return col, list(value) if many else [value]
    return None, []


def is_array(value: Any) -> bool:
    """A numpy / torch array (one image as ``[H, W, C]``), not a list of images."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def check_parts(parts: Sequence[Any], index: int | None, field: str) -> list[dict[str, Any]]:
    """Multimodal content (TRL's convention): ``{"type": "text", "text": str}`` and ``{"type": "image"}`` parts
    (OpenAI ``image_url`` parts too). Parts are kept as given (a template may read their other keys)."""
    out = []
    for k, part in enumerate(parts):
        f = f"{field}[{k}]"
        if not isinstance(part, Mapping):
            raise RowError(index, f, "a dict like {'type': 'text', 'text': ...} or {'type': 'image'}", type(part))
        kind = part.get("type")
        if kind not in PART_TYPES:
            raise RowError(index, f + ".type", f"one of {PART_TYPES} (video and audio are not supported)", kind)
        if kind == "text" and not isinstance(part.get("text"), str):
            raise RowError(index, f + ".text", "a string", type(part.get("text")))
        out.append(dict(part))
    return out


def check_turns(parts: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], index: int | None) -> None:
    """The turn order of the conversation ``parts`` make in order (e.g. ``[("prompt", p), ("chosen", c)]``):
    user and assistant alternate, tool results follow an assistant turn, one system message leads.

    An error names the message by its own part (``chosen[0].role``), as the user wrote the row.
    """
    prev, pos = None, 0
    for field, msgs in parts:
        for j, m in enumerate(msgs):
            r, f = m["role"], f"{field}[{j}].role"
            if r == "system":
                if pos != 0:
                    raise RowError(index, f, "'system' only as the first message", r)
            elif r == "tool":
                if prev not in ("assistant", "tool"):
                    raise RowError(index, f, "'tool' only after an assistant message", r)
            elif r == prev:
                want = "assistant" if r == "user" else "user"
                raise RowError(index, f, f"{want!r} (user and assistant must alternate)", r)
            elif r == "assistant" and prev is None:
                raise RowError(index, f, "'user' before the first assistant message", r)
            if r != "system":
                prev = r
            pos += 1


def prompt_completion_sample(
    prompt: Any,
    completion: Any,
    index: int | None = None,
    *,
    fields: tuple[str, str] = ("prompt", "completion"),
    tools: list[dict] | None = None,
) -> Sample:
    """A (prompt, completion) pair -> `Sample`: both strings, or both lists of messages whose turns continue
    each other. ``fields`` are the row's names for the two (a preference row's completion is ``chosen`` or
    ``rejected``), so errors name what the user wrote."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return Sample(prompt=prompt, text=completion)
    for f, x in zip(fields, (prompt, completion)):
        if not isinstance(x, Sequence) or isinstance(x, bytes):
            raise RowError(index, f, "a string or a list of {'role', 'content'} dicts", type(x))
    if isinstance(prompt, str) or isinstance(completion, str):
        got = (type(prompt), type(completion))
        raise RowError(index, "/".join(fields), "both strings or both lists of messages", got)
    pm = check_messages(prompt, index, fields[0], alternate=False)
    cm = check_messages(completion, index, fields[1], alternate=False)
    check_turns([(fields[0], pm), (fields[1], cm)], index)
    return Sample(messages=pm + cm, completion_start=len(pm), tools=tools, source_field="/".join(fields))


def _sharegpt(turns: Any, index: int | None) -> list[dict[str, Any]]:
    if not isinstance(turns, Sequence) or isinstance(turns, (str, bytes)):
        raise RowError(index, "conversations", "a list of {'from', 'value'} dicts", type(turns))
    msgs = []
    for j, t in enumerate(turns):
        if not isinstance(t, Mapping) or "from" not in t or "value" not in t:
            raise RowError(index, f"conversations[{j}]", "a dict with 'from' and 'value'", t)
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise RowError(index, f"conversations[{j}].from", f"one of {sorted(SHAREGPT_ROLES)}", t["from"])
        msgs.append({"role": role, "content": t["value"]})
    return check_messages(msgs, index, "conversations")


FORMATS = ("messages", "conversations", "prompt", "completion", "text")


def normalize_row(row: Mapping[str, Any], index: int | None = None, *, alternate: bool = True) -> Sample:
    """One dataset row -> `Sample`, or `RowError` naming the row index, the field and what was expected.
    A vision-language row's images stay undecoded; their number must match the image parts."""
    sample = _normalize_text_row(row, index, alternate=alternate)
    col, images = row_images(row)
    parts = count_image_parts(sample.messages or [])
    if parts or images:
        if len(images) != parts:
            want = f"{parts} image(s), one per image part of the messages"
            raise RowError(index, col or "images", want, Verbatim(f"{len(images)} image(s)"))
        sample.images, sample.image_field = images, col
    return sample


def _normalize_text_row(row: Mapping[str, Any], index: int | None = None, *, alternate: bool = True) -> Sample:
    if not isinstance(row, Mapping):
        raise RowError(index, None, "a dict (one object per row)", type(row))
    tools = row.get("tools")
    if "messages" in row and row["messages"] is not None:
        return Sample(messages=check_messages(row["messages"], index, "messages", alternate=alternate), tools=tools)
    if "conversations" in row and row["conversations"] is not None:
        return Sample(messages=_sharegpt(row["conversations"], index), tools=tools, source_field="conversations")
    if "prompt" in row and "completion" in row:
        return prompt_completion_sample(row["prompt"], row["completion"], index, tools=tools)
    if "text" in row and row["text"] is not None:
        if not isinstance(row["text"], str):
            raise RowError(index, "text", "a string", type(row["text"]))
        return Sample(text=row["text"])
    expected = "one of 'messages', 'conversations' (ShareGPT), 'prompt'+'completion', or 'text'"
    # a file's rows share columns: the one this row leaves empty (null) is the field the user meant to fill
    empty = next((k for k in FORMATS if k in row), None)
    if empty is not None:
        raise RowError(index, empty, f"a value (every row needs {expected})", Verbatim("null"))
    raise RowError(index, None, f"a row with {expected}", Verbatim(f"fields {sorted(map(str, row))}"))
