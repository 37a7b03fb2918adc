"""Tool-call parsers of formats with their own call syntax: harmony (gpt-oss), DeepSeek's tool-call tokens, GLM-4.6's
XML argument tags, Cohere's action blocks (Command R7B, Command R+ tool use) and Granite's ``<|tool_call|>`` list.

Each parser reads exactly what the format's renderer writes for an assistant ``tool_calls`` turn (see the fmt_*.py
renderers, which mirror the official templates); the few places where a real model's output plausibly varies
(whitespace around JSON, an end-of-turn marker present or not, harmony's two header layouts) are commented.
"""

from __future__ import annotations

import json
import re
from typing import Any

from alignkit.tools.base import (
    ToolCall,
    ToolCallError,
    after_reasoning,
    call,
    json_at,
    register_parser,
    require_text,
    skip_ws,
    strip_end,
)

# --- gpt-oss (harmony) ------------------------------------------------------------------------------------------
# The renderer writes a call turn as (after the "<|start|>assistant" header the generation prompt supplies)
#   [<|channel|>analysis<|message|>...<|end|><|start|>assistant] to=functions.NAME<|channel|>commentary json
#   <|message|>{"arg": ...}<|call|>
# Real gpt-oss models also put the recipient after the channel ("<|channel|>commentary to=functions.NAME
# <|constrain|>json<|message|>"), and a turn may hold several messages; both layouts are read.
_H_START, _H_MESSAGE = "<|start|>", "<|message|>"
_H_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_H_HEADER = re.compile(
    r"\s*(?P<role>[^\s<]*)(?:\s+to=(?P<to1>\S+?))?\s*(?:<\|channel\|>(?P<channel>[^\s<]*))?"
    r"(?:\s+to=(?P<to2>[^\s<]+))?\s*(?:<\|constrain\|>)?\s*(?P<ctype>[^\s<]*)\s*"
)


@register_parser("gpt-oss")
def parse_harmony(text: str) -> list[ToolCall]:
    where = "gpt-oss tool call"
    require_text(text)
    if not text.startswith(_H_START):
        text = _H_START + "assistant" + text  # the turn's own header is the generation prompt's
    calls: list[ToolCall] = []
    for segment in text.split(_H_START)[1:]:
        header, sep, body = segment.partition(_H_MESSAGE)
        m = _H_HEADER.fullmatch(header)
        recipient = (m.group("to1") or m.group("to2")) if m else None
        if not sep:
            if "to=" in header:
                raise ToolCallError(f"{where}: the call header {header[:80]!r} is not followed by <|message|>")
            continue  # no message (stray text between messages): nothing to call
        if m is None:
            if "to=" in header:
                raise ToolCallError(f"{where}: cannot read the message header {header[:80]!r}")
            continue
        if recipient is None:
            continue  # an analysis / final message, not a call
        ends = [body.find(e) for e in _H_ENDS if e in body]
        end = min(ends) if ends else len(body)  # the closing <|call|> may be left off (end-of-turn marker)
        args_text = body[:end]
        name = recipient[len("functions.") :] if recipient.startswith("functions.") else recipient
        ctype = m.group("ctype") or "json"
        if ctype != "json":
            raise ToolCallError(f"{where}: the arguments of {name!r} must be json (got content type {ctype!r})")
        if not args_text.strip():
            raise ToolCallError(f"{where}: the call to {name!r} has no arguments (write a JSON object, {{}} if none)")
        args, pos = json_at(args_text, 0, where)
        if skip_ws(args_text, pos) != len(args_text):
            raise ToolCallError(f"{where}: unexpected text after the JSON arguments of {name!r}")
        calls.append(call(name, args, where))
    return calls


# --- DeepSeek tool-call tokens ------------------------------------------------------------------------------------
_DS_CALLS_BEGIN, _DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN, _DS_CALL_END, _DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_DS_EOS = "<｜end▁of▁sentence｜>"


