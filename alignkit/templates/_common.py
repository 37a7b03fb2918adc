"""Helpers shared by the hand-written chat formats.

- `add_turn`: append one message with the trainable part (assistant body + end-of-turn marker) labelled.
- The Jinja behaviour the official templates rely on: `MISSING` (an undefined value), `printed` (`{{ x }}`),
  `concat_str` / `required` (values joined with `+`, which Jinja refuses for undefined or non-strings),
  `lookup` (`d.key`), `tojson` (transformers' filter), `first_message` (templates that read messages[0]).
- `check_alternation`: the user/assistant alternation test most templates raise on.
- `after_think` / `split_think`: how reasoning templates (QwQ, Qwen3, GLM-4.6) split `<think>...</think>answer`.
- `template_date`: the date line of templates that call `strftime_now` (the `date_string` switch).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from alignkit.templates.base import Builder, TemplateError

ALTERNATION_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."
LLAMA_DATE = "%d %b %Y"  # "26 Jul 2024": alignkit's canonical `date_string` form (the Llama 3.x templates' own)


def add_turn(b: Builder, i: int, role: str, head: str, body: str, end: str = "", tail: str = "") -> None:
    """Append message `i` as `head + body + end + tail`.

    For an assistant message `body + end` (the rendered content and its end-of-turn marker) is trainable;
    the header and whatever follows the marker are not. Other roles are one untrained piece.
    """
    if role == "assistant":
        b.add(head, msg=i, role=role)
        b.add(body + end, msg=i, role=role, train=True)
        b.add(tail, msg=i, role=role)
    else:
        b.add(head + body + end + tail, msg=i, role=role)


# Jinja semantics ---------------------------------------------------------------------------------------------
class _Undefined:
    """Jinja's Undefined (a key the message or schema does not have): falsy, empty, prints as ""."""

    def __bool__(self) -> bool:
        return False

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __contains__(self, item: Any) -> bool:
        return False

    def __repr__(self) -> str:
        return "Undefined"


MISSING = _Undefined()


def lookup(d: Any, key: str) -> Any:
    """`d.key` / `d[key]` as a template reads it: the value on a dict, MISSING otherwise."""
    return d.get(key, MISSING) if isinstance(d, dict) else MISSING


def printed(x: Any) -> str:
    """`{{ x }}`: MISSING renders as the empty string, anything else as str(x)."""
    return "" if x is MISSING else str(x)


def concat_str(x: Any, what: str) -> str:
    """A value the template concatenates with `+`: it must be a string (Jinja raises otherwise)."""
    if not isinstance(x, str):
        raise TemplateError(f"{what} must be a string (the official template concatenates it), got {x!r}")
    return x


def required(m: Mapping[str, Any], i: int, key: str = "content") -> Any:
    """`m[key]` of message `i` where the template concatenates it: Jinja raises on a missing value, so do we."""
    if key not in m:
        where = f"messages[{i}]" + (f" ({m['role']})" if "role" in m else "")
        raise TemplateError(f"{where} has no {key!r}, which this template requires")
    return m[key]


def first_message(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """messages[0], which many templates read unconditionally (Jinja raises on an empty list)."""
    if not messages:
        raise TemplateError("messages is empty; this template needs at least one message")
    return messages[0]


def tojson(x: Any, indent: int | None = None) -> str:
    """transformers' `tojson` filter: json.dumps with non-ASCII kept and no HTML escaping."""
    if x is MISSING:
        raise TemplateError("the template serialises a value that is missing")
    try:
        return json.dumps(x, ensure_ascii=False, indent=indent)
    except TypeError as e:
        raise TemplateError(f"the template cannot serialise {x!r} to JSON: {e}") from None


# Conversation checks ----------------------------------------------------------------------------------------
def check_alternation(
    messages: Sequence[dict[str, Any]],
    error: str = ALTERNATION_ERROR,
    skip: Callable[[dict[str, Any]], bool] | None = None,
) -> None:
    """The templates' test `(role == 'user') != (index % 2 == 0)`: users on even positions, never on odd.

    Any non-user role passes on an odd position (as in the official templates). Messages for which `skip`
    is true (e.g. tool traffic in Mistral's v3/v7 templates) are not counted.
    """
    k = 0
    for m in messages:
        if skip is not None and skip(m):
            continue
        if (m["role"] == "user") != (k % 2 == 0):
            raise TemplateError(error)
        k += 1


# Reasoning --------------------------------------------------------------------------------------------------
def after_think(content: str) -> str:
    """The answer part of `<think>...</think>answer`: the text after the last </think>, leading newlines dropped
    (with no </think>: all of `content`, leading newlines dropped)."""
    return content.split("</think>")[-1].lstrip("\n")


def split_think(content: str) -> tuple[str, str]:
    """(reasoning, answer) of `<think>reasoning</think>answer`, as Qwen3 and GLM-4.6 split a content that has no
    separate `reasoning_content`; ("", content) when there is no </think>."""
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, after_think(content)


# Dates ------------------------------------------------------------------------------------------------------
def template_date(value: str | _dt.date | None, fmt: str, parse: Sequence[str] = (LLAMA_DATE,)) -> str:
    """The `date_string` switch as a template's date line prints it (strftime `fmt`).

    None means today (what the template's strftime_now gives). A date / datetime is formatted. A string in one
    of the `parse` forms is re-formatted; any other string is used verbatim.
    """
    if value is None:
        value = _dt.datetime.now()
    if isinstance(value, _dt.date):
        return value.strftime(fmt)
    if not isinstance(value, str):
        raise TypeError(f"date_string must be a str, a date or None, got {type(value).__name__}")
    for form in parse:
        try:
            return _dt.datetime.strptime(value, form).strftime(fmt)
        except ValueError:
            pass
    return value
