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

Multimodal formats (`ChatFormat.multimodal`) also accept list content (`{"type": "text", "text": ...}` and
`{"type": "image"}` parts, TRL's convention). Each image part renders as the template's placeholder text in a
span of its own with `image=True` (never trainable, never merged with a neighbour): the tokenizer later expands
that span into the model's image tokens (`alignkit.vision`).
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
    image: bool = False  # the placeholder of one image part (expanded into image tokens when tokenized)


@dataclass
class Rendered:
    text: str
    spans: list[Span]

    def trainable_spans(self) -> list[Span]:
        return [s for s in self.spans if s.trainable]

    def image_spans(self) -> list[Span]:
        return [s for s in self.spans if s.image]

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
        same = last is not None and (last.message_index, last.role, last.trainable) == (msg, role, train)
        if last is not None and same and not last.image:
            self._spans[-1] = Span(last.start, end, msg, role, train)
        else:
            self._spans.append(Span(self._pos, end, msg, role, train))
        self._parts.append(text)
        self._pos = end
        return self

    def add_image(self, placeholder: str, msg: int, role: str) -> Builder:
        """One image part: its placeholder text as a span of its own (never trained, never merged)."""
        if not placeholder:
            raise ValueError("an image placeholder cannot be empty")
        self._spans.append(Span(self._pos, self._pos + len(placeholder), msg, role, False, image=True))
        self._parts.append(placeholder)
        self._pos += len(placeholder)
        return self

    def build(self) -> Rendered:
        return Rendered("".join(self._parts), list(self._spans))


IMAGE_PART_KEYS = ("image", "url", "path", "base64")  # where a part may carry its image; templates never read them


def _content_parts(content: list, i: int) -> list[dict[str, Any]]:
    """List content as the processor passes it to the template: OpenAI `image_url` parts become image parts."""
    out = []
    for j, part in enumerate(content):
        where = f"messages[{i}]['content'][{j}]"
        if not isinstance(part, Mapping):
            want = "a dict like {'type': 'text', 'text': ...}"
            raise TemplateError(f"{where} must be {want}, got {type(part).__name__}")
        kind = part.get("type")
        if kind == "image_url" and "image_url" in part:
            url = part["image_url"].get("url", "") if isinstance(part["image_url"], Mapping) else part["image_url"]
            part = {"type": "image", "url": url}
        elif kind == "text":
            if not isinstance(part.get("text"), str):
                raise TemplateError(f"{where} is a text part without a string 'text' (got {part.get('text')!r})")
        elif kind != "image":
            expected = "expected 'text' or 'image' (video and audio parts are not supported)"
            raise TemplateError(f"{where}['type'] = {kind!r}; {expected}")
        out.append(dict(part))
    return out


def _validate_messages(messages: Any, multimodal: bool = False) -> list[dict[str, Any]]:
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
        # transformers drops keys whose value is None before rendering; so do we.
        m = {k: v for k, v in m.items() if v is not None}
        if multimodal and isinstance(content, (list, tuple)):
            m["content"] = _content_parts(list(content), i)
        elif content is not None and not isinstance(content, str):
            kind = "a string or a list of text/image parts" if multimodal else "a string (this format is text-only)"
            raise TemplateError(f"messages[{i}]['content'] must be {kind}, got {type(content).__name__}")
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
    Multimodal formats set `multimodal = True` and `vlm_claims` (families in `shared/conformance/vlm/`).
    """

    name: str = ""
    description: str = ""
    claims: tuple[str, ...] = ()
    vlm_claims: tuple[str, ...] = ()
    multimodal: bool = False
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
        msgs = _validate_messages(messages, self.multimodal)
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
