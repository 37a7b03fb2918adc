"""The tool-call parser contract and registry: one parser per chat format that defines tool calls.

A parser reads what the model generated for one assistant turn (``text``: the turn's content as the chat format
renders it, the end-of-turn marker included or not) and returns its calls in order. It never guesses: a call it
cannot read (broken JSON, a missing name, arguments that are not an object) raises :class:`ToolCallError` with a
message for the model. Text without any call returns ``[]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

__all__ = [
    "PARSERS", "ToolCall", "ToolCallError", "after_reasoning", "call", "json_at", "loads_json", "parse_tool_calls",
    "register_parser", "require_text", "skip_ws", "strip_end", "tool_formats",
]  # fmt: skip


class ToolCall(TypedDict):
    name: str
    arguments: dict[str, Any]


class ToolCallError(ValueError):
    """A tool call the model wrote that cannot be read; the message says what is wrong, for the model to fix."""


Parser = Callable[[str], list[ToolCall]]

#: chat format name -> parser of that format's generated assistant text
PARSERS: dict[str, Parser] = {}


def register_parser(*formats: str) -> Callable[[Parser], Parser]:
    """Decorator: ``parser`` reads the tool calls of the chat formats ``formats`` (registered names)."""

    def deco(parser: Parser) -> Parser:
        for name in formats:
            if name in PARSERS:
                raise ValueError(f"a tool-call parser for chat format {name!r} is registered twice")
            PARSERS[name] = parser
        return parser

    return deco


def tool_formats() -> list[str]:
    """The chat formats whose tool calls can be parsed, sorted."""
    return sorted(PARSERS)


def parse_tool_calls(chat_format: Any, text: str) -> list[ToolCall]:  # noqa: ANN401 - a name or a ChatFormat
    """The tool calls in ``text`` (one generated assistant turn) of ``chat_format`` (a name or a ChatFormat)."""
    name = chat_format if isinstance(chat_format, str) else getattr(chat_format, "name", None)
    parser = PARSERS.get(name)  # type: ignore[arg-type]
    if parser is None:
        raise KeyError(f"chat format {name!r} has no tool-call parser; formats with one: {tool_formats()}")
    return parser(text)


def call(name: Any, arguments: Any, where: str) -> ToolCall:  # noqa: ANN401
    """A checked call: ``name`` a non-empty string, ``arguments`` a dict (a JSON string of one is decoded)."""
    if not isinstance(name, str) or not name:
        raise ToolCallError(f"{where}: the tool call has no name (expected a non-empty string, got {name!r})")
    if isinstance(arguments, str):
        arguments = loads_json(arguments, f"{where}: the arguments of {name!r}") if arguments.strip() else {}
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolCallError(f"{where}: the arguments of {name!r} must be a JSON object, got {type(arguments).__name__}")
    return {"name": name, "arguments": arguments}


# Pieces every parser reads with ------------------------------------------------------------------------------------
WHITESPACE = " \t\n\r"
_DECODER = None


def require_text(text: Any) -> str:  # noqa: ANN401
    """``text`` itself; anything but a string is the caller's bug (a TypeError), not the model's."""
    if not isinstance(text, str):
        raise TypeError(f"the generated text must be a str, got {type(text).__name__}")
    return text


def skip_ws(text: str, pos: int) -> int:
    """The first index at or after ``pos`` that is not JSON whitespace."""
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def strip_end(text: str, *markers: str) -> str:
    """``text`` without its trailing end-of-turn marker(s) and whitespace (parsers accept text with or without)."""
    text = text.rstrip(WHITESPACE)
    changed = True
    while changed:
        changed = False
        for m in markers:
            if m and text.endswith(m):
                text, changed = text[: -len(m)].rstrip(WHITESPACE), True
    return text


def after_reasoning(text: str) -> str:
    """The text after the last reasoning block (``...</think>``): calls are never inside the reasoning."""
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def _json_error(e: Exception, where: str, offset: int = 0) -> ToolCallError:
    import json

    if isinstance(e, json.JSONDecodeError):
        return ToolCallError(f"{where}: not valid JSON ({e.msg} at character {e.pos - offset})")
    return ToolCallError(f"{where}: the JSON cannot be read ({type(e).__name__}: {e})")  # too deep, too long


def json_at(text: str, pos: int, where: str) -> tuple[Any, int]:
    """The JSON value starting at ``text[pos]`` (leading whitespace skipped) and the index after it; broken JSON,
    nesting too deep or an integer too long to convert is a ToolCallError."""
    import json

    global _DECODER
    _DECODER = _DECODER or json.JSONDecoder()
    pos = skip_ws(text, pos)
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError) as e:
        raise _json_error(e, where, pos) from None


def loads_json(text: str, where: str) -> Any:  # noqa: ANN401 - any JSON value
    """One JSON value filling ``text`` (surrounding whitespace allowed), else a ToolCallError."""
    value, end = json_at(text, 0, where)
    if skip_ws(text, end) != len(text):
        raise ToolCallError(f"{where}: unexpected text after the JSON ({text[end : end + 40]!r})")
    return value
