"""ChatML-family formats: `<|im_start|>{role}\\n{content}<|im_end|>\\n` and its relatives.

Registered: chatml (generic), qwen2.5, qwen3, qwq, qwen2-vl, smollm2, smollm3, yi, hermes-3-tool-use, phi-4.

Where the official template concatenates a missing `content` (Jinja raises on `str + Undefined`) we raise
TemplateError too; where it merely prints it, a missing content renders as "".

Span convention for ChatML: `<|im_start|>assistant\\n` (the generation prompt) is the header; everything
the model would generate after it, through `<|im_end|>`, is trainable. Text a template inserts into an
assistant turn that its generation prompt also contains (SmolLM3's empty think block in /no_think mode)
counts as header; inserted text the model must produce itself (Qwen3's think block) is trainable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignkit.templates._common import MISSING, add_turn, after_think, first_message, required, split_think, tojson
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register

START, END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = f"{START}assistant\n"

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)


# Shared helpers ------------------------------------------------------------------------------------
def _chatml_turn(b: Builder, i: int, role: str, content: str) -> None:
    """`<|im_start|>role\\ncontent<|im_end|>\\n`; for assistants content + <|im_end|> is trainable."""
    add_turn(b, i, role, f"{START}{role}\n", content, END, "\n")


def _tool_call_turn(b: Builder, i: int, body: str) -> None:
    """An assistant turn written as `<|im_start|>assistant` + body (newline-led text and tool calls)."""
    header = f"{START}assistant"
    if body.startswith("\n"):  # the newline the generation prompt "<|im_start|>assistant\n" already holds
        header, body = header + "\n", body[1:]
    add_turn(b, i, "assistant", header, body, END, "\n")


def _function(call: Any, truthy: bool = False) -> Any:
    """A tool call's `function` member when present (OpenAI style; `truthy`: only when non-empty), else the call."""
    if isinstance(call, Mapping) and "function" in call and (call["function"] or not truthy):
        return call["function"]
    return call


def hermes_call(call: Any, *, raw_string_args: bool, truthy_function: bool = False) -> str:
    """`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` as the Qwen templates write it."""
    fn = _function(call, truthy_function)
    args = fn.get("arguments", MISSING) if isinstance(fn, Mapping) else MISSING
    if args is MISSING:
        raise TemplateError(f"tool call {call!r} has no 'arguments'")
    args_text = args if raw_string_args and isinstance(args, str) else tojson(args)
    return f'<tool_call>\n{{"name": "{fn.get("name", "")}", "arguments": {args_text}}}\n</tool_call>'


def _qwen_tool_message(b: Builder, messages: list[dict[str, Any]], i: int) -> None:
    """Consecutive tool results share one user turn, each wrapped in <tool_response> tags."""
    if i == 0 or messages[i - 1]["role"] != "tool":
        b.add(f"{START}user", msg=i, role="tool")
    b.add(f"\n<tool_response>\n{messages[i].get('content', '')}\n</tool_response>", msg=i, role="tool")
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        b.add(f"{END}\n", msg=i, role="tool")


# Generic ChatML and its default-system variants ----------------------------------------------------
@register
class ChatML(ChatFormat):
    name = "chatml"
    description = "Generic ChatML: <|im_start|>role\\ncontent<|im_end|>\\n, no default system prompt"
    claims: tuple[str, ...] = ()
    switches: Mapping[str, Any] = {}
    default_system: str | None = None  # injected when the first message is not a system message
    strict_content = False  # True: a missing content raises (the template concatenates it)

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            b.add(f"{START}system\n{self.default_system}{END}\n")
        for i, m in enumerate(messages):
            content = required(m, i) if self.strict_content else m.get("content", "")
            _chatml_turn(b, i, m["role"], content)
        if add_generation_prompt:
            b.add(ASSISTANT_HEADER)


@register
class SmolLM2(ChatML):
    name = "smollm2"
    description = "ChatML with SmolLM2's default system prompt"
    claims = ("smollm2",)
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    strict_content = True


@register
class Qwen2VL(ChatML):
    name = "qwen2-vl"
    description = "Qwen2-VL / Qwen2.5-VL ChatML with default system prompt (string content only)"
    claims = ("qwen2-vl",)
    default_system = "You are a helpful assistant."


