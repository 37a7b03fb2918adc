"""Chat formats of Mistral AI's models: the original [INST] templates (Mistral 7B v0.1, Mixtral 8x7B, Mistral
7B v0.2), the tool-calling v3 templates (Mistral 7B v0.3 and the Tekken-tokenizer Nemo) and the v7 Tekken
template of Mistral Small 3.2 ([SYSTEM_PROMPT] with a dated default system prompt).

Quirks worth knowing before training on these formats (all reproduced here because the official
templates do them):
- v0.1 and Mixtral reject a system message; v0.2 folds it into the FIRST user turn.
- v0.3 and Nemo put the system message only in front of a user message that is the LAST message, so a
  conversation that ends with an assistant turn (all training data) silently loses its system prompt.
- v0.3 and Small 3.2 put the tool definitions before the last user message (and before any earlier user
  message equal to it).
"""

from __future__ import annotations

from typing import Any

from alignkit.templates._common import (
    ALTERNATION_ERROR,
    add_turn,
    check_alternation,
    first_message,
    required,
    template_date,
    tojson,
)
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register

ALTERNATION_AFTER_SYSTEM = (
    "After the optional system message, conversation roles must alternate user/assistant/user/assistant/..."
)
ONLY_USER_ASSISTANT = "Only user and assistant roles are supported!"
ONLY_USER_ASSISTANT_SYSTEM = (
    "Only user and assistant roles are supported, with the exception of an initial optional system message!"
)
BAD_TOOL_CALL_ID = "Tool call IDs should be alphanumeric strings with length 9!"

MISTRAL_SMALL_SYSTEM = """You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French \
startup headquartered in Paris.
Your knowledge base was last updated on 2023-10-01. The current date is {today}.

When you're not sure about some information or when the user's request requires up-to-date or specific data, you \
must use the available tools to fetch the information. Do not hesitate to use tools whenever they can provide a more \
accurate or complete response. If no relevant tools are available, then clearly state that you don't have the \
information and avoid making up anything.

If the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the \
question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. "What \
are some good restaurants around me?" => "Where are you?" or "When is the next flight to Tokyo" => "Where do you \
travel from?").
You are always very attentive to dates, and when asked about information at specific dates, you discard \
information that is at another date.
You follow these instructions in all languages, and always respond to the user in the language they use or request.
Next sections describe the capabilities that you have.

# WEB BROWSING INSTRUCTIONS

You cannot perform any web search or access internet to open URLs, links etc. If it seems like the user is \
expecting you to do so, you clarify the situation and ask the user to copy paste the text directly in the chat.

# MULTI-MODAL INSTRUCTIONS

You have the ability to read images, but you cannot generate images. You also cannot transcribe audio files or \
videos.
You cannot read nor transcribe audio files or videos.

# TOOL CALLING INSTRUCTIONS

You may have access to tools that you can use to fetch information or perform actions. You must use these tools in \
the following situations:

1. When the request requires up-to-date information.
2. When the request requires specific data that you do not have in your knowledge base.
3. When the request involves actions that you cannot perform without tools.

Always prioritize using tools to provide the most accurate and helpful response. If tools are not available, inform \
the user that you cannot perform the requested action at the moment."""


def _call_id(x: dict[str, Any], key: str) -> str:
    """A tool call id as the v3/v7 templates require it: a 9-character string."""
    v = x.get(key) if isinstance(x, dict) else None
    if not isinstance(v, str) or len(v) != 9:
        raise TemplateError(BAD_TOOL_CALL_ID)
    return v


def _function(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        raise TemplateError("each tool call needs a 'function' dict")
    return fn


def _split_system(messages: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, int]:
    """(the leading system message or None, index of the first other message)."""
    first = first_message(messages)
    return (first, 1) if first["role"] == "system" else (None, 0)


class _MistralV1(ChatFormat):
    """The original Mistral / Mixtral template: no system role, `[INST] user [/INST]answer</s>`."""

    after_eos = ""
    switches = {"bos_token": "<s>", "eos_token": "</s>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"])
        for i, m in enumerate(messages):
            role = m["role"]
            if (role == "user") != (i % 2 == 0):
                raise TemplateError(ALTERNATION_ERROR)  # a leading system message fails here, like the template
            if role == "user":
                b.add("[INST] " + required(m, i) + " [/INST]", msg=i, role=role)
            elif role == "assistant":
                add_turn(b, i, role, "", required(m, i), sw["eos_token"], self.after_eos)
            else:
                raise TemplateError(ONLY_USER_ASSISTANT)


