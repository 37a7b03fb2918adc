"""JSON schemas of plain Python callables, from their type hints and docstrings (what chat formats show as tools).

``function_schema(f)`` returns the OpenAI-style ``{"type": "function", "function": {"name", "description",
"parameters"}}`` that transformers' chat templates read: the description is the docstring's first paragraph, each
parameter's description comes from a Google-style ``Args:`` section, types from the annotations (``int``,
``float``, ``str``, ``bool``, ``list[...]``, ``dict``, ``Literal[...]`` as an ``enum``, ``X | None`` optional), and
parameters without a default are ``required``. A parameter with no annotation is refused: the model would not know
what to pass.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["function_schema"]

_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _type_schema(tp: Any, where: str) -> dict[str, Any]:  # noqa: ANN401
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is Literal:
        kinds = {type(a) for a in args}
        out: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1 and next(iter(kinds)) in _SCALARS:
            out["type"] = _SCALARS[next(iter(kinds))]
        return out
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _type_schema(rest[0], where)
        return {"anyOf": [_type_schema(a, where) for a in rest]}
    if tp is list or origin is list:
        return {"type": "array", **({"items": _type_schema(args[0], where)} if args else {})}
    if tp is dict or origin is dict:
        return {"type": "object"}
    raise TypeError(f"{where}: type {tp!r} has no JSON schema here (use int, float, str, bool, list, dict, Literal)")


def _docstring(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(the first paragraph, {parameter: its description from an ``Args:`` section})."""
    doc = inspect.getdoc(fn) or ""
    head = doc.split("\n\n", 1)[0].strip()
    params: dict[str, str] = {}
    m = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.MULTILINE)
    if m:
        current = None
        for line in m.group(1).splitlines():
            item = re.match(r"\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
            if item and (current is None or len(line) - len(line.lstrip()) <= 4):
                current = item.group(1)
                params[current] = item.group(2).strip()
            elif current is not None and line.strip():
                params[current] = f"{params[current]} {line.strip()}".strip()
    return " ".join(head.split()), params


def function_schema(fn: Callable[..., Any], name: str | None = None) -> dict[str, Any]:
    """The tool schema of ``fn`` (a function, a bound method, or an object with ``__call__``)."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    tool = name or getattr(fn, "__name__", None) or type(fn).__name__
    hints = typing.get_type_hints(target)
    description, docs = _docstring(target)
    props: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(target).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name not in hints:
            raise TypeError(f"tool {tool!r}: parameter {p.name!r} has no type annotation (the model needs its type)")
        schema = _type_schema(hints[p.name], f"tool {tool!r}, parameter {p.name!r}")
        if p.name in docs:
            schema["description"] = docs[p.name]
        props[p.name] = schema
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    parameters: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        parameters["required"] = required
    return {"type": "function", "function": {"name": tool, "description": description, "parameters": parameters}}