# Qwen text models ----------------------------------------------------------------------------------
class _Qwen(ChatFormat):
    """Qwen2.5-style ChatML: system block (with Hermes-style <tools> when tools are given), tool results
    as user turns, assistant tool calls as <tool_call> JSON."""

    switches: Mapping[str, Any] = {"tools": None}
    default_system: str | None = None  # system block when there is no system message and no tools
    tools_default_prefix = ""  # what precedes "# Tools" when there is no system message
    strict_tools_system = False  # with tools: does the template concatenate (not just print) the system content?

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        has_system = first_message(messages)["role"] == "system"
        tools = sw.get("tools")
        if tools:
            if has_system:
                system = required(messages[0], 0) if self.strict_tools_system else messages[0].get("content", "")
                b.add(f"{START}system\n{system}", msg=0, role="system").add("\n\n")
            else:
                b.add(f"{START}system\n{self.tools_default_prefix}")
            b.add(QWEN_TOOLS_HEAD + "".join("\n" + tojson(t) for t in tools) + QWEN_TOOLS_TAIL)
        elif has_system:
            _chatml_turn(b, 0, "system", required(messages[0], 0))
        elif self.default_system is not None:
            b.add(f"{START}system\n{self.default_system}{END}\n")
        ctx = self._context(messages)
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "user" or (role == "system" and i > 0):
                _chatml_turn(b, i, role, required(m, i))
            elif role == "assistant":
                self._assistant(b, messages, i, ctx, sw)
            elif role == "tool":
                _qwen_tool_message(b, messages, i)
        if add_generation_prompt:
            b.add(self._generation_prompt(sw))

    def _context(self, messages: list[dict[str, Any]]) -> Any:
        return None

    def _generation_prompt(self, sw: dict) -> str:
        return ASSISTANT_HEADER

    def _history_content(self, messages: list[dict[str, Any]], i: int) -> str:
        """The assistant content as this template renders it (reasoning removal happens here)."""
        return required(messages[i], i)

    def _assistant(self, b: Builder, messages: list[dict[str, Any]], i: int, ctx: Any, sw: dict) -> None:
        m = messages[i]
        if not m.get("tool_calls"):
            _chatml_turn(b, i, "assistant", self._history_content(messages, i))
            return
        content = self._tool_call_content(messages, i)
        body = ("\n" + content if m.get("content") else "") + "".join(
            "\n" + hermes_call(c, raw_string_args=False) for c in m["tool_calls"]
        )
        _tool_call_turn(b, i, body)

    def _tool_call_content(self, messages: list[dict[str, Any]], i: int) -> str:
        """Content of an assistant turn with tool calls (printed only when non-empty, so it may be missing)."""
        return messages[i].get("content", "")


@register
class Qwen25(_Qwen):
    name = "qwen2.5"
    description = "ChatML with Qwen2.5's default system prompt and Hermes-style tools"
    claims = ("qwen2.5",)
    default_system = QWEN_SYSTEM
    tools_default_prefix = QWEN_SYSTEM + "\n\n"


@register
class QwQ(_Qwen):
    name = "qwq"
    description = "QwQ-32B: Qwen ChatML, reasoning dropped from earlier assistant turns, prompt opens <think>"
    claims = ("qwq",)
    tools_default_prefix = "\n\n"

    def _history_content(self, messages: list[dict[str, Any]], i: int) -> str:
        content = required(messages[i], i)
        return content if i == len(messages) - 1 else after_think(content)

    def _tool_call_content(self, messages: list[dict[str, Any]], i: int) -> str:
        # Reasoning removal splits the content of every turn but the last, so there it must exist.
        return self._history_content(messages, i) if i < len(messages) - 1 else messages[i].get("content", "")

    def _generation_prompt(self, sw: dict) -> str:
        return ASSISTANT_HEADER + "<think>\n"


@register
class Qwen3(_Qwen):
    name = "qwen3"
    description = "Qwen3 ChatML: <think> kept only after the last user query; enable_thinking switch"
    claims = ("qwen3",)
    switches: Mapping[str, Any] = {"tools": None, "enable_thinking": True}
    strict_tools_system = True

    def _context(self, messages: list[dict[str, Any]]) -> int:
        """Index of the last real user query (tool results sent as user text do not count)."""
        for i in range(len(messages) - 1, -1, -1):
            if messages[i]["role"] == "user":
                c = required(messages[i], i)
                if not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
                    return i
        return len(messages) - 1

    def _generation_prompt(self, sw: dict) -> str:
        # The template tests `enable_thinking is false`: only the boolean False switches thinking off.
        return ASSISTANT_HEADER + ("<think>\n\n</think>\n\n" if sw["enable_thinking"] is False else "")

    def _assistant(self, b: Builder, messages: list[dict[str, Any]], i: int, last_query: int, sw: dict) -> None:
        m = messages[i]
        content = required(messages[i], i)
        if "reasoning_content" in m:
            reasoning = m["reasoning_content"]
        else:
            reasoning, content = split_think(content)
        header, shown = ASSISTANT_HEADER, content
        if i > last_query and (i == len(messages) - 1 or reasoning):
            think = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
            if think == "<think>\n\n</think>\n\n" and sw["enable_thinking"] is False:
                header, think = header + think, ""  # the no-think generation prompt already holds this block
            shown = think + content.lstrip("\n")
        # The separator before the first call looks at the unstripped content, as the template does.
        calls = "".join(
            ("\n" if (k > 0 or content) else "") + hermes_call(c, raw_string_args=True, truthy_function=True)
            for k, c in enumerate(m.get("tool_calls") or ())
        )
        add_turn(b, i, "assistant", header, shown + calls, END, "\n")