@register
class MistralV01(_MistralV1):
    name = "mistral-v0.1"
    description = "Mistral 7B Instruct v0.1: <s>[INST] user [/INST]answer</s> ; no system role"
    claims = ("mistral-v0.1",)
    after_eos = " "  # the original template writes a space after every </s>


@register
class Mixtral(_MistralV1):
    name = "mixtral"
    description = "Mixtral 8x7B Instruct (original template): <s>[INST] user [/INST]answer</s>; no system role"
    claims = ("mixtral-8x7b-instruct",)


@register
class MistralV02(ChatFormat):
    name = "mistral-v0.2"
    description = "Mistral 7B Instruct v0.2: <s> [INST] system\\n\\nuser [/INST] answer</s>; system in first turn"
    claims = ("mistral-v0.2",)
    switches = {"bos_token": "<s>", "eos_token": "</s>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        system, start = _split_system(messages)
        b.add(sw["bos_token"])
        for k, m in enumerate(messages[start:]):
            i, role = start + k, m["role"]
            if (role == "user") != (k % 2 == 0):
                raise TemplateError(ALTERNATION_AFTER_SYSTEM)
            if role == "user":
                b.add(" [INST] ", msg=i, role=role)
                # A system message without content leaves `system_message` undefined: nothing is prepended.
                if k == 0 and system is not None and "content" in system:
                    b.add(system["content"] + "\n\n", msg=0, role="system")
                b.add(required(m, i) + " [/INST]", msg=i, role=role)
            elif role == "assistant":
                add_turn(b, i, role, " ", required(m, i), sw["eos_token"])
            else:
                raise TemplateError(ONLY_USER_ASSISTANT_SYSTEM)


class _MistralV3(ChatFormat):
    """The v3 tool-calling template (Mistral 7B v0.3) and its Tekken variant (Nemo), which differ only in the
    spaces after the control tokens and in whether assistant content is trimmed."""

    sp = " "
    trim_assistant = True
    switches = {"bos_token": "<s>", "eos_token": "</s>", "tools": None}

    def _tools_block(self, tools: list[dict[str, Any]]) -> str:
        # Hand-written JSON: string values are NOT escaped (unlike tojson), and a "return" key is dropped.
        defs = []
        for tool in tools:
            fn = _function(tool)
            fields = [
                f'"{key}": "{val}"' if isinstance(val, str) else f'"{key}": {tojson(val)}'
                for key, val in fn.items()
                if key != "return"
            ]
            defs.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
        return f"[AVAILABLE_TOOLS]{self.sp}[" + ", ".join(defs) + ("]" if defs else "") + "[/AVAILABLE_TOOLS]"

    def _tool_calls(self, calls: list[Any], eos: str) -> str:
        out = f"[TOOL_CALLS]{self.sp}["
        for n, call in enumerate(calls):
            # tojson of the function dict without its closing brace, then the id appended inside it.
            out += tojson(_function(call))[:-1] + ', "id": "' + _call_id(call, "id") + '"}'
            out += ", " if n < len(calls) - 1 else "]" + eos
        return out

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        system, start = _split_system(messages)
        loop = messages[start:]
        tools = sw.get("tools")
        users = [m for m in loop if m["role"] == "user"]
        check_alternation(loop, ALTERNATION_AFTER_SYSTEM, skip=lambda m: m["role"] == "tool" or "tool_calls" in m)
        b.add(sw["bos_token"])
        for k, m in enumerate(loop):
            i, role = start + k, m["role"]
            if role == "user":
                # Dict equality, as in the template: an earlier copy of the last user message gets tools too.
                if tools is not None and m == users[-1]:
                    b.add(self._tools_block(tools))
                b.add("[INST]" + self.sp, msg=i, role=role)
                # The system prompt goes only in front of a user message that is the very last message.
                if k == len(loop) - 1 and system is not None and "content" in system:
                    b.add(system["content"] + "\n\n", msg=0, role="system")
                b.add(required(m, i) + "[/INST]", msg=i, role=role)
            elif "tool_calls" in m:
                b.add(self._tool_calls(m["tool_calls"], sw["eos_token"]), msg=i, role=role, train=role == "assistant")
            elif role == "assistant":
                if self.trim_assistant:  # `| trim` of an undefined content is ""
                    add_turn(b, i, role, " ", m.get("content", "").strip(), sw["eos_token"])
                else:
                    add_turn(b, i, role, "", required(m, i), sw["eos_token"])
            elif role == "tool":
                text = f'[TOOL_RESULTS]{self.sp}{{"content": ' + m.get("content", "") + ", "
                text += '"call_id": "' + _call_id(m, "tool_call_id") + '"}[/TOOL_RESULTS]'
                b.add(text, msg=i, role=role)
            else:
                raise TemplateError(ONLY_USER_ASSISTANT_SYSTEM)


@register
class MistralV03(_MistralV3):
    name = "mistral-v0.3"
    description = "Mistral 7B Instruct v0.3: <s>[INST] user[/INST] answer</s>, system only before the last user turn"
    claims = ("mistral-v0.3",)


@register
class MistralNemo(_MistralV3):
    name = "mistral-nemo"
    description = "Mistral Nemo (Tekken): <s>[INST]user[/INST]answer</s>, system only before the last user turn"
    claims = ("mistral-nemo",)
    sp = ""
    trim_assistant = False


@register
class MistralSmall(ChatFormat):
    name = "mistral-small"
    description = "Mistral Small 3.2 (v7 Tekken): [SYSTEM_PROMPT] (dated default) [INST]user[/INST]answer</s>"
    claims = ("mistral-small-3.2",)
    switches = {"bos_token": "<s>", "eos_token": "</s>", "tools": None, "date_string": None}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        tools = sw.get("tools")
        b.add(sw["bos_token"])
        start = 1 if messages and messages[0]["role"] == "system" else 0
        loop = messages[start:]
        users = [m for m in loop if m["role"] == "user"]
        check_alternation(
            loop, ALTERNATION_AFTER_SYSTEM, skip=lambda m: m["role"] == "tool" or bool(m.get("tool_calls"))
        )
        # The dated default system prompt is used whenever the conversation has no system message.
        if start:
            system, owner = required(messages[0], 0), {"msg": 0, "role": "system"}
        else:
            system, owner = MISTRAL_SMALL_SYSTEM.format(today=template_date(sw["date_string"], "%Y-%m-%d")), {}
        b.add("[SYSTEM_PROMPT]" + system + "[/SYSTEM_PROMPT]", **owner)
        for k, m in enumerate(loop):
            i, role = start + k, m["role"]
            if role == "system":  # allowed in an assistant slot by the alternation check
                b.add("[SYSTEM_PROMPT]" + required(m, i) + "[/SYSTEM_PROMPT]", msg=i, role=role)
            elif role == "user":
                if tools is not None and m == users[-1]:
                    b.add("[AVAILABLE_TOOLS]" + tojson(tools) + "[/AVAILABLE_TOOLS]")
                b.add("[INST]" + m.get("content", "") + "[/INST]", msg=i, role=role)
            elif role == "assistant":
                text = ""
                for call in m.get("tool_calls") or ():
                    fn = _function(call)
                    if not isinstance(fn.get("name"), str):
                        raise TemplateError(f"messages[{i}]: each tool call needs function.name (str)")
                    text += "[TOOL_CALLS]" + fn["name"] + "[CALL_ID]" + _call_id(call, "id")
                    text += "[ARGS]" + tojson(required(fn, i, "arguments"))
                if not m.get("tool_calls"):
                    text = m.get("content", "")
                b.add(text + sw["eos_token"], msg=i, role=role, train=True)
            else:  # tool
                text = "[TOOL_RESULTS]" + _call_id(m, "tool_call_id") + "[TOOL_CONTENT]" + m.get("content", "")
                b.add(text + "[/TOOL_RESULTS]", msg=i, role=role)
