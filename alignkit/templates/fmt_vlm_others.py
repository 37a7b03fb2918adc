"""Multimodal processor templates of Gemma 3, Llama 3.2 Vision, Llama 4 and Mistral Small 3.1.

Registered: gemma-3-vlm, gemma-3-vlm-early, llama-3.2-vision, llama-3.2-vision-early, llama-4-vlm,
mistral-small-3.1.

All of them keep the interleaving of text and image parts; each image part prints one token the processor later
expands (`<start_of_image>`, `<|image|>`, `[IMG]`), which is the image span. Quirks, all reproduced:
- Gemma 3 folds the system message into the first user turn (untrimmed, + "\\n\\n") and trims string content and
  every text part. Its original revision reads `messages[0]['content'][0]['text']`, so a string system message
  makes it fail.
- Llama 3.2 Vision prints the Llama 3.1 system block (cutoff + date) only when a system message is given or no
  message has an image; the system content goes through `| trim`, so a LIST system content prints as its
  Python repr. Message content is printed as is (no trim, unlike the text Llama 3.2 template). Its early
  revision refuses images together with a non-blank system message and never prints the system block when
  there are images.
- Llama 4 reads a list system content as `content[0]['text'] | trim` (an image part there prints "", a None
  text "None").
- Mistral Small 3.1 prints a dated default system prompt whose line breaks the template's backslash-newline
  escapes removed; an assistant list content renders only its FIRST part's text; tool results print their
  content with `| string` (a list as its Python repr); tool call ids need 9 or more characters (the last 9
  are printed). Its role-alternation check is dead code (a Jinja scoping slip), so any message order renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignkit.templates._common import (
    ALTERNATION_ERROR,
    MISSING,
    check_alternation,
    concat_str,
    first_message,
    lookup,
    printed,
    required,
    template_date,
    tojson,
)
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register
from alignkit.templates.fmt_llama import Llama4, Llama32
from alignkit.templates.fmt_mistral import ONLY_USER_ASSISTANT_SYSTEM, MistralV03


def _add_content(b: Builder, content: Any, i: int, role: str, image: str, train: bool, trim: bool = False) -> None:
    """`{% if content is string %}{{ content }}{% else %}{% for part in content %}...`: a string as is (or
    trimmed); list parts in order, an image part as `image` (a span of its own), a text part as its text (or
    trimmed). A missing content iterates as nothing."""
    if isinstance(content, str):
        b.add(content.strip() if trim else content, msg=i, role=role, train=train)
        return
    for part in content if isinstance(content, list) else ():
        if part["type"] == "image":
            b.add_image(image, msg=i, role=role)
        elif part["type"] == "text":
            b.add(part["text"].strip() if trim else part["text"], msg=i, role=role, train=train)


def _has_image(m: dict[str, Any]) -> bool:
    """`for content in message['content']: if content['type'] == 'image'`. A string iterates as characters,
    which have no 'type'; a missing content as nothing."""
    content = m.get("content")
    return isinstance(content, list) and any(p["type"] == "image" for p in content)


def _first_part(content: Any, i: int) -> Any:
    """`content[0]` where the template goes on to read `['text']` (Jinja raises on an empty or missing list)."""
    if not isinstance(content, list) or not content:
        got = "no content" if content is MISSING else f"content {content!r}"
        raise TemplateError(f"messages[{i}] has {got}; this template reads messages[{i}]['content'][0]['text']")
    return content[0]


# Gemma 3 -----------------------------------------------------------------------------------------------------
GEMMA_IMAGE = "<start_of_image>"


@register
class Gemma3VLM(ChatFormat):
    """Gemma 3 processor template (current Hub revision)."""

    name = "gemma-3-vlm"
    description = "Gemma 3 (vision): <start_of_turn>user|model\\n trimmed parts, <start_of_image> per image"
    multimodal = True
    vlm_claims = ("gemma-3",)
    image_placeholder = GEMMA_IMAGE
    switches: Mapping[str, Any] = {"bos_token": "<bos>"}
    early = False  # the original revision: the system content must be a list of parts

    def _system_prefix(self, system: dict[str, Any]) -> str:
        content = lookup(system, "content")
        if isinstance(content, str) and not self.early:
            return content + "\n\n"  # not trimmed
        if isinstance(content, str):
            raise TemplateError(
                "this Gemma 3 template revision reads the system message as content parts "
                "(messages[0]['content'][0]['text']); a string system message makes it fail ('str object' has no "
                "attribute 'text'): pass the system content as [{'type': 'text', 'text': ...}]"
            )
        # messages[0]['content'][0]['text'] + '\n\n': Jinja refuses to concatenate a missing or non-string text.
        return concat_str(lookup(_first_part(content, 0), "text"), "messages[0]['content'][0]['text']") + "\n\n"

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"])
        prefix, start = "", 0
        if first_message(messages)["role"] == "system":
            prefix, start = self._system_prefix(messages[0]), 1
        loop = messages[start:]
        check_alternation(loop, ALTERNATION_ERROR)
        for k, m in enumerate(loop):
            i, role = start + k, m["role"]
            train = role == "assistant"
            b.add("<start_of_turn>" + ("model" if train else role) + "\n", msg=i, role=role)
            if k == 0:  # first_user_prefix: the system text, inside the first user turn
                b.add(prefix, msg=0, role="system")
            _add_content(b, m.get("content", MISSING), i, role, GEMMA_IMAGE, train, trim=True)
            b.add("<end_of_turn>", msg=i, role=role, train=train)
            b.add("\n", msg=i, role=role)
        if add_generation_prompt:
            b.add("<start_of_turn>model\n")


@register
class Gemma3VLMEarly(Gemma3VLM):
    name = "gemma-3-vlm-early"
    description = "Gemma 3 (vision), original revision: like gemma-3-vlm; the system content must be a list"
    vlm_claims = ("gemma-3-early",)
    early = True


# Llama 3.2 Vision --------------------------------------------------------------------------------------------
LLAMA_IMAGE = "<|image|>"
IMAGES_WITH_SYSTEM = "Prompting with images is incompatible with system messages."


@register
class Llama32Vision(Llama32):
    """Llama 3.2 Vision: the text Llama 3.2 format's system block and tool calls, with its own content rules."""

    name = "llama-3.2-vision"
    description = "Llama 3.2 Vision: Llama 3.1 headers, <|image|> per image, untrimmed content, system block if any"
    claims = ()
    multimodal = True
    vlm_claims = ("llama-3.2-vision",)
    image_placeholder = LLAMA_IMAGE
    switches: Mapping[str, Any] = {
        "bos_token": "<|begin_of_text|>",
        "date_string": None,
        "tools": None,
        "tools_in_user_message": True,
    }
    early = False  # the first revision: images and a system message exclude each other

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"])
        system, start = "", 0
        if first_message(messages)["role"] == "system":
            # `messages[0]['content'] | trim`: a list of parts prints as its Python repr.
            system, start = printed(lookup(messages[0], "content")).strip(), 1
        has_images = any(_has_image(m) for m in messages[start:])
        if self.early:
            if has_images and system != "":
                raise TemplateError(IMAGES_WITH_SYSTEM)
            with_system = not has_images  # a blank system message next to images is dropped silently
        else:
            with_system = bool(start) or not has_images
        if with_system:
            self._system_block(b, system if start else None, sw)
        self._turns(b, messages, self._tools_turn(b, messages, start, sw), add_generation_prompt, sw)

    @staticmethod
    def _trimmed_content(m: dict[str, Any]) -> str:
        return printed(lookup(m, "content")).strip()  # `| trim` of list content: its Python repr

    def _message(self, b: Builder, i: int, m: dict[str, Any], sw: dict) -> None:
        if "tool_calls" in m:  # exactly one call, as JSON: the text Llama 3.2 format's rendering
            super()._message(b, i, m, sw)
            return
        role = m["role"]
        train = role == "assistant"
        b.add(self._h(role), msg=i, role=role)
        _add_content(b, m.get("content", MISSING), i, role, LLAMA_IMAGE, train)  # no trim
        b.add(self.eot, msg=i, role=role, train=train)