def _ds_blocks(text: str, where: str) -> list[str]:
    """The bodies of the <｜tool▁call▁begin｜>...<｜tool▁call▁end｜> blocks of the turn's call section."""
    text = strip_end(after_reasoning(text), _DS_EOS)
    start = text.find(_DS_CALLS_BEGIN)
    if start < 0:
        if _DS_CALL_BEGIN in text or _DS_SEP in text:
            raise ToolCallError(f"{where}: a tool call must be inside {_DS_CALLS_BEGIN}...{_DS_CALLS_END}")
        return []
    section = text[start + len(_DS_CALLS_BEGIN) :]
    if not section.endswith(_DS_CALLS_END):
        raise ToolCallError(f"{where}: the tool calls are not closed with {_DS_CALLS_END}")
    section = section[: -len(_DS_CALLS_END)]
    blocks, pos = [], 0
    while True:
        pos = skip_ws(section, pos)  # the renderer separates calls by "\n" (R1 format) or nothing (V3.1)
        if pos == len(section):
            break
        if not section.startswith(_DS_CALL_BEGIN, pos):
            raise ToolCallError(f"{where}: expected {_DS_CALL_BEGIN}, got {section[pos : pos + 40]!r}")
        end = section.find(_DS_CALL_END, pos)
        if end < 0:
            raise ToolCallError(f"{where}: a tool call is not closed with {_DS_CALL_END}")
        blocks.append(section[pos + len(_DS_CALL_BEGIN) : end])
        pos = end + len(_DS_CALL_END)
    if not blocks:
        raise ToolCallError(f"{where}: the tool-call section holds no call")
    return blocks


@register_parser("deepseek-v2.5", "deepseek-v3", "deepseek-r1", "deepseek-r1-distill-llama", "deepseek-r1-distill-qwen")
def parse_deepseek(text: str) -> list[ToolCall]:
    """<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>, "\\n"-separated."""
    where = "DeepSeek tool call"
    require_text(text)
    calls = []
    for block in _ds_blocks(text, where):
        kind, sep, rest = block.partition(_DS_SEP)
        if not sep:
            raise ToolCallError(f"{where}: expected 'function{_DS_SEP}NAME' in {block[:60]!r}")
        if kind.strip() != "function":
            raise ToolCallError(f"{where}: the call type must be 'function', got {kind.strip()[:40]!r}")
        name, nl, rest = rest.partition("\n")
        if not nl:
            raise ToolCallError(f"{where}: the name {name.strip()[:40]!r} must be followed by a ```json block")
        name = name.strip()
        pos = skip_ws(rest, 0)
        if not rest.startswith("```json", pos):
            raise ToolCallError(f"{where}: the arguments of {name!r} must be in a ```json block")
        args, pos = json_at(rest, pos + len("```json"), where)
        pos = skip_ws(rest, pos)
        if not rest.startswith("```", pos) or skip_ws(rest, pos + 3) != len(rest):
            raise ToolCallError(f"{where}: the ```json block of {name!r} must hold one JSON object and be closed")
        if isinstance(args, str):
            raise ToolCallError(f"{where}: the arguments of {name!r} must be a JSON object, got str")
        calls.append(call(name, args, where))
    return calls


@register_parser("deepseek-v3.1")
def parse_deepseek_v31(text: str) -> list[ToolCall]:
    """<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>, calls written back to back."""
    where = "DeepSeek-V3.1 tool call"
    require_text(text)
    calls = []
    for block in _ds_blocks(text, where):
        name, sep, rest = block.partition(_DS_SEP)
        if not sep:
            raise ToolCallError(f"{where}: expected 'NAME{_DS_SEP}{{...}}' in {block[:60]!r}")
        name = name.strip()
        args, pos = json_at(rest, 0, where)
        if skip_ws(rest, pos) != len(rest):
            raise ToolCallError(f"{where}: unexpected text after the JSON arguments of {name!r}")
        if isinstance(args, str):
            raise ToolCallError(f"{where}: the arguments of {name!r} must be a JSON object, got str")
        calls.append(call(name, args, where))
    return calls


# --- GLM-4.6 ------------------------------------------------------------------------------------------------------
# <tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n...</tool_call>, V a string verbatim, anything
# else as JSON. The two are indistinguishable without the tool's schema ("0" and 0 render alike): a value that
# reads as JSON is taken as JSON, otherwise as a string (what GLM's own parser does for non-string parameters).
_GLM_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_GLM_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
_GLM_END = ("<|user|>", "<|observation|>", "<|endoftext|>")


def _glm_value(v: str) -> Any:  # noqa: ANN401
    try:
        return json.loads(v)
    except (json.JSONDecodeError, RecursionError):
        return v


