"""The JSON tool-call parsers (alignkit/tools/parse_json.py): malformed calls raise ToolCallError per format,
format-specific cases (several calls, content or reasoning before calls, end marker present or not, built-in
Llama tools), and a fuzz test that no input makes a parser raise anything but ToolCallError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit import tools
from alignkit.tools import ToolCallError

HERMES = ["qwen2.5", "qwen3", "qwq", "qwen3-vl", "hermes-3-tool-use"]
LLAMA3 = ["llama-3.1", "llama-3.2", "llama-3.3", "llama-3.2-vision", "llama-3.2-vision-early"]
LLAMA4 = ["llama-4", "llama-4-vlm"]
MISTRAL_V3 = ["mistral-v0.3", "mistral-nemo", "mistral-small-3.1"]
MISTRAL_V7 = ["mistral-small"]
END = {"hermes": "<|im_end|>", "llama3": "<|eot_id|>", "llama4": "<|eot|>", "v3": "</s>", "v7": "</s>"}
SYNTAX = {**dict.fromkeys(HERMES, "hermes"), **dict.fromkeys(LLAMA3, "llama3"), **dict.fromkeys(LLAMA4, "llama4"),
          **dict.fromkeys(MISTRAL_V3, "v3"), **dict.fromkeys(MISTRAL_V7, "v7")}  # fmt: skip
ALL = sorted(SYNTAX)

# One well-formed call per syntax, {"name": "f", "arguments": {"a": 1}}.
GOOD = {
    "hermes": '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
    "llama3": '{"name": "f", "parameters": {"a": 1}}',
    "llama4": '<|python_start|><|python_end|>{"name": "f", "parameters": {"a": 1}}',
    "v3": '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}, "id": "call00000"}]',
    "v7": '[TOOL_CALLS]f[CALL_ID]call00000[ARGS]{"a": 1}',
}
MALFORMED = {
    "hermes": {
        "broken json": '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
        "missing name": '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',
        "arguments not an object": '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
        "unterminated": '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n',
        "garbage": "<tool_call>\nget the weather please\n</tool_call>",
        "call not an object": '<tool_call>\n["f", {"a": 1}]\n</tool_call>',
        "empty name": '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
        "name not a string": '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        "unknown key": '<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>',
        "two objects in one block": '<tool_call>\n{"name": "f", "arguments": {}} {"name": "g", "arguments": {}}\n'
        "</tool_call>",
        "nested open": '<tool_call>\n{"name": "f", "arguments": {}}\n<tool_call>\n{"name": "g", "arguments": {}}\n'
        "</tool_call>",
        "stray close": 'ok</tool_call>\n{"name": "f"}',
        "string arguments not json": '<tool_call>\n{"name": "f", "arguments": "a=1"}\n</tool_call>',
    },
    "llama3": {
        "broken json": '{"name": "f", "parameters": {"a": 1}',
        "missing name": '{"parameters": {"a": 1}}',
        "arguments not an object": '{"name": "f", "parameters": 5}',
        "unterminated": '{"name": "f", "parameters": {"a": ',
        "garbage": "{get the weather}",
        "two calls": '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}',
        "text after the call": '{"name": "f", "parameters": {}} and then some words',
        "both argument keys": '{"name": "f", "parameters": {}, "arguments": {}}',
        "unknown key": '{"name": "f", "params": {}}',
        "builtin garbage": "<|python_tag|>import os; os.system('x')",
        "builtin bad arguments": "<|python_tag|>brave_search.call(query=1)",
    },
    "llama4": {
        "broken json": '<|python_start|><|python_end|>{"name": "f", "parameters": {"a": 1}',
        "missing name": '<|python_start|><|python_end|>{"parameters": {"a": 1}}',
        "arguments not an object": '<|python_start|><|python_end|>{"name": "f", "parameters": "no"}',
        "unterminated": '<|python_start|>{"name": "f", "parameters": {"a": 1}}',
        "garbage": "<|python_start|><|python_end|>call f with a=1",
        "no call after the block": "<|python_start|>thinking<|python_end|>",
        "stray end": 'ok<|python_end|>{"name": "f", "parameters": {}}',
        "text between calls": '<|python_start|><|python_end|>{"name": "f", "parameters": {}} and {"name": "g"}',
    },
    "v3": {
        "broken json": '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}]',
        "missing name": '[TOOL_CALLS] [{"arguments": {"a": 1}, "id": "call00000"}]',
        "arguments not an object": '[TOOL_CALLS] [{"name": "f", "arguments": true}]',
        "unterminated": '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}',
        "garbage": "[TOOL_CALLS] call f now",
        "not a list": '[TOOL_CALLS] {"name": "f", "arguments": {}}',
        "empty list": "[TOOL_CALLS] []",
        "element not an object": '[TOOL_CALLS] ["f"]',
        "text after the list": '[TOOL_CALLS] [{"name": "f", "arguments": {}}] done',
    },
    "v7": {
        "broken json": '[TOOL_CALLS]f[CALL_ID]call00000[ARGS]{"a": 1',
        "missing name": '[TOOL_CALLS][CALL_ID]call00000[ARGS]{"a": 1}',
        "arguments not an object": "[TOOL_CALLS]f[CALL_ID]call00000[ARGS][1]",
        "unterminated": "[TOOL_CALLS]f[CALL_ID]call00000",
        "garbage": "[TOOL_CALLS]call f with a=1",
        "empty arguments": "[TOOL_CALLS]f[ARGS]",
        "ids after args": '[TOOL_CALLS]f[ARGS]{"a": 1}[CALL_ID]call00000',
    },
}
CASES = [(name, kind, text) for name in ALL for kind, text in MALFORMED[SYNTAX[name]].items()]


@pytest.mark.parametrize(("name", "kind", "text"), CASES, ids=[f"{n}-{k}" for n, k, _ in CASES])
@pytest.mark.parametrize("end", [False, True])
def test_malformed_calls_raise_a_message_for_the_model(name, kind, text, end):
    text = text + (END[SYNTAX[name]] if end else "")
    with pytest.raises(ToolCallError) as e:
        tools.parse_tool_calls(name, text)
    assert str(e.value)  # a message the model can act on


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("end", ["", "END", "END\n"])
def test_one_good_call_with_or_without_end_marker(name, end):
    text = GOOD[SYNTAX[name]] + end.replace("END", END[SYNTAX[name]])
    assert tools.parse_tool_calls(name, text) == [{"name": "f", "arguments": {"a": 1}}]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("text", ["", "Hello!", "The answer is {42}.", "[1, 2]", "  \n"])
def test_content_without_calls_has_none(name, text):
    if SYNTAX[name] == "llama3" and text.startswith("{"):
        pytest.skip("a Llama 3 turn that starts with '{' is a call")
    assert tools.parse_tool_calls(name, text) == []
    assert tools.parse_tool_calls(name, text + END[SYNTAX[name]]) == []


def test_llama3_turn_starting_with_a_brace_is_read_as_a_call():
    with pytest.raises(ToolCallError):
        tools.parse_tool_calls("llama-3.1", "{42} is the answer<|eot_id|>")


# Format-specific cases ------------------------------------------------------------------------------------
F = {"name": "f", "arguments": {"a": 1}}
G = {"name": "g", "arguments": {"s": "x</tool_call>", "n": [None, {"k": 1.5}]}}


@pytest.mark.parametrize("name", HERMES)
def test_hermes_content_before_several_calls(name):
    text = (
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {"s": "x</tool_call>", "n": [null, {"k": 1.5}]}}\n</tool_call>'
    )
    # The JSON is decoded where it starts: a "</tool_call>" inside one of its strings does not end the block.
    assert tools.parse_tool_calls(name, text + "<|im_end|>") == [F, G]
    assert tools.parse_tool_calls(name, text + "\nand some text after<|im_end|>") == [F, G]


@pytest.mark.parametrize("name", HERMES)
def test_hermes_whitespace_around_json_and_missing_arguments(name):
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n\n<tool_call>  {"name": "g"}\n\n</tool_call>'
    assert tools.parse_tool_calls(name, text) == [F, {"name": "g", "arguments": {}}]


@pytest.mark.parametrize("name", HERMES)
def test_hermes_string_arguments_are_decoded(name):
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call><|im_end|>'
    assert tools.parse_tool_calls(name, text) == [F]


@pytest.mark.parametrize("name", ["qwen3", "qwq"])
def test_reasoning_before_calls(name):
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    # qwen3 writes the whole <think> block; qwq's generation prompt opens it, so the model writes only "...</think>".
    for think in ["<think>\nI could use <tool_call> here.\n</think>\n\n", "maybe <tool_call>{broken</think>\n\n"]:
        assert tools.parse_tool_calls(name, think + "ok\n" + call + "<|im_end|>") == [F]
        assert tools.parse_tool_calls(name, think + "no call<|im_end|>") == []


def test_reasoning_is_not_skipped_where_the_format_has_none():
    with pytest.raises(ToolCallError):
        tools.parse_tool_calls("qwen2.5", "<tool_call>{broken</think>\nhi")


@pytest.mark.parametrize("name", LLAMA3)
def test_llama3_variants(name):
    assert tools.parse_tool_calls(name, ' {"name": "f", "parameters": {"a": 1}} \n<|eot_id|>') == [F]
    # "arguments" instead of "parameters", a "type" key, a leading <|python_tag|>, <|eom_id|>: real Llama output.
    text = '<|python_tag|>{"type": "function", "name": "f", "arguments": {"a": 1}}<|eom_id|>'
    assert tools.parse_tool_calls(name, text) == [F]
    assert tools.parse_tool_calls(name, '{"name": "f", "parameters": "{\\"a\\": 1}"}') == [F]


@pytest.mark.parametrize("name", ["llama-3.1", "llama-3.3"])
def test_llama3_builtin_tool_call(name):
    text = '<|python_tag|>brave_search.call(query="weather, in Paris", n="3")<|eom_id|>'
    want = [{"name": "brave_search", "arguments": {"query": "weather, in Paris", "n": "3"}}]
    assert tools.parse_tool_calls(name, text) == want
    assert tools.parse_tool_calls(name, "<|python_tag|>wolfram_alpha.call()") == [
        {"name": "wolfram_alpha", "arguments": {}}
    ]


@pytest.mark.parametrize("name", LLAMA4)
def test_llama4_content_and_several_calls(name):
    text = '<|python_start|>Let me check.<|python_end|>{"name": "f", "parameters": {"a": 1}}\n{"name": "g", '
    text += '"parameters": {"s": "x</tool_call>", "n": [null, {"k": 1.5}]}}<|eot|>'
    assert tools.parse_tool_calls(name, text) == [F, G]


@pytest.mark.parametrize("name", MISTRAL_V3)
def test_mistral_v3_several_calls_spacing_and_content(name):
    text = '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}, "id": "call00000"}, {"name": "g", "arguments": '
    text += '{"s": "x</tool_call>", "n": [null, {"k": 1.5}]}}]</s>'
    assert tools.parse_tool_calls(name, text) == [F, G]
    assert tools.parse_tool_calls(name, "Sure. " + text.replace("[TOOL_CALLS]", "[TOOL_CALLS]  \n")) == [F, G]
    assert tools.parse_tool_calls(name, '[TOOL_CALLS] [{"name": "f", "arguments": "{\\"a\\": 1}"}]') == [F]
    want = [{"name": "f", "arguments": {"s": "[TOOL_CALLS] []"}}]
    assert tools.parse_tool_calls(name, '[TOOL_CALLS] [{"name": "f", "arguments": {"s": "[TOOL_CALLS] []"}}]') == want


def test_mistral_v7_several_calls_with_and_without_ids():
    text = '[TOOL_CALLS]f[CALL_ID]call00000[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{"s": "x</tool_call>", '
    text += '"n": [null, {"k": 1.5}]}</s>'
    assert tools.parse_tool_calls("mistral-small", text) == [F, G]
    assert tools.parse_tool_calls("mistral-small", '[TOOL_CALLS]f[ARGS]"{\\"a\\": 1}"') == [F]
    # Markers inside a JSON string are not markers.
    want = [{"name": "f", "arguments": {"s": "[TOOL_CALLS]g[ARGS]{}"}}]
    assert tools.parse_tool_calls("mistral-small", '[TOOL_CALLS]f[ARGS]{"s": "[TOOL_CALLS]g[ARGS]{}"}</s>') == want


@pytest.mark.parametrize("name", ALL)
def test_hostile_json_is_a_tool_call_error(name):
    deep = "[" * 100_000 + "]" * 100_000
    huge = "1" * 10_000
    for args in [deep, huge, '{"a": ' + huge + "}"]:
        text = {
            "hermes": '<tool_call>{"name": "f", "arguments": ' + args + "}</tool_call>",
            "llama3": '{"name": "f", "parameters": ' + args + "}",
            "llama4": '<|python_start|><|python_end|>{"name": "f", "parameters": ' + args + "}",
            "v3": '[TOOL_CALLS] [{"name": "f", "arguments": ' + args + "}]",
            "v7": "[TOOL_CALLS]f[ARGS]" + args,
        }[SYNTAX[name]]
        with pytest.raises(ToolCallError):
            tools.parse_tool_calls(name, text)
    with pytest.raises(ToolCallError):  # a JSON string of deeply nested arguments
        tools.parse_tool_calls(name, GOOD[SYNTAX[name]].replace('{"a": 1}', '"' + deep + '"'))


_PIECES = st.sampled_from(
    ["<tool_call>", "</tool_call>", "<think>", "</think>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|eot|>",
     "<|python_tag|>", "<|python_start|>", "<|python_end|>", "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]", "</s>", "{", "}",
     "[", "]", '"', ":", ",", " ", "\n", '"name"', '"arguments"', '"parameters"', '"f"', "1", "null", "x", ".call(",
     ")", "=", "\\", "\ud7ff", "f"]
)  # fmt: skip


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(_PIECES, max_size=30), good=st.booleans())
def test_fuzz_only_tool_call_errors(name, pieces, good):
    text = (GOOD[SYNTAX[name]] if good else "") + "".join(pieces)
    try:
        calls = tools.parse_tool_calls(name, text)
    except ToolCallError as e:
        assert str(e)
        return
    assert isinstance(calls, list)
    for c in calls:
        assert set(c) == {"name", "arguments"} and isinstance(c["name"], str) and c["name"]
        assert isinstance(c["arguments"], dict)