@register
class Llama32VisionEarly(Llama32Vision):
    name = "llama-3.2-vision-early"
    description = "Llama 3.2 Vision, first revision: refuses images with a system message; no system block then"
    vlm_claims = ("llama-3.2-vision-early",)
    early = True


# Llama 4 -----------------------------------------------------------------------------------------------------
_MARK = "\x00alignkit-content\x00"  # stands for list content in a render by the text format


@register
class Llama4VLM(Llama4):
    """Llama 4 with list content. The template is the one the text `llama-4` format renders; list content
    (image parts as `<|image|>`, text parts as is) goes where the text format prints a string content."""

    name = "llama-4-vlm"
    description = "Llama 4 (vision): the llama-4 format with <|image|> per image part"
    claims = ()
    multimodal = True
    vlm_claims = ("llama-4",)
    image_placeholder = LLAMA_IMAGE

    @staticmethod
    def _system_text(m: dict[str, Any]) -> str:
        content = required(m, 0)
        if isinstance(content, str):
            return content.strip()
        # `messages[0]['content'][0]['text'] | trim`: a missing text trims to "", None to "None".
        return printed(lookup(_first_part(content, 0), "text")).strip()

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if sw.get("tools") is not None and sw.get("tools_in_user_message", True):
            # The message carrying the tools prints `content | trim`: a list as its Python repr.
            k = 1 if messages and messages[0]["role"] == "system" else 0
            if k < len(messages) and isinstance(messages[k].get("content"), list):
                messages = [*messages[:k], {**messages[k], "content": str(messages[k]["content"])}, *messages[k + 1 :]]
        super()._render(b, messages, add_generation_prompt, sw)

    def _message(self, b: Builder, i: int, m: dict[str, Any], sw: dict) -> None:
        content = m.get("content")
        # A tool result (`content | tojson`) and string / missing content: the text format as is.
        if not isinstance(content, list) or ("tool_calls" in m and not m["tool_calls"]):
            super()._message(b, i, m, sw)
            return
        scratch = Builder()
        super()._message(scratch, i, {**m, "content": _MARK}, sw)
        r = scratch.build()
        for s in r.spans:
            before, mark, after = r.text[s.start : s.end].partition(_MARK)
            b.add(before, msg=s.message_index, role=s.role, train=s.trainable)
            if mark:
                _add_content(b, content, i, m["role"], LLAMA_IMAGE, s.trainable)
            b.add(after, msg=s.message_index, role=s.role, train=s.trainable)