# SmolLM3 -------------------------------------------------------------------------------------------
SMOLLM3_THINK_SYSTEM = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracking, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "Thought section </think> Solution section. In the Thought section, detail your reasoning process in steps. "
    "Each step should include detailed considerations such as analysing questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and reflections from the "
    "Thought section, systematically present the final solution that you deem correct. The Solution section should "
    "be logical, accurate, and concise and detail necessary steps needed to reach the conclusion."
)
SMOLLM3_NO_THINK_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."


@register
class SmolLM3(ChatFormat):
    name = "smollm3"
    description = "SmolLM3: ChatML with a metadata system block; /think, /no_think and enable_thinking"
    claims = ("smollm3",)
    switches: Mapping[str, Any] = {"enable_thinking": True}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        think = bool(sw["enable_thinking"])
        custom = ""
        if first_message(messages)["role"] == "system":
            system = required(messages[0], 0)
            if "/no_think" in system:
                think = False
            elif "/think" in system:
                think = True
            custom = system.replace("/no_think", "").replace("/think", "").rstrip()
        mode = "/think" if think else "/no_think"
        b.add(f"{START}system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\nReasoning Mode: {mode}\n\n")
        b.add("## Custom Instructions\n\n")
        if custom:
            b.add(custom, msg=0, role="system")
        else:
            b.add(SMOLLM3_THINK_SYSTEM if think else SMOLLM3_NO_THINK_SYSTEM)
        b.add(f"\n\n{END}\n")
        # In /no_think mode the empty think block is part of the generation prompt, hence of the header.
        header = ASSISTANT_HEADER + ("" if think else "<think>\n\n</think>\n")
        for i, m in enumerate(messages):
            content = m.get("content", "")
            if m["role"] == "user":
                _chatml_turn(b, i, "user", content)
            elif m["role"] == "assistant":
                add_turn(b, i, "assistant", header, content.lstrip("\n"), END, "\n")
            elif m["role"] == "tool":
                add_turn(b, i, "tool", f"{START}user\n", content, END, "\n")
        if add_generation_prompt:
            b.add(header)


# Templates whose user turn also opens the assistant turn (add_generation_prompt has no effect) ------
def _header_owner(messages: list[dict[str, Any]], i: int) -> tuple[int | None, str | None]:
    """The assistant message an assistant header written after user message i belongs to (None: a prompt)."""
    if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
        return i + 1, "assistant"
    return None, None


@register
class Yi(ChatFormat):
    name = "yi"
    description = "Yi-1.5 chat: ChatML with the system prompt written raw (no system turn)"
    claims = ("yi",)

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if first_message(messages)["role"] == "system":
            b.add(messages[0].get("content", ""), msg=0, role="system")
        for i, m in enumerate(messages):
            if m["role"] == "user":
                b.add(f"{START}user\n{required(m, i)}{END}\n", msg=i, role="user")
                b.add(ASSISTANT_HEADER, *_header_owner(messages, i))
            elif m["role"] == "assistant":
                add_turn(b, i, "assistant", "", required(m, i), END, "\n")


@register
class Phi4(ChatFormat):
    name = "phi-4"
    description = "Phi-4: ChatML with <|im_sep|> after the role and no newlines between turns"
    claims = ("phi-4",)

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        for i, m in enumerate(messages):
            if m["role"] in ("system", "user"):
                b.add(f"{START}{m['role']}<|im_sep|>{required(m, i)}{END}", msg=i, role=m["role"])
                if m["role"] == "user":
                    b.add(f"{START}assistant<|im_sep|>", *_header_owner(messages, i))
            elif m["role"] == "assistant":
                add_turn(b, i, "assistant", "", required(m, i), END)


