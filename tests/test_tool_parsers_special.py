"""Tool-call parsers of formats with their own call syntax (alignkit/tools/parse_special.py): malformed calls raise
ToolCallError, format-specific layouts parse, and round trips the shared harness cannot generate (string arguments,
documented tool parameters) are checked here against the official templates."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit import templates, tools
from alignkit.tools import ToolCallError
from tests import conformance_kit as ck
from tests import test_tool_parsers as shared

DS_B, DS_E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DC_B, DC_E, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
EOS = "<｜end▁of▁sentence｜>"


def ds(*bodies: str, close: bool = True) -> str:
    return DS_B + "\n".join(DC_B + b + DC_E for b in bodies) + (DS_E + EOS if close else "")


def r1_call(name: str, args: str) -> str:
    return f"function{DS_SEP}{name}\n```json\n{args}\n```"


def glm(name: str, **args: str) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args.items())
    return f"<tool_call>{name}\n{pairs}</tool_call>"


def r7b(items: str) -> str:
    return f"<|START_THINKING|>plan<|END_THINKING|><|START_ACTION|>[\n{items}\n]<|END_ACTION|><|END_OF_TURN_TOKEN|>"


def harmony(name: str, args: str) -> str:
    return f" to=functions.{name}<|channel|>commentary json<|message|>{args}<|call|>"


def plus(items: str) -> str:
    return f"Plan.\nAction:\n```json\n[\n{items}\n]```\n"


MALFORMED = {
    "gpt-oss": {
        "broken json": harmony("f", '{"a": 1'),
        "no name": " to=functions.<|channel|>commentary json<|message|>{}<|call|>",
        "arguments not an object": harmony("f", "[1, 2]"),
        "unterminated header": " to=functions.f<|channel|>commentary json",
        "garbage": harmony("f", "}}{{ not json"),
        "text after the arguments": harmony("f", "{} and more"),
        "no arguments": harmony("f", ""),
        "not json content type": " to=functions.f<|channel|>commentary <|constrain|>yaml<|message|>a: 1<|call|>",
    },
    "deepseek-r1": {
        "broken json": ds(r1_call("f", '{"a": ')),
        "no name": ds(r1_call("", "{}")),
        "arguments not an object": ds(r1_call("f", "[1]")),
        "arguments a json string": ds(r1_call("f", '"{}"')),
        "unterminated call block": ds(r1_call("f", "{}"), close=False),
        "unterminated call": DS_B + DC_B + r1_call("f", "{}") + DS_E,
        "garbage": ds("garbage"),
        "garbage between calls": DS_B + DC_B + r1_call("f", "{}") + DC_E + "junk" + DS_E,
        "call outside the section": DC_B + r1_call("f", "{}") + DC_E,
        "no json fence": ds(f"function{DS_SEP}f\n{{}}"),
        "fence not closed": ds(f"function{DS_SEP}f\n```json\n{{}}\n"),
        "wrong type": ds(r1_call("f", "{}").replace("function", "method", 1)),
        "empty section": DS_B + DS_E,
    },
    "deepseek-v3.1": {
        "broken json": ds(f"f{DS_SEP}{{nope"),
        "no name": ds(f"{DS_SEP}{{}}"),
        "arguments not an object": ds(f"f{DS_SEP}3"),
        "unterminated call block": ds(f"f{DS_SEP}{{}}", close=False),
        "garbage": ds("just text"),
        "text after the arguments": ds(f"f{DS_SEP}{{}} x"),
    },
    "glm-4.6": {
        "broken arguments": "<tool_call>f\n<arg_key>a</arg_key>\n<arg_val>1</arg_value>\n</tool_call>",
        "no name": glm("", a="1"),
        "duplicate argument": glm("f", a="1").replace(
            "</tool_call>", "<arg_key>a</arg_key><arg_value>2</arg_value></tool_call>"
        ),  # fmt: skip
        "unterminated call block": "\n<think></think>\n<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>",
        "garbage": "<tool_call>f\nsome garbage</tool_call>",
        "name over two lines": "<tool_call>f\ng\n</tool_call>",
        "stray closing tag": "text</tool_call>",
    },
    "command-r7b": {
        "broken json": r7b('    {"tool_call_id": "0", "tool_name": "f", "parameters": {'),
        "no name": r7b('    {"tool_call_id": "0", "parameters": {}}'),
        "arguments not an object": r7b('    {"tool_call_id": "0", "tool_name": "f", "parameters": [1]}'),
        "unterminated call block": '<|START_ACTION|>[{"tool_name": "f", "parameters": {}}]',
        "garbage": "<|START_ACTION|>garbage<|END_ACTION|>",
        "not a list": '<|START_ACTION|>{"tool_name": "f", "parameters": {}}<|END_ACTION|>',
        "item not an object": "<|START_ACTION|>[1]<|END_ACTION|>",
        "two action blocks": r7b('{"tool_name": "f", "parameters": {}}') + "<|START_ACTION|>[]<|END_ACTION|>",
    },
    "command-r-plus-tool-use": {
        "broken json": plus('{"tool_name": "f", "parameters": {]'),
        "no name": plus('{"parameters": {}}'),
        "arguments not an object": plus('{"tool_name": "f", "parameters": "x"}'),
        "unterminated call block": 'Action:\n```json\n[{"tool_name": "f", "parameters": {}}]',
        "garbage": "Action:\n```json\ngarbage```",
        "no fence": 'Action: [{"tool_name": "f", "parameters": {}}]',
    },
    "granite-3": {
        "broken json": '<|tool_call|>[{"name": "f", "arguments": {]',
        "no name": '<|tool_call|>[{"arguments": {}}]',
        "arguments not an object": '<|tool_call|>[{"name": "f", "arguments": 1}]',
        "unterminated call block": '<|tool_call|>[{"name": "f", "arguments": {}}',
        "garbage": "<|tool_call|>garbage",
        "text after the list": '<|tool_call|>[{"name": "f", "arguments": {}}] and more',
    },
}
MALFORMED["deepseek-v3"] = MALFORMED["deepseek-r1"]
CASES = [(fmt, what, text) for fmt, cases in MALFORMED.items() for what, text in cases.items()]


@pytest.mark.parametrize(("fmt", "what", "text"), CASES, ids=[f"{f}-{w}" for f, w, _ in CASES])
def test_malformed_calls_raise(fmt, what, text):
    with pytest.raises(ToolCallError):
        tools.parse_tool_calls(fmt, text)


@pytest.mark.parametrize("fmt", sorted(MALFORMED))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from(["<|start|>", "<|message|>", " to=functions.f", "<|channel|>", "<|call|>",
                                     DS_B, DS_E, DC_B, DC_E, DS_SEP, "```json", "```", "<tool_call>", "</tool_call>",
                                     "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<|START_ACTION|>",
                                     "<|END_ACTION|>", "Action:\n", "<|tool_call|>", "{", "}", "[", "]", '"', ":",
                                     ",", "1", "f", "\n", " ", "</think>"]), max_size=30).map("".join))  # fmt: skip
def test_fuzz_only_ever_raises_tool_call_error(fmt, text):
    try:
        calls = tools.parse_tool_calls(fmt, text)
    except ToolCallError:
        return
    assert isinstance(calls, list)
    assert all(isinstance(c["name"], str) and c["name"] and isinstance(c["arguments"], dict) for c in calls)


@pytest.mark.parametrize("fmt", sorted(MALFORMED))
def test_deep_nesting_is_a_tool_call_error(fmt):
    deep = "[" * 100_000
    text = {"glm-4.6": glm("f", a=deep), "deepseek-v3.1": ds(f"f{DS_SEP}{deep}")}.get(fmt, deep)
    text = {"gpt-oss": harmony("f", deep), "deepseek-r1": ds(r1_call("f", deep)), "deepseek-v3": ds(r1_call("f", deep)),
            "command-r7b": f"<|START_ACTION|>{deep}<|END_ACTION|>", "command-r-plus-tool-use": plus(deep),
            "granite-3": "<|tool_call|>" + deep}.get(fmt, text)  # fmt: skip
    try:
        calls = tools.parse_tool_calls(fmt, text)
    except ToolCallError:
        return
    assert calls == [{"name": "f", "arguments": {"a": deep}}]  # GLM: an unreadable value is kept as a string


# --- format-specific layouts --------------------------------------------------------------------------------------
def test_harmony_analysis_then_call_and_both_header_layouts():
    text = (
        "<|channel|>analysis<|message|>I should call f.<|end|><|start|>assistant"
        + harmony("f", '{"a": 1}')
        + '<|start|>assistant<|channel|>commentary to=functions.g <|constrain|>json<|message|>{"b": [2]}<|call|>'
    )
    want = [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": [2]}}]
    assert tools.parse_tool_calls("gpt-oss", text) == want
    # without the closing <|call|>, and a final answer alone
    assert tools.parse_tool_calls("gpt-oss", harmony("f", "{}")[: -len("<|call|>")]) == [{"name": "f", "arguments": {}}]
    assert tools.parse_tool_calls("gpt-oss", "<|channel|>final<|message|>to=functions.x is text<|return|>") == []


def test_deepseek_content_reasoning_and_several_calls():
    text = "<think>maybe " + DC_B + "</think>Let me check." + ds(r1_call("f", '{"a": 1}'), r1_call("g", "{}"))
    want = [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]
    assert tools.parse_tool_calls("deepseek-r1", text) == want
    assert tools.parse_tool_calls("deepseek-r1", text[: -len(EOS)]) == want  # end-of-turn marker left off
    assert tools.parse_tool_calls("deepseek-v3.1", "ok" + ds(f"f{DS_SEP}{{}}", f"g{DS_SEP}{{}}")) == [
        {"name": "f", "arguments": {}},
        {"name": "g", "arguments": {}},
    ]


def test_glm_values_reasoning_and_end_markers():
    text = "\n<think>I need <tool_call>x</tool_call>?</think>\nSure." + glm("f", city="Paris", n="3", obj='{"k": [1]}')
    want = [{"name": "f", "arguments": {"city": "Paris", "n": 3, "obj": {"k": [1]}}}]
    assert tools.parse_tool_calls("glm-4.6", text) == want
    assert tools.parse_tool_calls("glm-4.6", text + "<|observation|>") == want
    assert tools.parse_tool_calls("glm-4.6", glm("f") + glm("g", s=" a\nb ")) == [
        {"name": "f", "arguments": {}},
        {"name": "g", "arguments": {"s": " a\nb "}},
    ]


def test_cohere_and_granite_layouts():
    items = (
        '    {"tool_call_id": "0", "tool_name": "f", "parameters": {"a": 1}},\n'
        '    {"tool_call_id": "1", "tool_name": "g", "parameters": {}}'
    )
    want = [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]
    assert tools.parse_tool_calls("command-r7b", r7b(items)) == want
    assert tools.parse_tool_calls("command-r7b", "<|START_RESPONSE|>hi<|END_RESPONSE|>") == []
    p_items = '    {"tool_name": "f", "parameters": {"a": 1}},\n    {"tool_name": "g", "parameters": {}}'
    assert tools.parse_tool_calls("command-r-plus-tool-use", plus(p_items) + "<|END_OF_TURN_TOKEN|>") == want
    assert tools.parse_tool_calls("command-r-plus-tool-use", "The Action: was fine.") == []
    g = '<|tool_call|>[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]<|end_of_text|>'
    assert tools.parse_tool_calls("granite-3", g) == want


# --- round trips the shared harness cannot generate -------------------------------------------------------------
# DeepSeek-R1 / V3.1 templates concatenate `arguments` (a JSON string); Command R+ needs documented parameters.
DOCUMENTED_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city"}}, "required": ["city"]}}}]  # fmt: skip


@pytest.mark.skipif(not ck.HAVE_KIT, reason=ck.SKIP_REASON)
@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-v3.1", "command-r-plus-tool-use"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=shared._calls, content=st.one_of(st.just(""), st.text(st.sampled_from("ab c.\n"), min_size=1, max_size=8)))
def test_string_argument_round_trips_match_the_official_template(name, calls, content):
    fmt = templates.get_format(name)
    msg = shared._turn(calls, content)
    if name != "command-r-plus-tool-use":
        for tc in msg["tool_calls"]:
            tc["function"]["arguments"] = json.dumps(tc["function"]["arguments"], ensure_ascii=False)
    messages = [{"role": "user", "content": "What's the weather?"}, msg]
    sw = {"tools": DOCUMENTED_TOOLS} if "tools" in fmt.switches else {}
    (family,) = fmt.claims
    kw = {k: v for k, v in ck.format_switches_for(family).items() if k in fmt.switches}
    assert fmt.render(messages, **{**kw, **sw}).text == ck.reference_render(family, messages, False, **{**kw, **sw})
    assert tools.parse_tool_calls(name, shared._generated(fmt, messages, sw)) == calls