# Mistral Small 3.1 -------------------------------------------------------------------------------------------
MISTRAL_IMAGE = "[IMG]"
# The template's string literals end their lines with a backslash, which Jinja's unescaping removes together
# with the newline: the rendered prompts have no line breaks at all.
MISTRAL_SMALL_31_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered "
    "in Paris.Your knowledge base was last updated on 2023-10-01. The current date is {today}.When you're not sure "
    "about some information, you say that you don't have the information and don't make up anything.If the user's "
    "question is not clear, ambiguous, or does not provide enough context for you to accurately answer the "
    "question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. "
    '"What are some good restaurants around me?" => "Where are you?" or "When is the next flight to Tokyo" => '
    '"Where do you travel from?")'
)
PARALLEL_TOOL_PROMPT = (
    "You are a helpful assistant that can call tools. If you call one or more tools, format them in a single JSON "
    "array or objects, where each object is a tool call, not as separate objects outside of an array or multiple "
    'arrays. Use the format [{"name": tool call name, "arguments": tool call arguments}, additional tool calls] if '
    "you call more than one tool. If you call tools, do not attempt to interpret them or otherwise provide a "
    "response until you receive a tool call result that you can interpret for the user."
)
BAD_TOOL_CALL_ID_31 = "Tool call IDs should be alphanumeric strings with length >= 9!"


def _long_id(x: dict[str, Any], key: str) -> str:
    """`x[key][-9:]` after the template's check `x[key] is defined and x[key]|length >= 9`."""
    v = lookup(x, key)
    if not isinstance(v, str) or len(v) < 9:
        raise TemplateError(f"{BAD_TOOL_CALL_ID_31} (got {key} = {None if v is MISSING else v!r})")
    return v[-9:]


def _iterated(x: Any, what: str) -> list[Any]:
    """`{% for item in x %}`: a list, a string (its characters) or a dict (its keys); anything else raises."""
    if isinstance(x, (list, tuple, str, dict)):
        return list(x)
    raise TemplateError(f"{what} must be a list, got {type(x).__name__}")