# Hermes 3 (tool_use template) ----------------------------------------------------------------------
HERMES_INTRO = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools> "
)
HERMES_OUTRO = (
    " </tools>Use the following pydantic model json schema for each tool call you will make: "
    '{"properties": {"name": {"title": "Name", "type": "string"}, "arguments": {"title": "Arguments", "type": '
    '"object"}}, "required": ["name", "arguments"], "title": "FunctionCall", "type": "object"}}\n'
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags as follows:\n<tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</tool_call><|im_end|>\n'
)
_PY_TYPES = {"string": "str", "number": "float", "integer": "int", "boolean": "bool"}


def _py_type(spec: Any) -> str:
    """The template's json_to_python_type macro, quirks included: its `json_spec|items` yields the spec's
    (key, value) pairs rather than the items schema, so every array renders as list[Union[]]."""
    t = spec.get("type", MISSING) if isinstance(spec, Mapping) else MISSING
    if isinstance(t, str) and t in _PY_TYPES:
        return _PY_TYPES[t]
    if t == "array":
        return "list[Union[]]"
    if t == "object":
        extra = spec.get("additionalProperties", MISSING)
        return "dict" if extra is MISSING else f"dict[str, {_py_type(extra)}]"
    if t is MISSING or t == "":
        return "Union[]"  # Jinja's Undefined (like "") is an empty iterable
    if isinstance(t, str):
        raise TemplateError(f"json_to_python_type recurses forever on type {t!r}")
    if isinstance(t, (list, tuple, Mapping)):
        return "Union[" + ",".join(_py_type({"type": x}) for x in t) + "]"
    return "Any"


def _hermes_tool(tool: Any) -> str:
    fn = _function(tool)
    try:
        name, params, props = fn["name"], fn["parameters"], fn["parameters"]["properties"]
        desc = fn["description"]
    except (KeyError, TypeError) as e:
        raise TemplateError(f"tool {tool!r} lacks name/description/parameters.properties") from e
    sig = ", ".join(f"{k}: {_py_type(v)}" for k, v in props.items())
    ret = fn.get("return", MISSING)
    text = f'{{"type": "function", "function": {{"name": "{name}", "description": "{name}({sig})'
    text += (f" -> {_py_type(ret)}" if ret is not MISSING else "") + f" - {desc}\n\n"
    text += "    Args:\n" if props else ""
    text += "".join(f"        {k}({_py_type(v)}): {str(v.get('description', '')).strip()}" for k, v in props.items())
    if isinstance(ret, Mapping) and "description" in ret:
        text += f"\n    Returns:\n        {ret['description']}"
    return text + '", "parameters": ' + ("{}" if not props else tojson(params)) + "}"


@register
class Hermes3ToolUse(ChatFormat):
    name = "hermes-3-tool-use"
    description = "Hermes 3 tool_use template: ChatML with a function-calling system prompt (tools required)"
    claims = ("hermes-3-tool-use",)
    switches: Mapping[str, Any] = {"bos_token": "<|begin_of_text|>", "tools": None}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if sw["tools"] is None:
            raise TemplateError("hermes-3-tool-use needs a tools list (the template iterates over `tools`)")
        b.add(sw["bos_token"])
        b.add(f"{START}system\n{HERMES_INTRO}" + "\n".join(_hermes_tool(t) for t in sw["tools"]) + HERMES_OUTRO)
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m["role"] in ("user", "system") or (m["role"] == "assistant" and "tool_calls" not in m):
                _chatml_turn(b, i, m["role"], required(m, i))
            elif m["role"] == "assistant":
                calls = "".join(f"\n<tool_call>\n{self._call(c)}\n</tool_call>" for c in m["tool_calls"])
                _tool_call_turn(b, i, calls)
            else:  # tool: results are grouped in one tool turn; no newline after its <|im_end|>
                if i > 0 and messages[i - 1]["role"] != "tool":
                    b.add(f"{START}tool\n", msg=i, role="tool")
                text = f"<tool_response>\n{m.get('content', '')}\n</tool_response>" + ("\n" if i < last else "")
                end = END if i == last or messages[i + 1]["role"] != "tool" else ""
                b.add(text + end, msg=i, role="tool")
        if add_generation_prompt:
            b.add(ASSISTANT_HEADER)

    @staticmethod
    def _call(call: Any) -> str:
        fn = _function(call)
        if not isinstance(fn, Mapping):
            raise TemplateError(f"tool call {call!r} must be a dict")
        args = fn.get("arguments", MISSING)
        text = f'{{"name": "{fn.get("name", "")}", '
        if args is not MISSING:
            text += '"arguments": ' + (args if isinstance(args, str) else tojson(args))
        return text + "}"
