"""Tool-call parsing round trips: render an assistant turn with tool calls, take the text the model would generate
(the turn's trainable span), parse it back to the same calls. Where the format claims an official template, the
render is first checked against it byte for byte (tool conversations are not in the kit's goldens, so this is
their conformance test too). Plus: function schemas from type hints and docstrings."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from alignkit import templates, tools
from alignkit.templates import TemplateError
from tests import conformance_kit as ck

REQUIRED = {"qwen2.5", "qwen3", "hermes-3-tool-use", "llama-3.1", "llama-3.2", "llama-3.3", "mistral-v0.3",
            "gpt-oss", "deepseek-v3", "deepseek-r1", "glm-4.6", "command-r7b"}  # fmt: skip
FORMATS = tools.tool_formats()

_names = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
_scalars = st.one_of(
    st.integers(-10**6, 10**6), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda x: round(x, 3)),
    # not the characters str.splitlines breaks at: templates that indent JSON (Command R+) split lines that way
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
            max_size=12),
)  # fmt: skip
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner, max_size=2),
                       max_leaves=6)  # fmt: skip
_arguments = st.dictionaries(_names, _values, max_size=3)
_calls = st.lists(st.fixed_dictionaries({"name": _names, "arguments": _arguments}), min_size=1, max_size=3)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
        "required": ["city"]}}},
]  # fmt: skip
# formats that print a string argument raw and other values as JSON: the string "false" and False look alike
RAW_STRING_ARGUMENTS = {"glm-4.6"}


def _turn(calls: list[dict], content: str | None, as_json: bool = False) -> dict:
    """An assistant message with ``calls`` (arguments as dicts, or JSON strings as some templates expect)."""
    msg: dict = {"role": "assistant", "tool_calls": [
        {"id": f"call{k:05d}", "type": "function", "function": {
            "name": c["name"], "arguments": json.dumps(c["arguments"]) if as_json else c["arguments"]}}
        for k, c in enumerate(calls)]}  # fmt: skip
    if content is not None:
        msg["content"] = content
    return msg


def _generated(fmt, messages: list[dict], sw: dict) -> str:
    """The last assistant message's trainable text as the format renders it (what the model generates)."""
    r = fmt.render(messages, **sw)
    last = len(messages) - 1
    return "".join(r.text[s.start : s.end] for s in r.spans if s.trainable and s.message_index == last)


def _switches(fmt) -> dict:
    sw = {"tools": TOOLS} if "tools" in fmt.switches else {}
    if "date_string" in fmt.switches:
        sw["date_string"] = ck.DATE_STRING
    return sw


def _official_matches(fmt, messages: list[dict], sw: dict) -> None:
    """Where the format claims official templates (text or processor): the same text, or, the template refusing,
    a TemplateError; our refusing where the template renders fails."""
    claims = [(f, ck.KIT) for f in fmt.claims] + [(f, ck.VLM_KIT) for f in fmt.vlm_claims]
    for family, kit in claims:
        kw = {k: v for k, v in ck.format_switches_for(family, kit).items() if k in fmt.switches}
        extra = {"tools": TOOLS} if "tools" in sw else {}
        try:
            want = ck.reference_render(family, messages, False, kit=kit, **{**kw, **extra})
        except Exception:  # noqa: BLE001 - the official template refuses this conversation
            with pytest.raises(TemplateError):
                fmt.render(messages, **{**kw, **sw})
            assume(False)
        assert fmt.render(messages, **{**kw, **sw}).text == want, (fmt.name, family)


def test_every_required_format_has_a_parser():
    assert REQUIRED <= set(FORMATS), sorted(REQUIRED - set(FORMATS))


def _writes_calls(name: str) -> bool:
    """Whether the format (like its official template) writes a tool call at all, for dict or string arguments:
    an assistant turn with a call renders differently from the same turn without it."""
    fmt = templates.get_format(name)
    user = {"role": "user", "content": "q"}
    try:
        without = _generated(fmt, [user, {"role": "assistant", "content": "a"}], _switches(fmt))
    except TemplateError:
        return False
    for as_json in (False, True):
        try:
            turn = _turn([{"name": "f", "arguments": {"x": 1}}], "a", as_json)
            if _generated(fmt, [user, turn], _switches(fmt)) != without:
                return True
        except TemplateError:
            continue
    return False


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


_contents = st.one_of(st.none(), st.just(""), st.text(st.sampled_from("ab c.\n"), min_size=1, max_size=8))


@pytest.mark.skipif(not ck.HAVE_KIT, reason=ck.SKIP_REASON)
@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(calls=_calls, content=_contents, as_json=st.booleans())
def test_rendered_calls_parse_back(name, calls, content, as_json):
    if not _writes_calls(name):
        pytest.skip(f"{name}'s official template writes no tool calls (it drops them); its parser reads the syntax "
                    "its model family documents (tests/test_tool_parsers_special.py)")  # fmt: skip
    if name in RAW_STRING_ARGUMENTS:
        assume(not any(isinstance(v, str) and _is_json(v) for c in calls for v in c["arguments"].values()))
    fmt = templates.get_format(name)
    messages = [{"role": "user", "content": "What's the weather?"}, _turn(calls, content, as_json)]
    sw = _switches(fmt)
    _official_matches(fmt, messages, sw)  # first: a refusal of ours must be the official template's too
    try:
        generated = _generated(fmt, messages, sw)
        if len(calls) > 1:  # a template that writes only some calls (gpt-oss: the first) cannot round-trip more
            assume(_generated(fmt, [messages[0], _turn(calls[:-1], content, as_json)], sw) != generated)
    except TemplateError:
        assume(False)  # this format (and its template, where it claims one) refuses the conversation
    assert tools.parse_tool_calls(name, generated) == calls, generated


@pytest.mark.parametrize("name", FORMATS)
def test_text_without_calls_has_none(name):
    fmt = templates.get_format(name)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! No tools needed."}]
    assert tools.parse_tool_calls(name, _generated(fmt, messages, _switches(fmt))) == []


def test_unknown_format_names_the_ones_with_parsers():
    with pytest.raises(KeyError, match="has no tool-call parser; formats with one"):
        tools.parse_tool_calls("alpaca", "x")


def test_function_schema_from_hints_and_docstring():
    def multiply(a: int, b: int, unit: Literal["m", "km"] = "m", note: str | None = None) -> int:
        """Multiply two integers.

        More text that is not the description.

        Args:
            a: the first factor
            b (int): the second factor,
                on two lines
            unit: a unit
        """
        return a * b

    s = tools.function_schema(multiply)
    assert s == {"type": "function", "function": {
        "name": "multiply", "description": "Multiply two integers.", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "description": "the first factor"},
            "b": {"type": "integer", "description": "the second factor, on two lines"},
            "unit": {"enum": ["m", "km"], "type": "string", "description": "a unit"},
            "note": {"type": "string"}}, "required": ["a", "b"]}}}  # fmt: skip

    def untyped(x):  # noqa: ANN001, ANN202
        return x

    with pytest.raises(TypeError, match="parameter 'x' has no type annotation"):
        tools.function_schema(untyped)
