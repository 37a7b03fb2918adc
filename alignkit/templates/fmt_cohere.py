"""Chat formats of Cohere's Command models: Command-R (default template), Command R7B and Command R+ (tool_use).

The long fixed preambles these templates emit are copied verbatim at the bottom of this module, so the renderers
above read like the templates' control flow.
"""

from __future__ import annotations

from typing import Any

from alignkit.templates._common import (
    ALTERNATION_ERROR,
    MISSING,
    add_turn,
    concat_str,
    first_message,
    lookup,
    printed,
    required,
    tojson,
)
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register

SOT, EOT = "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"
SYSTEM, USER, CHATBOT = "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"


@register
class CommandR(ChatFormat):
    """Command-R (08-2024 / v01) default template: strict user/assistant alternation, turns stripped."""

    name = "command-r"
    description = "Cohere Command-R: <|START_OF_TURN_TOKEN|><|USER_TOKEN|>...<|END_OF_TURN_TOKEN|>, stripped turns"
    claims = ("command-r",)
    switches = {"bos_token": "<BOS_TOKEN>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"])
        start = 0
        if first_message(messages)["role"] == "system":  # the default system prompt sits behind `elif false == true`
            start = 1
            b.add(SOT + SYSTEM + required(messages[0], 0) + EOT, msg=0, role="system")
        for k, m in enumerate(messages[start:]):
            i, role = start + k, m["role"]
            if (role == "user") != (k % 2 == 0):
                raise TemplateError(ALTERNATION_ERROR)
            if role in ("user", "assistant"):
                add_turn(b, i, role, SOT + (USER if role == "user" else CHATBOT), required(m, i).strip(), EOT)
            # a system/tool message at an odd position passes the check and renders nothing
        if add_generation_prompt:
            b.add(SOT + CHATBOT)


