"""Chat formats: Zephyr, Falcon-2, OLMo-2 (tag-per-turn), Vicuna, Alpaca (community layouts), Granite-3.

Several of these official templates have no Jinja whitespace control, so their layout (indentation, blank
lines between `{% %}` tags) ends up in the output; the constants below reproduce it character for character.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignkit.templates._common import (
    add_turn,
    check_alternation,
    first_message,
    lookup,
    printed,
    required,
    template_date,
    tojson,
)
from alignkit.templates.base import Builder, ChatFormat, register


# Zephyr / Falcon-2 / OLMo-2: "<tag>content[eos]\n" per message ---------------------------------------
class _TaggedTurns(ChatFormat):
    """One header per role, content, optional eos, a newline; generation prompt after the last message.

    Roles without a tag (e.g. "tool") render nothing, as in the official templates.
    """

    tags: Mapping[str, str] = {}
    eos_roles: frozenset[str] = frozenset()  # roles whose content is followed by eos_token
    generation: str = ""
    emits_bos: bool = False
    last_assistant_newline: bool = True  # OLMo-2 omits the newline after the final assistant eos

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if self.emits_bos:
            b.add(sw["bos_token"])
        for i, m in enumerate(messages):
            role = m["role"]
            last = i == len(messages) - 1
            if role in self.tags:
                end = sw["eos_token"] if role in self.eos_roles else ""
                newline = "" if (role == "assistant" and last and not self.last_assistant_newline) else "\n"
                add_turn(b, i, role, self.tags[role], required(m, i), end, newline)
            if last and add_generation_prompt:
                b.add(self.generation)


@register
class Zephyr(_TaggedTurns):
    name = "zephyr"
    description = "Zephyr / TinyLlama-Chat: <|role|>\\ncontent</s>\\n, no BOS"
    claims = ("zephyr",)
    switches = {"eos_token": "</s>"}
    tags = {"user": "<|user|>\n", "system": "<|system|>\n", "assistant": "<|assistant|>\n"}
    eos_roles = frozenset(tags)
    generation = "<|assistant|>\n"


@register
class Falcon2(_TaggedTurns):
    """Falcon-2 has no end-of-turn marker: only the assistant content itself is trainable."""

    name = "falcon"
    description = "Falcon-2: 'User: \\n' / 'System: ' / 'Falcon:\\n' blocks, newline-separated, no eos"
    claims = ("falcon-2",)
    switches = {}
    tags = {"user": "User: \n", "system": "System: ", "assistant": "Falcon:\n"}
    generation = "Falcon:\n"


@register
class Olmo2(_TaggedTurns):
    name = "olmo-2"
    description = "OLMo-2 / Tulu-3: BOS, <|role|>\\ncontent\\n, assistant content + eos"
    claims = ("olmo-2",)
    switches = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    tags = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
    eos_roles = frozenset({"assistant"})
    generation = "<|assistant|>\n"
    emits_bos = True
    last_assistant_newline = False


# Vicuna / Alpaca: community templates whose tag layout leaks into the output ---------------------------
class _CommunityLayout(ChatFormat):
    """chujiezheng/chat_templates layout: "\\n" + bos + system + "\\n", then per message a blank line and an
    8-space-indented block, a blank line after the loop, and a 4-space-indented generation prompt."""

    user_head: str = ""
    user_tail: str = ""
    assistant_head: str = ""
    assistant_tail: str = ""
    generation: str = ""
    switches = {"bos_token": "<s>", "eos_token": "</s>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        has_system = first_message(messages)["role"] == "system"
        loop = messages[1:] if has_system else messages
        check_alternation(loop)
        b.add("\n" + sw["bos_token"])
        if has_system:
            b.add(messages[0].get("content", "").strip() + "\n\n\n", msg=0, role="system")
        else:
            b.add("\n")
        offset = 1 if has_system else 0
        for k, m in enumerate(loop):
            i, role = k + offset, m["role"]
            body = m.get("content", "").strip()
            if role == "user":
                add_turn(b, i, role, "\n        " + self.user_head, body, tail=self.user_tail + "\n")
            elif role == "assistant":
                head, tail = "\n        " + self.assistant_head, self.assistant_tail + "\n"
                add_turn(b, i, role, head, body, sw["eos_token"], tail)
            else:
                b.add("\n", msg=i, role=role)
        b.add("\n")
        if add_generation_prompt:
            b.add("    " + self.generation + "\n")


@register
class Vicuna(_CommunityLayout):
    name = "vicuna"
    description = "Vicuna v1.5 (community template): 'USER: ' / 'ASSISTANT: ' lines, trimmed content"
    claims = ("vicuna",)
    user_head, user_tail = "USER: ", "\n"
    assistant_head, assistant_tail = "ASSISTANT: ", "\n"
    generation = "ASSISTANT:"


@register
class Alpaca(_CommunityLayout):
    name = "alpaca"
    description = "Alpaca (community template): '### Instruction:' / '### Response:' blocks, trimmed content"
    claims = ("alpaca",)
    user_head, user_tail = "### Instruction:\n", "\n\n"
    assistant_head, assistant_tail = "### Response:\n", "\n\n"
    generation = "### Response:\n"


# Granite 3.x ---------------------------------------------------------------------------------------
_G_HELPFUL = " You are a helpful AI assistant."
_G_TOOLS = (
    " You are a helpful assistant with access to the following tools. When a tool is required to answer the"
    " user's query, respond only with <|tool_call|> followed by a JSON list of tools used. If a tool does not"
    " exist in the provided list of tools, notify the user that you do not have the ability to fulfill the request."
)
_G_DOCS = (
    " Write the response to the user's input by strictly aligning with the facts in the provided documents. If"
    " the information needed to answer the question is not available in the documents, inform the user that the"
    " question cannot be answered based on the available data."
)
_G_THINKING = (
    _G_HELPFUL + "\nRespond to every user query in a comprehensive and detailed way. You can write down your"
    " thoughts and reasoning process before responding. In the thought process, engage in a comprehensive cycle"
    " of analysis, summarization, exploration, reassessment, reflection, backtracing, and iteration to develop"
    " well-considered thinking process. In the response section, based on various attempts, explorations, and"
    " reflections from the thoughts section, systematically present the final solution that you deem correct."
    " The response should summarize the thought process. Write your thoughts between <think></think> and write"
    " your response between <response></response> for each user query."
)
_G_CITATIONS = (
    "\nUse the symbols <|start_of_cite|> and <|end_of_cite|> to indicate when a fact comes from a document in the"
    " search result, e.g <|start_of_cite|> {document_id: 1}my fact <|end_of_cite|> for a fact from document 1."
    " Afterwards, list all the citations with their corresponding documents in an ordered list."
)
_G_HALLUCINATIONS = (
    "\nFinally, after the response is written, include a numbered list of sentences from the response with a"
    " corresponding risk value that are hallucinated and not based in the documents."
)
_G_EOT = "<|end_of_text|>"


def _granite_default_system(sw: dict) -> str:
    tools, docs, controls = sw["tools"], sw["documents"], sw["controls"] or ()
    today = template_date(sw["date_string"], "%B %d, %Y")  # "July 26, 2024"
    text = f"Knowledge Cutoff Date: April 2024. Today's Date: {today}. You are Granite, developed by IBM."
    if tools and docs:
        text += _G_TOOLS + _G_DOCS
    elif tools:
        text += _G_TOOLS
    elif docs:
        text += _G_DOCS
    elif sw["thinking"]:
        text += _G_THINKING
    else:
        text += _G_HELPFUL
    if "citations" in controls and docs:
        text += _G_CITATIONS
    if "hallucinations" in controls and docs:
        text += _G_HALLUCINATIONS
    return text


@register
class Granite3(ChatFormat):
    """Granite 3.x. Without a system message the template injects one that contains today's date; the
    `date_string` switch pins it (None = today, like the template's strftime_now)."""

    name = "granite-3"
    description = "IBM Granite 3.x: <|start_of_role|>role<|end_of_role|>content<|end_of_text|>, dated default system"
    claims = ("granite-3",)
    switches = {"date_string": None, "tools": None, "documents": None, "controls": None, "thinking": False}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        head = "<|start_of_role|>{}<|end_of_role|>".format
        if first_message(messages)["role"] == "system":
            b.add(head("system") + required(messages[0], 0) + _G_EOT + "\n", msg=0, role="system")
            offset = 1
        else:
            b.add(head("system") + _granite_default_system(sw) + _G_EOT + "\n")
            offset = 0
        if sw["tools"]:
            b.add(head("available_tools") + tojson(sw["tools"], indent=4) + _G_EOT + "\n")
        for doc in sw["documents"] or ():
            doc_id, text = printed(lookup(doc, "doc_id")), printed(lookup(doc, "text"))
            b.add(head('document {"document_id": "' + doc_id + '"}') + "\n" + text + _G_EOT + "\n")
        loop = messages[offset:]
        for k, m in enumerate(loop):
            i = k + offset
            add_turn(b, i, m["role"], head(m["role"]), required(m, i), _G_EOT, "\n")
            if k == len(loop) - 1 and add_generation_prompt:
                controls = sw["controls"]
                extra = " " + tojson(controls) if controls else ""
                b.add("<|start_of_role|>assistant" + extra + "<|end_of_role|>")
