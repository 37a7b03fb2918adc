"""Tool-call parsers of formats that write calls as JSON.

Syntaxes (what each format renders for an assistant turn with tool calls; see the fmt_*.py renderers):

- Hermes / Qwen (qwen2.5, qwq, qwen3, qwen3-vl, hermes-3-tool-use): optional content, then one block per call
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, then ``<|im_end|>``. Reasoning
  (``...</think>``) may precede the calls in qwq / qwen3; a ``<tool_call>`` inside it is not a call.
- Llama 3.1 / 3.2 / 3.3 (and llama-3.2-vision): the whole turn is ONE JSON object
  ``{"name": ..., "parameters": {...}}`` then ``<|eot_id|>`` (``<|eom_id|>`` in built-in tool mode, where a
  built-in tool is written ``<|python_tag|>name.call(key="value", ...)``). The content of a turn with a call is
  not rendered, so a turn is either a call or content.
- Llama 4 (and llama-4-vlm): ``<|python_start|>content<|python_end|>`` followed by the calls as JSON objects
  written back to back (``{"name": ..., "parameters": ...}{"name": ...}``), then ``<|eot|>``.
- Mistral v3 (mistral-v0.3, mistral-nemo, mistral-small-3.1): ``[TOOL_CALLS] [{"name": ..., "arguments": ...,
  "id": ...}, ...]</s>`` (Nemo: no space after ``[TOOL_CALLS]``).
- Mistral v7 (mistral-small, Small 3.2): ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` per call, then ``</s>``.

Every parser accepts the text with or without the end-of-turn marker. JSON is decoded with Python's json module
(RecursionError and oversized integers become ToolCallError too).
"""

from __future__ import annotations

import re
from typing import Any

from alignkit.tools.base import (
    WHITESPACE,
    ToolCall,
    ToolCallError,
    call,
    json_at,
    loads_json,
    register_parser,
    require_text,
    skip_ws,
    strip_end,
)


def _short(s: str, n: int = 60) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def _checked(name: Any, arguments: Any, where: str) -> ToolCall:  # noqa: ANN401
    """`base.call`, with a JSON-string `arguments` decoded here first (safely: deep nesting is a ToolCallError)."""
    if isinstance(arguments, str) and arguments.strip() and isinstance(name, str) and name:
        arguments = loads_json(arguments, f"{where}: the arguments of {name!r}")
    return call(name, arguments, where)


def _object_call(obj: Any, args_keys: tuple[str, ...], where: str, extra: tuple[str, ...] = ()) -> ToolCall:  # noqa: ANN401
    """A call written as a JSON object {"name": ..., <one of args_keys>: {...}} (keys in `extra` are ignored)."""
    if not isinstance(obj, dict):
        want = '{"name": ..., "' + args_keys[0] + '": {...}}'
        raise ToolCallError(f"{where}: a tool call must be a JSON object {want}, got {type(obj).__name__}")
    allowed = {"name", *args_keys, *extra}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ToolCallError(f"{where}: unexpected key(s) {unknown} in the tool call; expected {sorted(allowed)}")
    if "name" not in obj:
        raise ToolCallError(f'{where}: the tool call has no "name"')
    present = [k for k in args_keys if k in obj]
    if len(present) > 1:
        raise ToolCallError(f"{where}: the tool call has both {present[0]!r} and {present[1]!r}; give one")
    arguments = obj[present[0]] if present else {}
    return _checked(obj["name"], arguments, where)


# Hermes / Qwen: <tool_call> JSON </tool_call> -----------------------------------------------------------------
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _hermes(text: str, *, reasoning: bool) -> list[ToolCall]:
    text = strip_end(require_text(text), "<|im_end|>")
    if reasoning and "</think>" in text:
        # Calls follow the reasoning; a <tool_call> written inside the reasoning is not a call. The answer is what
        # follows the LAST </think>, as in the templates (`content.split('</think>')[-1]`).
        text = text.rsplit("</think>", 1)[1]
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(_OPEN, pos)
        stray = text.find(_CLOSE, pos)
        if stray != -1 and (start == -1 or stray < start):
            raise ToolCallError(f"{_CLOSE} without a matching {_OPEN} (tool call {len(calls) + 1})")
        if start == -1:
            return calls
        where = f"tool call {len(calls) + 1}"
        # The JSON is decoded where it starts, so a "</tool_call>" inside one of its strings does not end the block.
        # Lenient on whitespace: the format writes "\n" on both sides of the JSON; models vary.
        pos = skip_ws(text, start + len(_OPEN))
        if text.startswith(_CLOSE, pos):
            raise ToolCallError(f'{where}: the {_OPEN} block is empty; write {{"name": ..., "arguments": {{...}}}}')
        if pos == len(text):
            raise ToolCallError(f"{where}: {_OPEN} is not closed by {_CLOSE}")
        obj, pos = json_at(text, pos, where)
        pos = skip_ws(text, pos)
        if not text.startswith(_CLOSE, pos):
            if pos == len(text):
                raise ToolCallError(f"{where}: {_OPEN} is not closed by {_CLOSE}")
            if text.startswith(_OPEN, pos):
                raise ToolCallError(f"{where}: a new {_OPEN} starts before the previous one is closed by {_CLOSE}")
            raise ToolCallError(f"{where}: unexpected text after the JSON object: {_short(text[pos:])}")
        calls.append(_object_call(obj, ("arguments",), where))
        pos += len(_CLOSE)