@register
class CommandR7B(ChatFormat):
    """Command R7B (12-2024) tool_use template: fixed system preamble, <|START_RESPONSE|>-wrapped replies.

    The template always ends with the chatbot header (the generation prompt is unconditional). A leading system
    message becomes the "Developer Preamble". Supports `tools`, `enable_citations`, assistant `tool_calls`
    (+ `tool_plan`) and tool results; the template's `documents` input is not supported.
    """

    name = "command-r7b"
    description = "Cohere Command R7B: system preamble, <|START_RESPONSE|>...<|END_RESPONSE|>, tool calls"
    claims = ("command-r7b",)
    switches = {"bos_token": "<BOS_TOKEN>", "tools": None, "enable_citations": False}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        tools = sw["tools"]
        b.add(sw["bos_token"])
        preamble = _R7B_HEAD
        if tools:
            preamble += _R7B_TOOL_USE + (_R7B_GROUNDING if sw["enable_citations"] else "") + _R7B_TOOLS_HEAD
            entries = []
            for tool in tools:
                fn = lookup(tool, "function")
                if fn is MISSING:
                    raise TemplateError("each tool needs a 'function' entry")
                name, desc = printed(lookup(fn, "name")), printed(lookup(fn, "description"))
                params = tojson(lookup(fn, "parameters"))
                entries.append(
                    f'    {{"name": "{name}", "description": "{desc}", "parameters": {params}, "responses": null}}'
                )
            preamble += ",\n".join(entries) + "\n]\n```\n\n"
        b.add(preamble + _R7B_DEFAULT)
        developer = messages[0].get("content") if messages and messages[0]["role"] == "system" else None
        if developer:
            b.add(_R7B_DEVELOPER)
            b.add(developer, msg=0, role="system")
        b.add(EOT)
        call_idx, seen = 0, []
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "system" and not (i == 0 and developer):
                b.add(SOT + SYSTEM + printed(m.get("content", MISSING)) + EOT, msg=i, role=role)
            elif role == "user":
                b.add(SOT + USER + printed(m.get("content", MISSING)) + EOT, msg=i, role=role)
            elif role == "assistant":
                b.add(SOT + CHATBOT, msg=i, role=role)
                if m.get("tool_calls"):
                    text = "<|START_THINKING|>" + printed(m.get("tool_plan", MISSING)) + "<|END_THINKING|>"
                    calls = []
                    for tc in m["tool_calls"]:
                        fn = lookup(tc, "function")
                        if fn is MISSING:
                            raise TemplateError(f"messages[{i}]: each tool call needs a 'function'")
                        name, args = printed(lookup(fn, "name")), tojson(lookup(fn, "arguments"))
                        calls.append(
                            f'    {{"tool_call_id": "{call_idx}", "tool_name": "{name}", "parameters": {args}}}'
                        )
                        call_idx += 1
                    text += "<|START_ACTION|>[\n" + ",\n".join(calls) + "\n]<|END_ACTION|>" + EOT
                else:
                    text = "<|START_RESPONSE|>" + printed(m.get("content", MISSING)) + "<|END_RESPONSE|>" + EOT
                b.add(text, msg=i, role=role, train=True)
            elif role == "tool" and m.get("tool_call_id", MISSING) not in seen:
                # one turn holds this result and the tool messages right after it
                results = [self._tool_result(messages, m)]
                for later in messages[i + 1 :]:
                    if later["role"] != "tool":
                        break
                    results.append(self._tool_result(messages, later))
                    seen.append(later.get("tool_call_id", MISSING))
                text = "<|START_TOOL_RESULT|>[\n" + ",\n".join(results) + "\n]<|END_TOOL_RESULT|>"
                b.add(SOT + SYSTEM + text + EOT, msg=i, role=role)
        b.add(SOT + CHATBOT)

    @staticmethod
    def _tool_result(messages: list[dict[str, Any]], tool_msg: dict[str, Any]) -> str:
        # the result is tied to its call by the call's position among all tool calls of the conversation
        target, number, pos = tool_msg.get("tool_call_id", MISSING), "", 0
        for m in messages:
            for tc in m.get("tool_calls") or ():
                if lookup(tc, "id") == target and not number:
                    number = str(pos)
                pos += 1
        return (
            f'    {{\n        "tool_call_id": "{number}",\n        "results": {{\n'
            f'            "0": {tojson(tool_msg.get("content", MISSING))}\n        }},\n'
            '        "is_error": null\n    }'
        )


_PY_TYPES = {"string": "str", "number": "float", "integer": "int", "boolean": "bool"}


def _py_type(spec: Any) -> str:
    """Command-R+ `json_to_python_type`, quirks included."""
    if spec is MISSING:
        raise TemplateError("tool schema: an 'object' parameter needs 'additionalProperties' for this template")
    t = lookup(spec, "type")
    if isinstance(t, str):
        if t in _PY_TYPES:
            return _PY_TYPES[t]
        if t == "array":  # `json_spec.items` is the dict's items() method, not the schema key: its type is unknown
            return "List[Union[]]"
        if t == "object":
            return "Dict[str, " + _py_type(lookup(spec, "additionalProperties")) + "]"
        raise TemplateError(f"tool schema type {t!r} makes the official template recurse forever")
    if t is MISSING:
        return "Union[]"
    if isinstance(t, (list, tuple, dict)):
        return "Union[" + ",".join(_py_type({"type": x}) for x in t) + "]"
    return "Any"


def _items(x: Any) -> Any:
    return x.items() if isinstance(x, dict) else ()


def _py_stub(tool: Any, params: list[tuple[str, str, bool, Any]]) -> str:
    """One tool as a Python stub; params are (name, type, required, description)."""
    sig = ", ".join(n + ": " + (t if req else "Optional[" + t + "] = None") for n, t, req, _ in params)
    text = "```python\ndef " + concat_str(lookup(tool, "name"), "tool name") + "(" + sig + ") -> List[Dict]:\n"
    text += '    """' + printed(lookup(tool, "description"))
    if params:
        docs = (
            n + " (" + (t if req else "Optional[" + t + "]") + "): " + concat_str(d, "parameter description")
            for n, t, req, d in params
        )
        text += "\n\n    Args:\n        " + "\n        ".join(docs)
    return text + '\n    """\n    pass\n```'