@register_parser("glm-4.6")
def parse_glm46(text: str) -> list[ToolCall]:
    where = "GLM tool call"
    require_text(text)
    text = strip_end(after_reasoning(text), *_GLM_END)  # the model stops by starting the next turn
    calls, pos = [], 0
    for m in _GLM_CALL.finditer(text):
        if "<tool_call>" in text[pos : m.start()] or "</tool_call>" in text[pos : m.start()]:
            raise ToolCallError(f"{where}: unbalanced <tool_call> tags")
        pos = m.end()
        body = m.group(1)
        k = body.find("<arg_key>")
        name, args_text = (body, "") if k < 0 else (body[:k], body[k:])
        name = name.strip()
        if "<" in name or ">" in name or "\n" in name:
            raise ToolCallError(f"{where}: cannot read the tool name in {body[:60]!r}")
        args: dict[str, Any] = {}
        apos = 0
        for a in _GLM_ARG.finditer(args_text):
            if a.start() != apos:
                break
            key = a.group(1).strip()
            if key in args:
                raise ToolCallError(f"{where}: argument {key!r} of {name!r} is given twice")
            args[key] = _glm_value(a.group(2))
            apos = a.end()
        if args_text[apos:].strip():
            raise ToolCallError(
                f"{where}: cannot read the arguments of {name!r} (write <arg_key>K</arg_key><arg_value>V</arg_value>)"
            )
        calls.append(call(name, args, where))
    rest = text[pos:]
    if "<tool_call>" in rest or "</tool_call>" in rest:
        raise ToolCallError(f"{where}: a <tool_call> is not closed with </tool_call>")
    return calls


# --- Cohere --------------------------------------------------------------------------------------------------------
def _call_list(value: Any, name_key: str, args_key: str, where: str) -> list[ToolCall]:  # noqa: ANN401
    if not isinstance(value, list):
        raise ToolCallError(f"{where}: expected a JSON list of tool calls, got {type(value).__name__}")
    calls = []
    for item in value:
        if not isinstance(item, dict):
            raise ToolCallError(f"{where}: each tool call must be a JSON object, got {type(item).__name__}")
        calls.append(call(item.get(name_key), item.get(args_key), where))
    return calls


@register_parser("command-r7b")
def parse_command_r7b(text: str) -> list[ToolCall]:
    """<|START_THINKING|>plan<|END_THINKING|><|START_ACTION|>[{"tool_call_id", "tool_name", "parameters"}, ...]
    <|END_ACTION|>."""
    where = "Command R7B tool call"
    require_text(text)
    text = strip_end(text, "<|END_OF_TURN_TOKEN|>")
    start = text.find("<|START_ACTION|>")
    if start < 0:
        if "<|END_ACTION|>" in text:
            raise ToolCallError(f"{where}: <|END_ACTION|> without <|START_ACTION|>")
        return []
    end = text.find("<|END_ACTION|>", start)
    if end < 0:
        raise ToolCallError(f"{where}: the action block is not closed with <|END_ACTION|>")
    block = text[start + len("<|START_ACTION|>") : end]
    value, pos = json_at(block, 0, where)
    if skip_ws(block, pos) != len(block):
        raise ToolCallError(f"{where}: unexpected text after the action's JSON list")
    if "<|START_ACTION|>" in text[end:]:
        raise ToolCallError(f"{where}: write all calls in one <|START_ACTION|> block")
    return _call_list(value, "tool_name", "parameters", where)


@register_parser("command-r-plus-tool-use")
def parse_command_r_plus(text: str) -> list[ToolCall]:
    """Action:\\n```json\\n[{"tool_name": ..., "parameters": {...}}, ...]```."""
    where = "Command R+ tool call"
    require_text(text)
    text = strip_end(text, "<|END_OF_TURN_TOKEN|>")
    m = re.search(r"(?:^|\n)Action:[ \t]*\n?", text)
    if m is None:
        return []
    pos = skip_ws(text, m.end())
    if not text.startswith("```json", pos):
        raise ToolCallError(f"{where}: 'Action:' must be followed by a ```json block")
    value, pos = json_at(text, pos + len("```json"), where)
    pos = skip_ws(text, pos)
    if not text.startswith("```", pos):
        raise ToolCallError(f"{where}: the ```json block is not closed with ```")
    return _call_list(value, "tool_name", "parameters", where)


# --- Granite 3 -----------------------------------------------------------------------------------------------------
@register_parser("granite-3")
def parse_granite(text: str) -> list[ToolCall]:
    """<|tool_call|>[{"name": ..., "arguments": {...}}, ...] (the syntax Granite's tool system prompt asks for)."""
    where = "Granite tool call"
    require_text(text)
    text = strip_end(text, "<|end_of_text|>")
    start = text.find("<|tool_call|>")
    if start < 0:
        return []
    rest = text[start + len("<|tool_call|>") :]
    value, pos = json_at(rest, 0, where)
    if skip_ws(rest, pos) != len(rest):
        raise ToolCallError(f"{where}: unexpected text after the JSON list of calls")
    return _call_list(value, "name", "arguments", where)