@register_parser("qwen2.5", "qwen3-vl", "hermes-3-tool-use")
def parse_hermes(text: str) -> list[ToolCall]:
    """Qwen2.5 / Qwen3-VL / Hermes 3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks."""
    return _hermes(text, reasoning=False)


@register_parser("qwen3", "qwq")
def parse_hermes_reasoning(text: str) -> list[ToolCall]:
    """Qwen3 / QwQ: Hermes blocks after an optional `<think>...</think>` reasoning block."""
    return _hermes(text, reasoning=True)


# Llama 3.1 / 3.2 / 3.3: one JSON object, or a built-in <|python_tag|>name.call(...) --------------------------
_PYTHON_TAG = "<|python_tag|>"
_BUILTIN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.call\((.*)\)", re.DOTALL)
_BUILTIN_ARG = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)="(.*?)"\s*(?:,|$)', re.DOTALL)
# Llama 3.x writes "parameters"; "arguments" is accepted too (Meta's own prompt-format docs and vLLM's llama3_json
# parser use both), as is a "type": "function" key that the models sometimes add.
_LLAMA_ARGS = ("parameters", "arguments")


def _llama_builtin(code: str) -> ToolCall:
    """`name.call(key="value", ...)`: the template writes values raw between double quotes (no escaping)."""
    where = "built-in tool call"
    m = _BUILTIN.fullmatch(code.strip(WHITESPACE))
    if m is None:
        raise ToolCallError(f'{where}: expected name.call(key="value", ...) after {_PYTHON_TAG}, got {_short(code)}')
    name, inner = m.group(1), m.group(2)
    arguments: dict[str, Any] = {}
    pos = 0
    while inner[pos:].strip(WHITESPACE):
        a = _BUILTIN_ARG.match(inner, pos)
        if a is None:
            raise ToolCallError(f'{where} {name!r}: cannot read the arguments {_short(inner[pos:])} (key="value", ...)')
        arguments[a.group(1)] = a.group(2)
        pos = a.end()
    return call(name, arguments, where)


@register_parser("llama-3.1", "llama-3.2", "llama-3.3", "llama-3.2-vision", "llama-3.2-vision-early")
def parse_llama3(text: str) -> list[ToolCall]:
    """Llama 3.x: the turn is one `{"name": ..., "parameters": {...}}` (or a built-in call), or plain content."""
    body = strip_end(require_text(text), "<|eot_id|>", "<|eom_id|>").strip(WHITESPACE)
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].strip(WHITESPACE)
        if not body.startswith("{"):
            return [_llama_builtin(body)]
        # <|python_tag|> before a JSON call: what Llama 3.1 writes with tools in the system prompt.
    if not body.startswith("{"):
        return []  # content, not a call (the format renders a call as the whole turn)
    where = "tool call"
    obj, end = json_at(body, 0, where)
    rest = body[end:].strip(WHITESPACE)
    if rest:
        if rest.startswith(("{", ";", ",")):
            raise ToolCallError("this model supports a single tool call per turn; write one JSON object only")
        raise ToolCallError(f"{where}: unexpected text after the JSON object: {_short(rest)}")
    return [_object_call(obj, _LLAMA_ARGS, where, extra=("type",))]


# Llama 4: <|python_start|>content<|python_end|>{call}{call} ---------------------------------------------------
_PY_START, _PY_END = "<|python_start|>", "<|python_end|>"