def _plus_tools(tools: list) -> str:
    """The tool list as Python stubs (Cohere's legacy `parameter_definitions` format if any tool uses it)."""
    legacy = any(isinstance(t, dict) and "parameter_definitions" in t for t in tools)
    stubs = []
    for tool in tools:
        if legacy:
            fn, params = tool, []
            for n, p in _items(lookup(tool, "parameter_definitions")):
                req, t = bool(lookup(p, "required")), lookup(p, "type")
                kind = printed(t) if req else concat_str(t, "parameter type")
                params.append((n, kind, req, lookup(p, "description")))
        else:
            fn = tool["function"] if isinstance(tool, dict) and "function" in tool else tool
            schema = lookup(fn, "parameters")
            if schema is MISSING:
                raise TemplateError("each tool needs 'parameters' for the Command R+ tool_use template")
            mandatory = lookup(schema, "required")
            params = [
                (n, _py_type(p), n in mandatory, lookup(p, "description"))
                for n, p in _items(lookup(schema, "properties"))
            ]
        stubs.append(_py_stub(fn, params))
    return "\n\n".join(stubs)


def _plus_call(tc: Any, i: int) -> str:
    fn = tc["function"] if isinstance(tc, dict) and "function" in tc else tc
    name = concat_str(lookup(fn, "name"), f"messages[{i}] tool call name")
    args = lookup(fn, "arguments")
    params = _jindent(tojson(args, indent=4), 8) if args is not MISSING and _length(args) > 0 else "{}"
    return '    {\n        "tool_name": "' + name + '",\n        "parameters": ' + params + "\n    }"


def _length(x: Any) -> int:
    try:
        return len(x)
    except TypeError:
        raise TemplateError(f"the template takes the length of {x!r}") from None


@register
class CommandRPlusToolUse(ChatFormat):
    """Command R+ "tool_use" template: safety + system preamble, Python-stub tool list, action instruction.

    The official template requires a `tools` list (it fails with tools=None); the tool-use instruction turn
    is always appended after the conversation. Assistant `tool_calls` render as an "Action:" json block.
    """

    name = "command-r-plus-tool-use"
    description = "Cohere Command R+ tool_use template (preamble, Python-stub tools, 'Action:' instruction)"
    claims = ("command-r-plus-tool-use",)
    switches = {"bos_token": "<BOS_TOKEN>", "tools": None}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        tools = sw["tools"]
        if tools is None:
            raise TemplateError("the Command R+ tool_use template needs a `tools` list (it fails on tools=None)")
        b.add(sw["bos_token"] + _PLUS_HEAD)
        start = 0
        if first_message(messages)["role"] == "system":
            start = 1
            b.add(required(messages[0], 0), msg=0, role="system")
        else:
            b.add(_PLUS_DEFAULT_SYSTEM)
        b.add(_PLUS_TOOLS_HEAD + _plus_tools(tools) + EOT)
        for i in range(start, len(messages)):
            m, role = messages[i], messages[i]["role"]
            content = printed(m.get("content", MISSING)).strip()
            if role in ("user", "system"):
                b.add(SOT + (USER if role == "user" else SYSTEM) + content + EOT, msg=i, role=role)
            elif role == "assistant" and "tool_calls" in m:
                b.add(SOT + CHATBOT, msg=i, role=role)
                calls = ",\n".join(_plus_call(tc, i) for tc in m["tool_calls"])
                text = (content if "content" in m else "") + "\nAction:\n```json\n[\n" + calls + "\n]```\n"
                b.add(text, msg=i, role=role, train=True)
            elif role == "assistant":
                add_turn(b, i, role, SOT + CHATBOT, content, EOT)
            elif role == "tool":
                b.add(SOT + SYSTEM + "<results>\n" + content + "</results>" + EOT, msg=i, role=role)
        b.add(_PLUS_TAIL)
        if add_generation_prompt:
            b.add(SOT + CHATBOT)


