"""Multimodal ChatML-family processor templates: Qwen2-VL / Qwen2.5-VL, Qwen3-VL, SmolVLM (Idefics3), InternVL3-hf.

Registered: qwen2.5-vl, qwen3-vl, smolvlm, internvl3.

Each renderer walks the content parts in order (interleaving of text and images is preserved). The image span
is the text the processor expands: `<|vision_start|><|image_pad|><|vision_end|>` for Qwen (a `Picture N: ` prefix
from `add_vision_id` is ordinary untrained text), `<image>` for SmolVLM and InternVL (InternVL's newline after
it is ordinary untrained text). Video parts are refused (the validator refuses `type: video`; a part that the
Qwen templates would render as a video only because it carries a `video` key is refused here too).

Trainable text, as everywhere: the assistant content as the template renders it (text parts; any image the
template renders inside an assistant turn is its own untrained image span) through the end-of-turn marker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignkit.templates._common import MISSING, first_message, printed, required, tojson
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register
from alignkit.templates.fmt_chatml import (
    ASSISTANT_HEADER,
    END,
    QWEN_TOOLS_HEAD,
    QWEN_TOOLS_TAIL,
    START,
    hermes_call,
)

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

# Pieces of a message body: (kind, text). TEXT is the message's own content (trainable in an assistant turn),
# MARKUP is text the template adds around an image (never trainable), IMAGE is one image part's placeholder.
TEXT, MARKUP, IMAGE = "text", "markup", "image"
Pieces = list[tuple[str, str]]


def _turn(b: Builder, i: int, role: str, head: str, pieces: Pieces, end: str, tail: str = "") -> None:
    """Append message `i` as head + pieces + end + tail; for an assistant its TEXT pieces and `end` are trained."""
    train = role == "assistant"
    b.add(head, msg=i, role=role)
    for kind, text in pieces:
        if kind == IMAGE:
            b.add_image(text, msg=i, role=role)
        else:
            b.add(text, msg=i, role=role, train=train and kind == TEXT)
    b.add(end, msg=i, role=role, train=train)
    b.add(tail, msg=i, role=role)


def _content(m: dict[str, Any]) -> Any:
    """`message['content']`: a string, a list of parts, or MISSING (iterating a missing value yields nothing)."""
    return m.get("content", MISSING)


def _text_parts(content: Any) -> Pieces:
    """`{% for c in content %}{% if 'text' in c %}{{ c.text }}`: Qwen3-VL's system and assistant content.

    Image parts are dropped, except that an image part carrying `"text": None` prints "None" (as the template does).
    """
    if isinstance(content, str):
        return [(TEXT, content)]
    return [(TEXT, printed(p["text"])) for p in content if "text" in p]


class _VisionIds:
    """The templates' `image_count` namespace: one counter across the whole conversation."""

    def __init__(self, enabled: Any) -> None:
        self.enabled = bool(enabled)  # `{% if add_vision_id %}`: Jinja truthiness
        self.images = 0


def _qwen_parts(content: Any, i: int, ids: _VisionIds) -> Pieces:
    """Qwen-VL user content: a string as is; parts in order, an image being any part with type 'image' OR an
    'image' / 'image_url' key (so a text part carrying such a key renders as an image), else its text."""
    if isinstance(content, str):
        return [(TEXT, content)]
    out: Pieces = []
    for j, p in enumerate(content):
        if p.get("type") == "image" or "image" in p or "image_url" in p:
            ids.images += 1
            if ids.enabled:
                out.append((MARKUP, f"Picture {ids.images}: "))
            out.append((IMAGE, QWEN_IMAGE))
        elif p.get("type") == "video" or "video" in p:
            raise TemplateError(
                f"messages[{i}]['content'][{j}] carries a 'video' key, which the template renders as a video "
                "(video parts are not supported)"
            )
        elif "text" in p:
            out.append((TEXT, printed(p["text"])))
    return out


# Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------------------------
@register
class Qwen25VL(ChatFormat):
    name = "qwen2.5-vl"
    description = "Qwen2-VL / Qwen2.5-VL processor template: ChatML, default system prompt, image/text parts in order"
    multimodal = True
    vlm_claims = ("qwen2.5-vl",)
    image_placeholder = QWEN_IMAGE
    # The template reads neither bos_token nor eos_token (accepted for a uniform call; the model's values).
    switches: Mapping[str, Any] = {"bos_token": None, "eos_token": "<|im_end|>", "add_vision_id": False}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        ids = _VisionIds(sw["add_vision_id"])
        for i, m in enumerate(messages):
            role = m["role"]
            if i == 0 and role != "system":
                b.add(f"{START}system\nYou are a helpful assistant.{END}\n")
            # Every role (system included) renders its parts the same way; a missing content renders nothing.
            _turn(b, i, role, f"{START}{role}\n", _qwen_parts(_content(m), i, ids), END, "\n")
        if add_generation_prompt:
            b.add(ASSISTANT_HEADER)


