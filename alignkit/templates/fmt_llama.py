"""Chat formats of Meta's Llama models: Llama 2 ([INST] + <<SYS>>), Llama 3 (header / <|eot_id|>),
Llama 3.1 / 3.2 / 3.3 (always-on system header with the knowledge-cutoff and today's date, JSON tool calls)
and Llama 4 (<|header_start|> / <|eot|>).

Each renderer mirrors its official Jinja template line by line; the comments name the template quirks that
are easy to get wrong (where `.strip()` applies, which message a default text belongs to, when it raises).
"""

from __future__ import annotations

from typing import Any

from alignkit.templates._common import (
    ALTERNATION_ERROR,
    LLAMA_DATE,
    add_turn,
    first_message,
    required,
    template_date,
    tojson,
)
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register

NO_FIRST_USER = "Cannot put tools in the first user message when there's no first user message!"
SINGLE_TOOL_CALL = "This model only supports single tool-calls at once!"
TOOLS_PREAMBLE = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
TOOLS_IN_SYSTEM = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    + TOOLS_PREAMBLE
)
TOOLS_IN_USER = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n" + TOOLS_PREAMBLE
)


def _function(call: Any, i: int) -> dict[str, Any]:
    """The `function` dict of one OpenAI-style tool call, with the keys the templates read."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
        raise TemplateError(f"messages[{i}]: each tool call needs function.name (str) and function.arguments")
    return fn


def tool_definitions(tools: Any) -> str:
    """Each tool as indented JSON followed by a blank line (`t | tojson(indent=4)`)."""
    return "".join(tojson(t, indent=4) + "\n\n" for t in tools)


def _strip_joined(b: Builder, pieces: list[tuple[str, int | None, str | None]]) -> None:
    """Add `"".join(pieces).strip()`, keeping each surviving character's label.

    Llama 2 strips the system block and the first user message as ONE string, so an all-whitespace user
    message also eats the blank line after <</SYS>>.
    """
    whole = "".join(p[0] for p in pieces)
    lo = len(whole) - len(whole.lstrip())
    hi = max(lo, len(whole.rstrip()))
    pos = 0
    for text, msg, role in pieces:
        start, end = max(lo, pos), min(hi, pos + len(text))
        if start < end:
            b.add(whole[start:end], msg=msg, role=role)
        pos += len(text)


@register
class Llama2(ChatFormat):
    name = "llama-2"
    description = "Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>; strict alternation"
    claims = ("llama-2-chat",)
    switches = {"bos_token": "<s>", "eos_token": "</s>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        start = 1 if first_message(messages)["role"] == "system" else 0
        for k, m in enumerate(messages[start:]):
            i, role = start + k, m["role"]
            if (role == "user") != (k % 2 == 0):
                raise TemplateError(ALTERNATION_ERROR)
            if role not in ("user", "assistant"):
                continue  # a system/tool message in an assistant slot renders nothing
            if role == "user":
                b.add(sw["bos_token"])
                b.add("[INST] ", msg=i, role=role)
                pieces = [(required(m, i), i, role)]
                if k == 0 and start:
                    sys_block = "<<SYS>>\n" + required(messages[0], 0) + "\n<</SYS>>\n\n"
                    pieces.insert(0, (sys_block, 0, "system"))
                _strip_joined(b, pieces)
                b.add(" [/INST]", msg=i, role=role)
            else:
                add_turn(b, i, role, " ", required(m, i).strip(), " " + sw["eos_token"])
        # add_generation_prompt has no effect: the prompt already ends with [/INST].


@register
class Llama3(ChatFormat):
    name = "llama-3"
    description = "Llama 3 instruct: <|start_header_id|>role<|end_header_id|>\\n\\n content|trim <|eot_id|>"
    claims = ("llama-3-instruct",)
    switches = {"bos_token": "<|begin_of_text|>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if messages:
            b.add(sw["bos_token"])
        for i, m in enumerate(messages):
            role = m["role"]
            # `content | trim` of a missing content is "" (the filter stringifies Undefined).
            header = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            add_turn(b, i, role, header, m.get("content", "").strip(), "<|eot_id|>")
        if add_generation_prompt:
            b.add("<|start_header_id|>assistant<|end_header_id|>\n\n")


class _LlamaToolsBase(ChatFormat):
    """Shared machinery of the Llama 3.1+ templates: system extraction, tool definitions in the system or the
    first user message, tool calls and tool results. Subclasses set the header tokens and the system block."""

    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    eot = "<|eot_id|>"

    def _h(self, role: str) -> str:
        return self.header.format(role)

    def _system_block(self, b: Builder, system: str | None, sw: dict) -> None:
        raise NotImplementedError

    def _message(self, b: Builder, i: int, m: dict[str, Any], sw: dict) -> None:
        raise NotImplementedError

    def _tool_result(self, b: Builder, i: int, m: dict[str, Any]) -> None:
        # `content is mapping or content is iterable` is true for a string too, so it is JSON-quoted.
        b.add(self._h("ipython"), msg=i, role="tool")
        b.add(tojson(required(m, i)) + self.eot, msg=i, role="tool")

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"])
        system = None
        start = 0
        if first_message(messages)["role"] == "system":
            system, start = self._system_text(messages[0]), 1
        self._system_block(b, system, sw)
        self._turns(b, messages, self._tools_turn(b, messages, start, sw), add_generation_prompt, sw)

    def _tools_turn(self, b: Builder, messages: list[dict[str, Any]], start: int, sw: dict) -> int:
        """With tools in the user message: the first message after the system one (whatever its role) becomes
        the user turn carrying them. Returns the index of the next message to render."""
        tools = sw.get("tools")
        if tools is None or not sw.get("tools_in_user_message", True):
            return start
        if start >= len(messages):
            raise TemplateError(NO_FIRST_USER)
        first = messages[start]
        b.add(self._h("user"), msg=start, role=first["role"])
        b.add(TOOLS_IN_USER + tool_definitions(tools))
        b.add(self._trimmed_content(first) + self.eot, msg=start, role=first["role"])
        return start + 1

    def _turns(
        self, b: Builder, messages: list[dict[str, Any]], start: int, add_generation_prompt: bool, sw: dict
    ) -> None:
        for i in range(start, len(messages)):
            m = messages[i]
            if m["role"] == "tool" and "tool_calls" not in m:
                self._tool_result(b, i, m)
            else:
                self._message(b, i, m, sw)
        if add_generation_prompt:
            b.add(self._h("assistant"))

    @staticmethod
    def _trimmed_content(m: dict[str, Any]) -> str:
        """``m['content'] | trim`` where the template trims a message's content."""
        return m.get("content", "").strip()

    _system_text = _trimmed_content