@register
class MistralSmall31(MistralV03):
    """Mistral Small 3.1 (processor template, tool-capable revision). It descends from the v3 template: the
    `[AVAILABLE_TOOLS]` block is the v3 one (inherited); everything else is its own."""

    name = "mistral-small-3.1"
    description = "Mistral Small 3.1: [SYSTEM_PROMPT] (dated default) [INST]text + [IMG] per image[/INST]answer</s>"
    claims = ()
    multimodal = True
    vlm_claims = ("mistral-small-3.1",)
    image_placeholder = MISTRAL_IMAGE
    switches: Mapping[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "tools": None, "date_string": None}

    def _system(self, m: dict[str, Any]) -> Any:
        """`system_message`: the string content, else `content[0]['text']` (may be missing: no error yet)."""
        content = lookup(m, "content")
        if isinstance(content, str):
            return content
        return lookup(_first_part(content, 0), "text")

    def _tool_calls(self, calls: Any, eos: str) -> str:
        out = "[TOOL_CALLS] ["
        items = _iterated(calls, "tool_calls")
        for n, call in enumerate(items):
            # `tool_call.function | tojson` without its closing brace, then the id's last 9 characters.
            out += tojson(lookup(call, "function"))[:-1] + ', "id": "' + _long_id(call, "id") + '"}'
            out += ", " if n < len(items) - 1 else "]" + eos
        return out

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        today = template_date(sw["date_string"], "%Y-%m-%d")  # strftime_now("%Y-%m-%d")
        tools = sw.get("tools")
        b.add(sw["bos_token"])
        owner: dict[str, Any] = {}
        start, system = 0, MISTRAL_SMALL_31_SYSTEM.format(today=today)
        if first_message(messages)["role"] == "system":
            start, system, owner = 1, self._system(messages[0]), {"msg": 0, "role": "system"}
        if tools is not None:
            # `parallel_tool_prompt + "\<newline>\<newline>" + system_message` (the escapes print nothing); an
            # undefined system message (a first part without text) leaves the tool prompt alone.
            system = PARALLEL_TOOL_PROMPT + ("" if system is MISSING else concat_str(system, "the system message"))
        b.add("[SYSTEM_PROMPT]" + concat_str(system, "the system message") + "[/SYSTEM_PROMPT]", **owner)

        loop = messages[start:]
        users = [m for m in loop if m["role"] == "user"]
        # The template's alternation check never fires: it collects `filtered_messages` with a `set` inside a
        # for loop, which in Jinja does not outlive the loop, so it checks an empty list. Any order renders.
        eos = sw["eos_token"]
        for k, m in enumerate(loop):
            i, role = start + k, m["role"]
            if role == "user":
                # Dict equality, as in the template: an earlier copy of the last user message gets tools too.
                if tools is not None and m == users[-1]:
                    b.add(self._tools_block(tools))
                b.add("[INST]", msg=i, role=role)
                _add_content(b, m.get("content", MISSING), i, role, MISTRAL_IMAGE, False)
                b.add("[/INST]", msg=i, role=role)
            elif "tool_calls" in m:  # even an empty list: "[TOOL_CALLS] [" and nothing more
                b.add(self._tool_calls(m["tool_calls"], eos), msg=i, role=role, train=role == "assistant")
            elif role == "assistant":
                content = lookup(m, "content")
                if not isinstance(content, str):  # only the first part's text; the other parts are dropped
                    content = lookup(_first_part(content, i), "text")
                b.add(concat_str(content, f"messages[{i}] (assistant) content") + eos, msg=i, role=role, train=True)
            elif role == "tool":
                # `content | string`: a list prints as its Python repr, a missing content as "".
                text = '[TOOL_RESULTS] {"content": ' + printed(lookup(m, "content")) + ", "
                text += '"call_id": "' + _long_id(m, "tool_call_id") + '"}[/TOOL_RESULTS]'
                b.add(text, msg=i, role=role)
            else:
                raise TemplateError(ONLY_USER_ASSISTANT_SYSTEM)
        # add_generation_prompt has no effect: the prompt already ends with [/INST].