# Qwen3-VL (Instruct) -----------------------------------------------------------------------------------------
@register
class Qwen3VL(ChatFormat):
    name = "qwen3-vl"
    description = "Qwen3-VL Instruct processor template: ChatML, no default system prompt, Hermes-style tools"
    multimodal = True
    vlm_claims = ("qwen3-vl",)
    image_placeholder = QWEN_IMAGE
    # The template reads neither bos_token nor eos_token (accepted for a uniform call; the model's values).
    switches: Mapping[str, Any] = {"bos_token": None, "eos_token": "<|im_end|>", "add_vision_id": False, "tools": None}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        # Both branches read messages[0].role: an empty conversation raises.
        first = first_message(messages)
        has_system = first["role"] == "system"
        tools = sw["tools"]
        if tools:
            b.add(f"{START}system\n")
            if has_system:
                # Only the 'text' of system parts is printed: images in a system message are dropped.
                b.add("".join(t for _, t in _text_parts(_content(first))), msg=0, role="system")
                b.add("\n\n")
            b.add(QWEN_TOOLS_HEAD + "".join("\n" + tojson(t) for t in tools) + QWEN_TOOLS_TAIL)
        elif has_system:
            _turn(b, 0, "system", f"{START}system\n", _text_parts(_content(first)), END, "\n")
        ids = _VisionIds(sw["add_vision_id"])
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "user":
                _turn(b, i, role, f"{START}user\n", _qwen_parts(_content(m), i, ids), END, "\n")
            elif role == "assistant":
                self._assistant(b, m, i)
            elif role == "tool":
                if i == 0 or messages[i - 1]["role"] != "tool":
                    b.add(f"{START}user", msg=i, role=role)
                b.add("\n<tool_response>\n", msg=i, role=role)
                _turn(b, i, role, "", _qwen_parts(_content(m), i, ids), "\n</tool_response>")
                if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                    b.add(f"{END}\n", msg=i, role=role)
            # A system message is rendered only as messages[0] (above); one later in the conversation is dropped.
        if add_generation_prompt:
            b.add(ASSISTANT_HEADER)

    @staticmethod
    def _assistant(b: Builder, m: dict[str, Any], i: int) -> None:
        # Assistant list content: only the 'text' of each part (image parts are dropped, not rendered as images).
        pieces = _text_parts(_content(m))
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, (list, tuple)):
                raise TemplateError(f"messages[{i}]['tool_calls'] must be a list of tool calls, got {calls!r}")
            # The separator before the first call tests the raw content's truthiness (a list of only images
            # prints nothing but still counts).
            for k, c in enumerate(calls):
                sep = "\n" if (k > 0 or m.get("content")) else ""
                pieces.append((TEXT, sep + hermes_call(c, raw_string_args=True, truthy_function=True)))
        _turn(b, i, "assistant", f"{START}assistant\n", pieces, END, "\n")


# SmolVLM / Idefics3 ------------------------------------------------------------------------------------------
@register
class SmolVLM(ChatFormat):
    name = "smolvlm"
    description = "SmolVLM / Idefics3 processor template: '<|im_start|>User:<image>text<end_of_utterance>\\nAssistant:'"
    multimodal = True
    vlm_claims = ("smolvlm",)
    image_placeholder = "<image>"
    # The template hard-codes its first token, which is the model's bos_token: SmolVLM's '<|im_start|>'
    # (Idefics3's template hard-codes '<|begin_of_text|>', its bos: pass bos_token='<|begin_of_text|>').
    # eos_token is not read ('<end_of_utterance>' is hard-coded).
    switches: Mapping[str, Any] = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"] or "")
        for i, m in enumerate(messages):
            role = m["role"]
            content = required(m, i)  # the template reads message['content'][0]['type']
            if len(content) == 0:
                raise TemplateError(f"messages[{i}] ({role}) has empty content; the template reads content[0]")
            # ':' right before a leading image, ': ' otherwise (a string's first character has no 'type').
            first_is_image = isinstance(content, list) and content[0].get("type") == "image"
            head = role.capitalize() + (":" if first_is_image else ": ")
            # Iterating a string yields characters, which have no 'type': string content is silently dropped.
            pieces: Pieces = []
            if isinstance(content, list):
                for p in content:
                    if p.get("type") == "text":
                        pieces.append((TEXT, printed(p["text"])))
                    elif p.get("type") == "image":
                        pieces.append((IMAGE, self.image_placeholder))
            _turn(b, i, role, head, pieces, "<end_of_utterance>", "\n")
        if add_generation_prompt:
            b.add("Assistant:")


# InternVL3 (-hf conversions) ---------------------------------------------------------------------------------
@register
class InternVL3(ChatFormat):
    name = "internvl3"
    description = "InternVL3-hf processor template: ChatML, no default system prompt, an image as '<image>\\n'"
    multimodal = True
    vlm_claims = ("internvl3-hf",)
    image_placeholder = "<image>"  # the processor expands it into <img><IMG_CONTEXT>...</img>; '\n' stays text
    # The template reads neither bos_token nor eos_token (accepted for a uniform call; the model's values).
    switches: Mapping[str, Any] = {"bos_token": None, "eos_token": "<|im_end|>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        for i, m in enumerate(messages):
            role = m["role"]
            content = _content(m)
            pieces: Pieces = []
            if isinstance(content, str):
                pieces.append((TEXT, content))
            else:  # parts by 'type' only (a missing content iterates as nothing)
                for p in content:
                    if p.get("type") == "image":
                        pieces += [(IMAGE, self.image_placeholder), (MARKUP, "\n")]
                    elif p.get("type") == "text":
                        pieces.append((TEXT, printed(p["text"])))
            _turn(b, i, role, f"{START}{role}\n", pieces, END, "\n")
        if add_generation_prompt:
            b.add(ASSISTANT_HEADER)