@register
class Llama31(_LlamaToolsBase):
    name = "llama-3.1"
    description = "Llama 3.1: Llama 3 headers + a system block with knowledge cutoff and date; JSON / built-in tools"
    claims = ("llama-3.1",)
    switches = {
        "bos_token": "<|begin_of_text|>",
        "date_string": "26 Jul 2024",
        "tools": None,
        "tools_in_user_message": True,
        "builtin_tools": None,
    }

    def _date(self, sw: dict) -> str:
        # The 3.1 / 3.3 templates default to a fixed date, not today.
        return "26 Jul 2024" if sw["date_string"] is None else template_date(sw["date_string"], LLAMA_DATE, parse=())

    def _system_block(self, b: Builder, system: str | None, sw: dict) -> None:
        owner = {"msg": 0, "role": "system"} if system is not None else {}
        tools, builtin = sw.get("tools"), sw.get("builtin_tools")
        b.add(self._h("system"), **owner)
        if builtin is not None or tools is not None:
            b.add("Environment: ipython\n")
        if builtin is not None:
            b.add("Tools: " + ", ".join(t for t in builtin if t != "code_interpreter") + "\n\n")
        b.add("Cutting Knowledge Date: December 2023\nToday Date: " + self._date(sw) + "\n\n")
        if tools is not None and not sw.get("tools_in_user_message", True):
            b.add(TOOLS_IN_SYSTEM + tool_definitions(tools))
        b.add((system or "") + self.eot, **owner)

    def _message(self, b: Builder, i: int, m: dict[str, Any], sw: dict) -> None:
        role = m["role"]
        if "tool_calls" not in m:
            add_turn(b, i, role, self._h(role), m.get("content", "").strip(), self.eot)
            return
        if len(m["tool_calls"]) != 1:
            raise TemplateError(SINGLE_TOOL_CALL)
        fn = _function(m["tool_calls"][0], i)
        builtin = sw.get("builtin_tools")
        if builtin is not None and fn["name"] in builtin:
            args = fn["arguments"]
            if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
                raise TemplateError(f"messages[{i}]: built-in tool call arguments must be a dict of strings")
            call = "<|python_tag|>" + fn["name"] + ".call(" + ", ".join(f'{k}="{v}"' for k, v in args.items()) + ")"
        else:
            call = '{"name": "' + fn["name"] + '", "parameters": ' + tojson(fn["arguments"]) + "}"
        # Built-in tool mode ends a tool call with <|eom_id|> (the model expects a result back).
        add_turn(b, i, role, self._h("assistant"), call, "<|eom_id|>" if builtin is not None else self.eot)


