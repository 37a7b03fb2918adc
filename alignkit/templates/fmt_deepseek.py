"""DeepSeek chat formats.

Two lineages:
- DeepSeek-LLM / V2 chat: plain "User: ...\\n\\nAssistant: ...<eos>" text.
- V2.5 / V3 / R1 / R1-distill / V3.1: full-width-bar special tokens (<｜User｜>, <｜Assistant｜>), every system
  message hoisted right after BOS, tool outputs wrapped in <｜tool▁output▁begin｜>... blocks. The official
  templates differ in small, deliberate-looking ways (which system messages survive, reasoning stripping,
  separators, stray newlines); `_BarFormat` captures them as class attributes.

The official templates concatenate `message['content']` with strings, so a message without content (or
with `content=None`, which transformers drops) makes them raise; we raise TemplateError in the same places.
"""

from __future__ import annotations

from typing import Any

from alignkit.templates._common import add_turn, required
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, CALL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"


def _str_field(value: Any, what: str, i: int) -> str:
    if not isinstance(value, str):
        raise TemplateError(f"messages[{i}]: tool call {what} must be a string, got {type(value).__name__}")
    return value


def _call_parts(tc: Any, i: int) -> tuple[Any, str, str]:
    """(type, function name, arguments string) of one tool call."""
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict):
        raise TemplateError(f"messages[{i}]: each tool call needs a 'function' dict with 'name' and 'arguments'")
    return tc.get("type"), _str_field(fn.get("name"), "name", i), _str_field(fn.get("arguments"), "arguments", i)


def _system_prompt(b: Builder, messages: list[dict[str, Any]], join: str | None) -> None:
    """Hoisted system prompt: all system messages joined by `join`, or (join=None) only the last one."""
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if join is None:
        if systems:  # a missing content renders as "" here (plain assignment, no concatenation)
            b.add(messages[systems[-1]].get("content", ""), msg=systems[-1], role="system")
        return
    for k, i in enumerate(systems):
        b.add((join if k else "") + required(messages[i], i), msg=i, role="system")


@register
class DeepSeekV2(ChatFormat):
    """DeepSeek-LLM-7B-chat / DeepSeek-V2(-Lite)-Chat: "User: q\\n\\nAssistant: a<eos>", system text raw."""

    name = "deepseek-v2"
    description = "DeepSeek-LLM / DeepSeek-V2 chat: 'User: ...\\n\\nAssistant: ...<｜end▁of▁sentence｜>'"
    claims = ("deepseek-v2",)
    switches = {"bos_token": BOS, "eos_token": EOS}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"])
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "user":
                b.add("User: " + required(m, i) + "\n\n", msg=i, role=role)
            elif role == "assistant":
                add_turn(b, i, role, "Assistant: ", required(m, i), sw["eos_token"])
            elif role == "system":
                b.add(required(m, i) + "\n\n", msg=i, role=role)
            # tool messages: the template has no branch for them
        if add_generation_prompt:
            b.add("Assistant:")


class _BarFormat(ChatFormat):
    """V2.5 / V3 / R1 / R1-distill templates (one code path, quirks as class attributes)."""

    switches = {"bos_token": BOS}
    system_join: str | None = "\n\n"  # None: only the LAST system message is kept
    system_indent = ""  # V2.5: 8 stray spaces per system message, before BOS (template whitespace bug)
    after_bos = ""  # R1-distill-Qwen: "\n" (multi-line template without whitespace control)
    tail = ""  # R1-distill-Qwen: "\n" after the closing tool-outputs marker and after the generation prompt
    output_sep = "\n"  # between consecutive tool outputs (R1: none)
    strip_think = False  # keep only the text after the last </think> in plain assistant turns
    tool_calls = False  # R1 renders `tool_calls`; in the others that branch is only reached for content=None,
    # which transformers drops, so it is dead code

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(self.system_indent * sum(m["role"] == "system" for m in messages))
        b.add(sw["bos_token"] + self.after_bos)
        _system_prompt(b, messages, self.system_join)
        is_tool, first_output, first_call = False, True, True  # first_* are never reset (template behaviour)
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "user":
                is_tool = False
                b.add(USER + required(m, i), msg=i, role=role)
            elif role == "assistant" and self.tool_calls and "tool_calls" in m:
                is_tool = False
                first_call = self._render_calls(b, i, m, first_call)
            elif role == "assistant":
                content = required(m, i)
                if is_tool:
                    is_tool = False
                    b.add(OUTPUTS_END, msg=i, role=role)
                else:
                    if self.strip_think and "</think>" in content:
                        content = content.split("</think>")[-1]
                    b.add(ASSISTANT, msg=i, role=role)
                b.add(content + EOS, msg=i, role=role, train=True)
            elif role == "tool":
                is_tool = True
                opener = OUTPUTS_BEGIN if first_output else self.output_sep
                first_output = False
                b.add(opener + OUTPUT_BEGIN + required(m, i) + OUTPUT_END, msg=i, role=role)
        if is_tool:
            b.add(OUTPUTS_END + self.tail)
        if add_generation_prompt and not is_tool:
            b.add(ASSISTANT + self.tail)

    @staticmethod
    def _render_calls(b: Builder, i: int, m: dict[str, Any], first_call: bool) -> bool:
        """R1 tool-call turn. Only the very first call of the conversation opens with <｜Assistant｜>."""
        for tc in m["tool_calls"]:
            kind, fn_name, args = _call_parts(tc, i)
            if not isinstance(kind, str):
                raise TemplateError(f"messages[{i}]: tool call 'type' must be a string")
            call = CALL_BEGIN + kind + CALL_SEP + fn_name + "\n```json\n" + args + "\n```" + CALL_END
            if first_call:
                b.add(ASSISTANT, msg=i, role="assistant")
                b.add(required(m, i) + CALLS_BEGIN + call, msg=i, role="assistant", train=True)
                first_call = False
            else:
                b.add("\n" + call, msg=i, role="assistant", train=True)
        b.add(CALLS_END + EOS, msg=i, role="assistant", train=True)
        return first_call


