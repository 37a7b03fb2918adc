"""Chat formats: InternLM2, GLM-4 / GLM-4.6, gpt-oss (harmony).

The long fixed prompt texts these templates emit (GLM tool prompts) are copied verbatim at the
bottom of this module, so the renderers above read like the templates' control flow.

None of GLM-4 / GLM-4.6 closes an assistant turn with a marker (the model stops by emitting the next role token,
<|user|> or <|observation|>), so their trainable text is the assistant turn without any end marker; append the
tokenizer's eos yourself if you want the model to learn to stop, as GLM's own fine-tuning scripts do.
"""

from __future__ import annotations

from typing import Any

from alignkit.templates._common import (
    MISSING,
    add_turn,
    concat_str,
    first_message,
    lookup,
    printed,
    required,
    split_think,
    template_date,
    tojson,
)
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register


# --- InternLM2 --------------------------------------------------------------------------------------------------
@register
class InternLM2(ChatFormat):
    """InternLM2-chat: ChatML; bos when the first message is user/system; eos after a final assistant turn."""

    name = "internlm2"
    description = "InternLM2 chat: ChatML with bos, eos appended after a final assistant message"
    claims = ("internlm2",)
    switches = {"bos_token": "<s>", "eos_token": "</s>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if first_message(messages)["role"] in ("user", "system"):
            b.add(sw["bos_token"])
        for i, m in enumerate(messages):
            add_turn(b, i, m["role"], f"<|im_start|>{m['role']}\n", required(m, i), "<|im_end|>", "\n")
        if add_generation_prompt:
            b.add("<|im_start|>assistant\n")
        elif messages[-1]["role"] == "assistant":
            b.add(sw["eos_token"])


# --- GLM --------------------------------------------------------------------------------------------------------
@register
class GLM4(ChatFormat):
    """GLM-4-9B-chat: "[gMASK]<sop>" then <|role|>{metadata}\\ncontent turns; empty messages are skipped.

    Tools are per message (a message carrying a `tools` list gets GLM's Chinese tool system prompt).
    """

    name = "glm-4"
    description = "GLM-4 chat: [gMASK]<sop><|user|>\\n...<|assistant|>\\n..., message-level tools"
    claims = ("chatglm4",)
    switches = {}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add("[gMASK]<sop>")
        for i, m in enumerate(messages):
            role = m["role"]
            if "tools" in m:
                b.add(_GLM4_TOOLS_HEAD + "".join(self._tool(t) for t in m["tools"]), msg=i, role=role)
            if m.get("content"):
                head = f"<|{role}|>" + printed(m.get("metadata", MISSING)) + "\n"
                add_turn(b, i, role, head, m["content"])  # no end-of-turn marker (see the module docstring)
        if add_generation_prompt:
            b.add("<|assistant|>")

    @staticmethod
    def _tool(tool: dict[str, Any]) -> str:
        kind = lookup(tool, "type")
        if kind == "function":
            fn = lookup(tool, "function")
            if fn is MISSING:
                raise TemplateError("a 'function' tool needs a 'function' entry")
            return "\n## " + printed(lookup(fn, "name")) + "\n\n" + tojson(fn, indent=4) + _GLM4_FUNCTION_NOTE
        return {"python": _GLM4_PYTHON, "simple_browser": _GLM4_BROWSER, "cogview": _GLM4_COGVIEW}.get(kind, "")


@register
class GLM46(ChatFormat):
    """GLM-4.6: hybrid reasoning; every assistant turn carries a <think> block (empty for history turns).

    Reasoning (`reasoning_content`, or the text before </think> in the content) is kept only for assistant
    turns after the last user message; `enable_thinking=False` appends "/nothink" to user turns and an empty
    think block to the generation prompt. Tool calls render as XML <arg_key>/<arg_value> pairs.
    """

    name = "glm-4.6"
    description = "GLM-4.6: [gMASK]<sop>, <think> blocks, reasoning kept after the last user turn, XML tool calls"
    claims = ("glm-4.6",)
    switches = {"tools": None, "enable_thinking": True}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        no_think = not sw["enable_thinking"]
        b.add("[gMASK]<sop>")
        if sw["tools"]:
            b.add(_GLM46_TOOLS_HEAD + "".join(tojson(t) + "\n" for t in sw["tools"]) + _GLM46_TOOLS_TAIL)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        for i, m in enumerate(messages):
            role, content = m["role"], m.get("content", "")
            if role == "user":
                suffix = "/nothink" if no_think and not content.endswith("/nothink") else ""
                b.add("<|user|>\n" + content + suffix, msg=i, role=role)
            elif role == "assistant":
                self._assistant(b, i, m, keep_reasoning=i > last_user, no_think=no_think)
            elif role == "tool":
                if "content" not in m:  # the template then iterates an empty list of results
                    b.add("<|observation|>", msg=i, role=role)
                    continue
                opener = "<|observation|>" if i == 0 or messages[i - 1]["role"] != "tool" else ""
                b.add(opener + "\n<tool_response>\n" + content + "\n</tool_response>", msg=i, role=role)
            elif role == "system":
                b.add("<|system|>\n" + content, msg=i, role=role)
        if add_generation_prompt:
            b.add("<|assistant|>" + ("\n<think></think>" if no_think else ""))

    @staticmethod
    def _assistant(b: Builder, i: int, m: dict[str, Any], keep_reasoning: bool, no_think: bool) -> None:
        content, reasoning = m.get("content", ""), m.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning, content = split_think(content)
        think = "\n<think>" + reasoning.strip() + "</think>" if keep_reasoning and reasoning else "\n<think></think>"
        if no_think and think == "\n<think></think>":  # the prompt supplies the empty block: not trained on
            b.add("<|assistant|>" + think, msg=i, role="assistant")
            think = ""
        else:
            b.add("<|assistant|>", msg=i, role="assistant")
        text = think + ("\n" + content.strip() if content.strip() else "")
        for tc in m.get("tool_calls") or ():
            fn = lookup(tc, "function") or tc
            text += "\n<tool_call>" + concat_str(lookup(fn, "name"), f"messages[{i}] tool call name") + "\n"
            args = lookup(fn, "arguments")
            args = args if args is not MISSING and args else {}
            if not isinstance(args, dict):
                raise TemplateError("Invalid tool call arguments passed: " + str(args))
            for k, v in args.items():
                text += f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else tojson(v)}</arg_value>\n"
            text += "</tool_call>"
        b.add(text, msg=i, role="assistant", train=True)