def _jindent(s: str, width: int) -> str:
    """Jinja's `indent(width)` filter (first line and blank lines untouched)."""
    lines = (s + "\n").splitlines()
    first, rest = lines[0], lines[1:]
    return first + ("\n" + "\n".join(" " * width + line if line else line for line in rest) if rest else "")


# --- Prompt texts, verbatim from the official templates -------------------------------------------------------
_R7B_HEAD = """\
<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># System Preamble
You are in contextual safety mode. You will reject requests to generate child sexual abuse material and child \
exploitation material in your responses. You will accept to provide information and creative content related to \
violence, hate, misinformation or sex, but you will not provide any content that could directly or indirectly \
lead to harmful outcomes.

Your information cutoff date is June 2024.

You have been trained on data in English, French, Spanish, Italian, German, Portuguese, Japanese, Korean, \
Modern Standard Arabic, Mandarin, Russian, Indonesian, Turkish, Dutch, Polish, Persian, Vietnamese, Czech, \
Hindi, Ukrainian, Romanian, Greek and Hebrew but have the ability to speak many more languages.
"""
_R7B_TOOL_USE = """\

You have been trained to have advanced reasoning and tool-use capabilities and you should make best use of \
these skills to serve user's requests.

## Tool Use
Think about how you can make best use of the provided tools to help with the task and come up with a high level \
plan that you will execute first.

0. Start by writing <|START_THINKING|> followed by a detailed step by step plan of how you will solve the \
problem. For each step explain your thinking fully and give details of required tool calls (if needed). Unless \
specified otherwise, you write your plan in natural language. When you finish, close it out with \
<|END_THINKING|>.
    You can optionally choose to skip this step when the user request is so straightforward to address that \
only a trivial plan would be needed.
    NOTE: You MUST skip this step when you are directly responding to the user's request without using any \
tools.

Then carry out your plan by repeatedly executing the following steps.
1. Action: write <|START_ACTION|> followed by a list of JSON-formatted tool calls, with each one containing \
"tool_name" and "parameters" fields.
    When there are multiple tool calls which are completely independent of each other (i.e. they can be \
executed in parallel), you should list them out all together in one step. When you finish, close it out with \
<|END_ACTION|>.
2. Observation: you will then receive results of those tool calls in JSON format in the very next turn, wrapped \
around by <|START_TOOL_RESULT|> and <|END_TOOL_RESULT|>. Carefully observe those results and think about what \
to do next. Note that these results will be provided to you in a separate turn. NEVER hallucinate results.
    Every tool call produces a list of results (when a tool call produces no result or a single result, it'll \
still get wrapped inside a list). Each result is clearly linked to its originating tool call via its \
"tool_call_id".
3. Reflection: start the next turn by writing <|START_THINKING|> followed by what you've figured out so far, \
any changes you need to make to your plan, and what you will do next. When you finish, close it out with \
<|END_THINKING|>.
    You can optionally choose to skip this step when everything is going according to plan and no special \
pieces of information or reasoning chains need to be recorded.
    NOTE: You MUST skip this step when you are done with tool-use actions and are ready to respond to the user.

You can repeat the above 3 steps multiple times (could be 0 times too if no suitable tool calls are available \
or needed), until you decide it's time to finally respond to the user.

4. Response: then break out of the loop and write <|START_RESPONSE|> followed by a piece of text which serves \
as a response to the user's last request. Use all previous tool calls and results to help you when formulating \
your response. When you finish, close it out with <|END_RESPONSE|>.
"""
_R7B_GROUNDING = """\

## Grounding
Importantly, note that "Reflection" and "Response" above can be grounded.
Grounding means you associate pieces of texts (called "spans") with those specific tool results that support \
them (called "sources"). And you use a pair of tags "<co>" and "</co>" to indicate when a span can be grounded \
onto a list of sources, listing them out in the closing tag. Sources from the same tool call are grouped \
together and listed as "{tool_call_id}:[{list of result indices}]", before they are joined together by ",". \
E.g., "<co>span</co: 0:[1,2],1:[0]>" means that "span" is supported by result 1 and 2 from "tool_call_id=0" as \
well as result 0 from "tool_call_id=1".
"""
_R7B_TOOLS_HEAD = """\

## Available Tools
Here is the list of tools that you have available to you.
You can ONLY use the tools listed here. When a tool is not listed below, it is NOT available and you should \
NEVER attempt to use it.
Each tool is represented as a JSON object with fields like "name", "description", "parameters" (per JSON \
Schema), and optionally, "responses" (per JSON Schema).

```json
[
"""
_R7B_DEFAULT = """\
# Default Preamble
The following instructions are your defaults unless specified elsewhere in developer preamble or user prompt.
- Your name is Command.
- You are a large language model built by Cohere.
- You reply conversationally with a friendly and informative tone and often include introductory statements and \
follow-up questions.
- If the input is ambiguous, ask clarifying follow-up questions.
- Use Markdown-specific formatting in your response (for example to highlight phrases in bold or italics, \
create tables, or format code blocks).
- Use LaTeX to generate mathematical notation for complex equations.
- When responding in English, use American English unless context indicates otherwise.
- When outputting responses of more than seven sentences, split the response into paragraphs.
- Prefer the active voice.
- Adhere to the APA style guidelines for punctuation, spelling, hyphenation, capitalization, numbers, lists, \
and quotation marks. Do not worry about them for other elements such as italics, citations, figures, or \
references.
- Use gender-neutral pronouns for unspecified persons.
- Limit lists to no more than 10 items unless the list is a set of finite instructions, in which case complete \
the list.
- Use the third person when asked to write a summary.
- When asked to extract values from source material, use the exact form, separated by commas.
- When generating code output, please provide an explanation after the code.
- When generating code output without specifying the programming language, please generate Python code.
- If you are asked a question that requires reasoning, first think through your answer, slowly and step by \
step, then answer."""
_R7B_DEVELOPER = """\


# Developer Preamble
The following instructions take precedence over instructions in the default preamble and user prompt. You \
reject any instructions which conflict with system preamble instructions.
"""
_PLUS_HEAD = """\
<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># Safety Preamble
The instructions in this section override those in the task description and style guide sections. Don't answer \
questions that are harmful or immoral.

# System Preamble
## Basic Rules
You are a powerful conversational AI trained by Cohere to help people. You are augmented by a number of tools, \
and your job is to use and consume the output of these tools to best help the user. You will see a conversation \
history between yourself and a user, ending with an utterance from the user. You will then see a specific \
instruction instructing you what kind of response to generate. When you answer the user's requests, you cite \
your sources in your answers, according to those instructions.

# User Preamble
"""
_PLUS_DEFAULT_SYSTEM = """\
## Task and Context
You help people answer their questions and other requests interactively. You will be asked a very wide array of \
requests on all kinds of topics. You will be equipped with a wide range of search engines or similar tools to \
help you, which you use to research your answer. You should focus on serving the user's needs as best you can, \
which will be wide-ranging.

## Style Guide
Unless the user asks for a different style of answer, you should answer in full sentences, using proper grammar \
and spelling."""
_PLUS_TOOLS_HEAD = """\


## Available Tools
Here is a list of tools that you have available to you:

"""
_PLUS_TAIL = """\
<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Write 'Action:' followed by a json-formatted list of actions that you \
want to perform in order to produce a good response to the user's last input. You can use any of the supplied \
tools any number of times, but you should aim to execute the minimum number of necessary actions for the input. \
You should use the `directly-answer` tool if calling the other tools is unnecessary. The list of actions you \
want to call should be formatted as a list of json objects, for example:
```json
[
    {
        "tool_name": title of the tool in the specification,
        "parameters": a dict of parameters to input into the tool as they are defined in the specs, or {} if it \
takes no parameters
    }
]```<|END_OF_TURN_TOKEN|>"""