@register_parser("llama-4", "llama-4-vlm")
def parse_llama4(text: str) -> list[ToolCall]:
    """Llama 4: `<|python_start|>content<|python_end|>` then the calls as back-to-back JSON objects."""
    body = strip_end(require_text(text), "<|eot|>", "<|eom|>")
    start = body.find(_PY_START)
    if start == -1:
        if _PY_END in body:
            raise ToolCallError(f"{_PY_END} without a preceding {_PY_START}")
        return []
    end = body.find(_PY_END, start + len(_PY_START))
    if end == -1:
        raise ToolCallError(f"{_PY_START} is not closed by {_PY_END} (write the calls after {_PY_END})")
    rest = body[end + len(_PY_END) :]
    calls: list[ToolCall] = []
    pos = 0
    while True:
        while pos < len(rest) and rest[pos] in WHITESPACE:  # lenient: whitespace between the objects
            pos += 1
        if pos == len(rest):
            break
        where = f"tool call {len(calls) + 1}"
        if rest[pos] != "{":
            raise ToolCallError(f'{where}: expected a JSON object {{"name": ..., "parameters": {{...}}}}, got '
                                f"{_short(rest[pos:])}")  # fmt: skip
        obj, pos = json_at(rest, pos, where)
        calls.append(_object_call(obj, _LLAMA_ARGS, where, extra=("type",)))
    if not calls:
        raise ToolCallError(f'no tool call after {_PY_END}; write {{"name": ..., "parameters": {{...}}}}')
    return calls


# Mistral v3: [TOOL_CALLS] [{...}, ...] ------------------------------------------------------------------------
_TOOL_CALLS = "[TOOL_CALLS]"


@register_parser("mistral-v0.3", "mistral-nemo", "mistral-small-3.1")
def parse_mistral_v3(text: str) -> list[ToolCall]:
    """Mistral v3: `[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}, ...]`."""
    body = strip_end(require_text(text), "</s>")
    if _TOOL_CALLS not in body:
        return []
    # Text before [TOOL_CALLS] is content (the format drops it; a model may still write some): ignored.
    calls: list[ToolCall] = []
    pos = body.index(_TOOL_CALLS)
    while pos < len(body):
        where = f"{_TOOL_CALLS} block"
        if not body.startswith(_TOOL_CALLS, pos):
            raise ToolCallError(f"{where}: unexpected text after the list of calls: {_short(body[pos:])}")
        pos = skip_ws(body, pos + len(_TOOL_CALLS))  # lenient on whitespace (v0.3 writes one space, Nemo none)
        if pos == len(body):
            raise ToolCallError(f'{where}: no calls after {_TOOL_CALLS}; write [{{"name": ..., "arguments": {{...}}}}]')
        array, pos = json_at(body, pos, where)
        if not isinstance(array, list):
            raise ToolCallError(f'{where}: expected a JSON list [{{"name": ..., "arguments": {{...}}}}, ...], '
                                f"got {type(array).__name__}")  # fmt: skip
        if not array:
            raise ToolCallError(f"{where}: the list of tool calls is empty")
        for obj in array:
            calls.append(_object_call(obj, ("arguments",), f"tool call {len(calls) + 1}", extra=("id",)))
        pos = skip_ws(body, pos)
    return calls


# Mistral v7 (Small 3.2): [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} -----------------------------------------------
_CALL_ID, _ARGS = "[CALL_ID]", "[ARGS]"


@register_parser("mistral-small")
def parse_mistral_v7(text: str) -> list[ToolCall]:
    """Mistral Small 3.2: `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` per call."""
    body = strip_end(require_text(text), "</s>")
    if _TOOL_CALLS not in body:
        return []
    calls: list[ToolCall] = []
    pos = body.index(_TOOL_CALLS)
    while pos < len(body):
        where = f"tool call {len(calls) + 1}"
        if not body.startswith(_TOOL_CALLS, pos):
            raise ToolCallError(f"{where}: unexpected text after the arguments: {_short(body[pos:])}")
        pos += len(_TOOL_CALLS)
        args_at = body.find(_ARGS, pos)
        next_call = body.find(_TOOL_CALLS, pos)
        if args_at == -1 or (next_call != -1 and next_call < args_at):
            raise ToolCallError(
                f"{where}: no {_ARGS} after the tool name ({_TOOL_CALLS}name{_CALL_ID}id{_ARGS}{{...}})"
            )
        # [CALL_ID] is optional: mistral-common's own v11 tokenizer format writes calls without ids.
        name = body[pos:args_at].partition(_CALL_ID)[0].strip(WHITESPACE)
        if not name:
            raise ToolCallError(f"{where}: the tool call has no name before {_CALL_ID}/{_ARGS}")
        pos = skip_ws(body, args_at + len(_ARGS))  # lenient on whitespace around the JSON
        if pos == len(body):
            raise ToolCallError(f"{where}: no arguments after {_ARGS}; write a JSON object ({{}} for none)")
        arguments, pos = json_at(body, pos, f"{where}: the arguments of {name!r}")
        if body.startswith(_CALL_ID, skip_ws(body, pos)):
            raise ToolCallError(f"{where}: {_CALL_ID} must come before {_ARGS}")
        calls.append(_checked(name, arguments, where))
        pos = skip_ws(body, pos)
    return calls