@register
class DeepSeekV25(_BarFormat):
    name = "deepseek-v2.5"
    description = "DeepSeek-V2.5: <｜User｜>/<｜Assistant｜>, last system message hoisted (with the 8-space quirk)"
    claims = ("deepseek-v2.5",)
    system_join = None
    system_indent = " " * 8


@register
class DeepSeekV3(_BarFormat):
    name = "deepseek-v3"
    description = "DeepSeek-V3: <｜User｜>/<｜Assistant｜>, all system messages joined and hoisted after BOS"
    claims = ("deepseek-v3",)


@register
class DeepSeekR1(_BarFormat):
    name = "deepseek-r1"
    description = "DeepSeek-R1: like V3, reasoning before </think> stripped from assistant turns, tool calls"
    claims = ("deepseek-r1",)
    output_sep = ""
    strip_think = True
    tool_calls = True


@register
class DeepSeekR1DistillLlama(_BarFormat):
    name = "deepseek-r1-distill-llama"
    description = "DeepSeek-R1-Distill-Llama: R1 markers, last system message only, reasoning stripped"
    claims = ("deepseek-r1-distill-llama",)
    system_join = None
    strip_think = True


@register
class DeepSeekR1DistillQwen(DeepSeekR1DistillLlama):
    name = "deepseek-r1-distill-qwen"
    description = "DeepSeek-R1-Distill-Qwen: as R1-Distill-Llama plus the template's stray newlines"
    claims = ("deepseek-r1-distill-qwen",)
    after_bos = "\n"
    tail = "\n"


@register
class DeepSeekV31(ChatFormat):
    """DeepSeek-V3.1 hybrid thinking: history turns open with "<｜Assistant｜></think>" (non-thinking marker).

    `thinking=True` makes the generation prompt end with "<think>" instead of "</think>" (and so does an
    assistant message with `prefix=True`). The text before the first </think> of an assistant turn is dropped.
    """

    name = "deepseek-v3.1"
    description = "DeepSeek-V3.1: <｜Assistant｜></think> turns, `thinking` switch, reasoning stripped"
    claims = ("deepseek-v3.1",)
    switches = {"bos_token": BOS, "thinking": False}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        thinking = sw["thinking"]
        b.add(sw["bos_token"])
        _system_prompt(b, messages, "\n\n")
        is_tool = last_user = False
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "user":
                is_tool, last_user = False, True
                b.add(USER + required(m, i), msg=i, role=role)
            elif role == "assistant" and "tool_calls" in m:
                if last_user:
                    b.add(ASSISTANT + "</think>", msg=i, role=role)
                is_tool = last_user = False
                for k, tc in enumerate(m["tool_calls"]):
                    _, fn_name, args = _call_parts(tc, i)
                    head = required(m, i) + CALLS_BEGIN if k == 0 else ""
                    b.add(head + CALL_BEGIN + fn_name + CALL_SEP + args + CALL_END, msg=i, role=role, train=True)
                b.add(CALLS_END + EOS, msg=i, role=role, train=True)
            elif role == "assistant":
                if last_user:
                    think = "<think>" if m.get("prefix") and thinking else "</think>"
                    b.add(ASSISTANT + think, msg=i, role=role)
                last_user = False
                content = required(m, i)
                if is_tool:
                    is_tool = False
                elif "</think>" in content:
                    content = content.split("</think>", 1)[1]
                b.add(content + EOS, msg=i, role=role, train=True)
            elif role == "tool":
                is_tool, last_user = True, False
                b.add(OUTPUT_BEGIN + required(m, i) + OUTPUT_END, msg=i, role=role)
        if add_generation_prompt and last_user and not is_tool:
            b.add(ASSISTANT + ("<think>" if thinking else "</think>"))