@register
class Llama32(Llama31):
    name = "llama-3.2"
    description = "Llama 3.2: like 3.1 without built-in tools; Today Date defaults to the current date"
    claims = ("llama-3.2",)
    switches = {"bos_token": "<|begin_of_text|>", "date_string": None, "tools": None, "tools_in_user_message": True}

    def _date(self, sw: dict) -> str:
        # The template calls strftime_now("%d %b %Y") when no date_string is given.
        return template_date(sw["date_string"], LLAMA_DATE, parse=())


@register
class Llama33(Llama31):
    name = "llama-3.3"
    description = "Llama 3.3: the Llama 3.1 template (fixed default date, JSON / built-in tools)"
    claims = ("llama-3.3",)


@register
class Llama4(_LlamaToolsBase):
    name = "llama-4"
    description = "Llama 4: <|header_start|>role<|header_end|>\\n\\n content <|eot|>; system block only if given"
    claims = ("llama-4",)
    switches = {"bos_token": "<|begin_of_text|>", "tools": None, "tools_in_user_message": True}
    header = "<|header_start|>{}<|header_end|>\n\n"
    eot = "<|eot|>"

    @staticmethod
    def _system_text(m: dict[str, Any]) -> str:
        return required(m, 0).strip()

    def _system_block(self, b: Builder, system: str | None, sw: dict) -> None:
        if system is None:
            return  # unlike 3.x there is no default system block
        tools = sw.get("tools")
        b.add(self._h("system"), msg=0, role="system")
        if tools is not None:
            b.add("Environment: ipython\n")
            if not sw.get("tools_in_user_message", True):
                b.add(TOOLS_IN_SYSTEM + tool_definitions(tools))
        b.add(system + self.eot, msg=0, role="system")

    def _message(self, b: Builder, i: int, m: dict[str, Any], sw: dict) -> None:
        role = m["role"]
        # Unlike Llama 3.x, Llama 4 keeps message content as is (no trim).
        if "tool_calls" not in m:
            add_turn(b, i, role, self._h(role), m.get("content", ""), self.eot)
        elif m["tool_calls"]:
            calls = "".join(
                '{"name": "' + fn["name"] + '", "parameters": ' + tojson(fn["arguments"]) + "}"
                for fn in (_function(c, i) for c in m["tool_calls"])
            )
            text = "<|python_start|>" + m.get("content", "") + "<|python_end|>" + calls
            add_turn(b, i, role, self._h("assistant"), text, self.eot)
        elif role == "tool":
            self._tool_result(b, i, m)
        # An empty tool_calls list on a non-tool message renders nothing at all.