# --- gpt-oss (harmony) ------------------------------------------------------------------------------------------
# "Current date" accepts a date, None (today), or a string in one of these forms (any other string is verbatim).
_DATE_FORMS = ("%Y-%m-%d", "%d %b %Y", "%d %B %Y", "%B %d, %Y", "%b %d, %Y")


def _ts_type(spec: Any) -> str:
    """gpt-oss `render_typescript_type` (JSON schema -> TypeScript type), whitespace quirks included."""
    t, nullable = lookup(spec, "type"), bool(lookup(spec, "nullable"))
    if t == "array":
        items = lookup(spec, "items")
        if items:
            it = lookup(items, "type")
            simple = {"string": "string[]", "number": "number[]", "integer": "number[]", "boolean": "boolean[]"}
            if isinstance(it, str) and it in simple:
                out = simple[it]
            else:
                inner = _ts_type(items)
                out = "any[]" if inner == "object | object" or len(inner) > 50 else inner + "[]"
        else:
            out = "any[]"
        return out + (" | null" if nullable else "")
    if isinstance(t, (list, tuple)) and t:
        return " | ".join(map(str, t)) if len(t) > 1 else str(t[0])
    one_of = lookup(spec, "oneOf")
    if one_of:
        # (the template's has_object_variants flag is set inside a for loop, so it never leaves it)
        parts = []
        for v in one_of:
            part = _ts_type(v)
            if lookup(v, "description"):
                part += "// " + concat_str(lookup(v, "description"), "variant description")
            if lookup(v, "default") is not MISSING:
                part += " " * 20 + "// default: " + tojson(lookup(v, "default"))
            parts.append(part)
        return " | \n".join(parts)
    if t == "string":
        enum = lookup(spec, "enum")
        if enum:
            return '"' + '" | "'.join(map(str, enum)) + '"'
        return "string" + (" | null" if nullable else "")
    if t in ("number", "integer"):
        return "number"
    if t == "boolean":
        return "boolean"
    if t == "object":
        props = lookup(spec, "properties")
        if not props:
            return "object"
        mandatory = lookup(spec, "required") or []
        fields = [n + ("" if n in mandatory else "?") + ": \n" + " " * 16 + _ts_type(p) for n, p in props.items()]
        return "{\n" + ", ".join(fields) + "}"
    return "any"


