"""The chat-format contract: a renderer turns messages into text plus labelled character spans.

A format is plain Python (no Jinja). It appends pieces of text to a `Builder`, saying for each piece which
message it belongs to and whether it is trained on. The result is a `Rendered` whose `.text` is
byte-identical to what the model's official chat template produces, and whose `.spans` cover that text
exactly, in order, without gaps.

Trainable text, by convention for every format: the assistant content *as the template renders it*
(after the template's own stripping, reasoning removal, etc.) through the end of the end-of-turn marker
that closes that assistant message (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`...). Role headers,
separators before the content, whitespace after the end-of-turn marker, and all system / user / tool
text are not trainable.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(ValueError):
    """A conversation the format (like its official template) refuses to render."""


@dataclass(frozen=True)
class Span:
    """Characters `text[start:end]` of a render.

    `message_index` is the index into the `messages` passed to `render` (None for text that belongs to no
    message: BOS, an injected default system prompt, the generation prompt, tool definitions).
    """

    start: int
    end: int
    message_index: int | None
    role: str | None
    trainable: bool


@dataclass
class Rendered:
    text: str
    spans: list[Span]

    def trainable_spans(self) -> list[Span]:
        return [s for s in self.spans if s.trainable]

    def trainable_text(self) -> list[str]:
        """The trainable pieces, one string per trainable span (adjacent pieces of one message merged)."""
        return [self.text[s.start : s.end] for s in self.spans if s.trainable]


class Builder:
    """Accumulates labelled pieces; adjacent pieces with identical labels are merged."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._spans: list[Span] = []
        self._pos = 0

    def add(self, text: str, msg: int | None = None, role: str | None = None, train: bool = False) -> Builder:
        if not text:
            return self
        end = self._pos + len(text)
        last = self._spans[-1] if self._spans else None
        if last is not None and (last.message_index, last.role, last.trainable) == (msg, role, train):
            self._spans[-1] = Span(last.start, end, msg, role, train)
        else:
            self._spans.append(Span(self._pos, end, msg, role, train))
        self._parts.append(text)
        self._pos = end
        return self

    def build(self) -> Rendered:
        return Rendered("".join(self._parts), list(self._spans))


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise TemplateError(f"messages[{i}] has no 'role' (expected one of {ROLES})")
        if m["role"] not in ROLES:
            raise TemplateError(f"messages[{i}]['role'] = {m['role']!r}; expected one of {ROLES}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise TemplateError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        # transformers drops keys whose value is None before rendering; so do we.
        m = {k: v for k, v in m.items() if v is not None}
        # transformers >= 5 also copies a message's reasoning (first of reasoning_content / thinking /
        # reasoning) into `reasoning_content` (always) and `thinking` (unless set); templates read either.
        r = next((m[k] for k in REASONING_KEYS if k in m), None)
        out.append(m if r is None else {"thinking": r, **m, "reasoning_content": r})
    return out


class ChatFormat:
    """Base class of every registered chat format.

    Subclasses set `name`, `description`, `claims` (conformance template families in
    `shared/conformance/templates/` whose official template this renderer reproduces byte for byte),
    `switches` (template variables and flags with the model's real defaults), and implement `_render`.
    """

    name: str = ""
    description: str = ""
    claims: tuple[str, ...] = ()
    switches: Mapping[str, Any] = {}

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **switches: Any,
    ) -> Rendered:
        unknown = set(switches) - set(self.switches)
        if unknown:
            raise TypeError(f"format {self.name!r} has no switch(es) {sorted(unknown)}; valid: {sorted(self.switches)}")
        sw = {**self.switches, **switches}
        msgs = _validate_messages(messages)
        b = Builder()
        self._render(b, msgs, bool(add_generation_prompt), sw)
        return b.build()

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<ChatFormat {self.name}>"


@dataclass
class Registry:
    formats: dict[str, ChatFormat] = field(default_factory=dict)

    def register(self, fmt: ChatFormat) -> ChatFormat:
        if not fmt.name:
            raise ValueError(f"{type(fmt).__name__} has no name")
        if fmt.name in self.formats:
            raise ValueError(f"chat format {fmt.name!r} registered twice")
        self.formats[fmt.name] = fmt
        return fmt

    def get(self, name: str) -> ChatFormat:
        if isinstance(name, ChatFormat):
            return name
        try:
            return self.formats[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.formats), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"unknown chat format {name!r}{hint} Registered: {sorted(self.formats)}") from None


REGISTRY = Registry()


def register(cls: type[ChatFormat]) -> type[ChatFormat]:
    """Class decorator: instantiate and register a format."""
    REGISTRY.register(cls())
    return cls


def iter_formats() -> Iterable[ChatFormat]:
    return REGISTRY.formats.values()