def _ts_namespace(tools: list) -> str:
    text = "## functions\n\nnamespace functions {\n\n"
    for tool in tools:
        fn = lookup(tool, "function")
        text += "// " + concat_str(lookup(fn, "description"), "tool description") + "\n"
        text += "type " + concat_str(lookup(fn, "name"), "tool name") + " = "
        params = lookup(fn, "parameters")
        props = lookup(params, "properties")
        if not params or not props:
            text += "() => any;\n\n"
            continue
        mandatory = lookup(params, "required") or []
        text += "(_: {\n"
        for p_name, p in props.items():
            desc = lookup(p, "description")
            if desc:
                text += "// " + concat_str(desc, "parameter description") + "\n"
            text += p_name + ("" if p_name in mandatory else "?") + ": " + _ts_type(p)
            default = lookup(p, "default")
            if default is not MISSING:
                if lookup(p, "enum"):
                    text += ", // default: " + concat_str(default, "enum default")
                elif lookup(p, "oneOf"):
                    text += "// default: " + concat_str(default, "oneOf default")
                else:
                    text += ", // default: " + tojson(default)
            text += ",\n"
        text += "}) => any;\n\n"
    return text + "} // namespace functions"


_CHANNEL_TAGS = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>")


@register
class GptOss(ChatFormat):
    """gpt-oss harmony format: fixed system message (date, reasoning effort), system -> developer message.

    Trainable text of an assistant turn starts after its "<|start|>assistant" header (what the generation
    prompt supplies): the channel markers, the reasoning of a final turn rendered from `thinking`, the answer
    and <|end|> / <|return|> / <|call|>. `date_string` (default today) fills "Current date" as YYYY-MM-DD.
    """

    name = "gpt-oss"
    description = "OpenAI gpt-oss harmony format (<|start|>role<|channel|>...<|message|>...<|end|>)"
    claims = ("gpt-oss",)
    switches = {
        "date_string": None,
        "reasoning_effort": "medium",
        "model_identity": "You are ChatGPT, a large language model trained by OpenAI.",
        "tools": None,
    }

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        first_message(messages)  # the template reads messages[0]: an empty conversation fails
        tools = sw["tools"]
        system = concat_str(sw["model_identity"], "model_identity") + "\nKnowledge cutoff: 2024-06\n"
        system += "Current date: " + template_date(sw["date_string"], "%Y-%m-%d", parse=_DATE_FORMS) + "\n\n"
        system += "Reasoning: " + concat_str(sw["reasoning_effort"], "reasoning_effort") + "\n\n"
        system += "# Valid channels: analysis, commentary, final. Channel must be included for every message."
        if tools:
            system += "\nCalls to these tools must go to the commentary channel: 'functions'."
        b.add("<|start|>system<|message|>" + system + "<|end|>")
        start, developer = 0, ""
        if messages[0]["role"] == "system":
            start, developer = 1, messages[0].get("content", "")
        if developer or tools:
            b.add("<|start|>developer<|message|>")
            if developer:
                b.add("# Instructions\n\n" + developer + "\n\n", msg=0, role="system")
            b.add(("# Tools\n\n" + _ts_namespace(tools) if tools else "") + "<|end|>")
        last_call: str | None = None
        n = len(messages)
        for i in range(start, n):
            m, role = messages[i], messages[i]["role"]
            if role == "assistant":
                last_call = self._assistant(b, messages, i, last=i == n - 1 and not add_generation_prompt)
            elif role == "tool":
                if last_call is None:
                    raise TemplateError(
                        "Message has tool role, but there was no previous assistant message with a tool call!"
                    )
                text = f"<|start|>functions.{last_call} to=assistant<|channel|>commentary<|message|>"
                b.add(text + tojson(m.get("content", MISSING)) + "<|end|>", msg=i, role=role)
            elif role == "user":
                b.add("<|start|>user<|message|>" + required(m, i) + "<|end|>", msg=i, role=role)
            # later system messages are dropped by the template
        if add_generation_prompt:
            b.add("<|start|>assistant")

    @staticmethod
    def _assistant(b: Builder, messages: list[dict[str, Any]], i: int, last: bool) -> str | None:
        """Render assistant message i; returns the name of the tool it calls (None for a final answer)."""
        m = messages[i]
        for key in ("content", "thinking"):
            if key in m and any(tag in concat_str(m[key], f"messages[{i}] {key}") for tag in _CHANNEL_TAGS):
                raise TemplateError(
                    f"You have passed a message containing <|channel|> tags in the {key} field. Instead of doing "
                    "this, you should pass analysis messages (the string between '<|message|>' and '<|end|>') in "
                    "the 'thinking' field, and final messages (the string between '<|message|>' and '<|end|>') in "
                    "the 'content' field."
                )
        b.add("<|start|>assistant", msg=i, role="assistant")
        if "tool_calls" in m:
            future_final = any(f["role"] == "assistant" and "tool_calls" not in f for f in messages[i + 1 :])
            calls = m["tool_calls"]
            if not calls:
                raise TemplateError(f"messages[{i}]: tool_calls is empty")
            tc = lookup(calls[0], "function") or calls[0]
            content, thinking = m.get("content"), m.get("thinking")
            if content and thinking:
                raise TemplateError(
                    "Cannot pass both content and thinking in an assistant message with tool calls! Put the "
                    "analysis message in one or the other, but not both."
                )
            text = ""
            if (content or thinking) and not future_final:
                text = "<|channel|>analysis<|message|>" + (content or thinking) + "<|end|><|start|>assistant"
            name = concat_str(lookup(tc, "name"), f"messages[{i}] tool call name")
            kind = lookup(tc, "content_type")
            text += f" to=functions.{name}<|channel|>commentary "
            text += (concat_str(kind, "content_type") if kind is not MISSING else "json") + "<|message|>"
            b.add(text + tojson(lookup(tc, "arguments")) + "<|call|>", msg=i, role="assistant", train=True)
            return name
        text = ""
        if last and "thinking" in m:
            text = "<|channel|>analysis<|message|>" + m["thinking"] + "<|end|><|start|>assistant"
        end = "<|return|>" if last else "<|end|>"
        b.add(text + "<|channel|>final<|message|>" + required(m, i) + end, msg=i, role="assistant", train=True)
        return None


# --- Prompt texts, verbatim from the official templates -------------------------------------------------------
_GLM4_TOOLS_HEAD = """\
<|system|>
你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 \
模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。

# 可用工具"""
_GLM4_PYTHON = """\

## python

当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。
`python` 返回代码执行的输出，或在执行 60 秒后返回超时。
`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` \
进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"""
_GLM4_BROWSER = """\

## simple_browser

你可以使用 `simple_browser` 工具。该工具支持以下函数：
`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` \
参数控制搜索内容的时效性。
`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽\
可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。
`open_url(url: str)`：打开指定的 URL。

使用 `【{引用 id}†{引用文本}】` 来引用内容。

操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. \
根据获得的内容进行回复。在回复中应当引用信息来源。
 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。
如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"""
_GLM4_COGVIEW = """\

## cogview

如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` \
发送图像描述，规则：
- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。
- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。
- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。
- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"""
_GLM4_FUNCTION_NOTE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
_GLM46_TOOLS_HEAD = """\
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
"""
_GLM46_TOOLS_TAIL = """\
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>"""
