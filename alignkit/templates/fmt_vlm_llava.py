"""LLaVA-family processor templates (multimodal): llava-1.5, llava-next (and its fixed revision), llava-onevision.

Registered: llava-1.5, llava-next, llava-next-fixed, llava-onevision.

All four templates share one shape: per message, every image part first (`selectattr('type', 'equalto',
'image')`), then every text part, so the interleaving of text and images is NOT preserved. Iterating a
string content yields characters, which have no `type`: string content renders nothing there (llava-1.5 /
onevision drop it silently). llava-next instead reads `content[0]['text']` for system and assistant messages
and so raises on string content.

The image span is `<image>` (what the processor expands); the newline llava-1.5 / llava-next print after it is
ordinary untrained text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignkit.templates._common import MISSING, lookup
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register

IMAGE = "<image>"


def _parts(m: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """`message['content'] | selectattr('type', 'equalto', kind)`: the parts of that type, in order.

    A string content iterates as characters (no `type`) and a missing one as nothing: both give no parts.
    """
    content = m.get("content", MISSING)
    if not isinstance(content, list):
        return []
    return [p for p in content if lookup(p, "type") == kind]


def _images(b: Builder, m: dict[str, Any], i: int, after: str = "") -> None:
    """`{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' + after }}`."""
    for _ in _parts(m, "image"):
        b.add_image(IMAGE, msg=i, role=m["role"])
        b.add(after, msg=i, role=m["role"])


# LLaVA 1.5 (Vicuna style) ----------------------------------------------------------------------------------
@register
class Llava15(ChatFormat):
    name = "llava-1.5"
    description = "LLaVA-1.5 / LLaVA-1.6-vicuna processor template: 'USER: <image>\\ntext ASSISTANT: answer '"
    multimodal = True
    vlm_claims = ("llava-1.5",)
    image_placeholder = IMAGE
    switches: Mapping[str, Any] = {"bos_token": "<s>", "eos_token": "</s>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        for i, m in enumerate(messages):
            role = m["role"]
            if role != "system":  # system: no prefix at all
                b.add(role.upper() + ": ", msg=i, role=role)
            _images(b, m, i, "\n")
            # Every text part is followed by ' ' (also the last one); for the assistant that is inside
            # {% generation %}, so it is trainable. The template has no end-of-turn marker (no </s>).
            for p in _parts(m, "text"):
                b.add(p["text"] + " ", msg=i, role=role, train=role == "assistant")
        if add_generation_prompt:
            b.add("ASSISTANT:")  # no trailing space: the history writes 'ASSISTANT: '


# LLaVA-NeXT (Mistral [INST] style) -------------------------------------------------------------------------
def _first_text(m: dict[str, Any], i: int) -> str:
    """`message['content'][0]['text']`, which the template concatenates with `+` (Jinja raises unless a string)."""
    content = m.get("content", MISSING)
    first = content[0] if isinstance(content, list) and content else MISSING
    text = lookup(first, "text")
    if not isinstance(text, str):
        got = "a string" if isinstance(content, str) else "no content" if content is MISSING else repr(content)
        raise TemplateError(
            f"messages[{i}] ({m['role']}): this template reads content[0]['text'], so the content must be a list "
            f"whose first part is a text part; got {got}"
        )
    return text


@register
class LlavaNext(ChatFormat):
    name = "llava-next"
    description = "LLaVA-NeXT (v1.6-mistral) original processor template: '[INST] <image>\\ntext [/INST] answer<\\s> '"
    multimodal = True
    vlm_claims = ("llava-next",)
    image_placeholder = IMAGE
    switches: Mapping[str, Any] = {"bos_token": "<s>", "eos_token": "</s>"}
    # The original template writes the Jinja literal '<\s> ', which prints backslash-s (not '</s>'); kept
    # verbatim, and (being what closes the assistant turn) trained on like any end-of-turn marker.
    end_of_turn = "<\\s>"

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "system":
                b.add("<<SYS>>\n" + _first_text(m, i) + "\n<</SYS>>\n\n", msg=i, role=role)
            elif role == "user":
                b.add("[INST] ", msg=i, role=role)
                _images(b, m, i, "\n")
                for p in _parts(m, "text"):  # printed back to back, no separator
                    b.add(p["text"], msg=i, role=role)
                b.add(" [/INST]", msg=i, role=role)
            elif role == "assistant":
                # Only the first part is read: later parts (and any image) of an assistant message are dropped.
                text = _first_text(m, i)
                b.add(" ", msg=i, role=role)
                b.add(text + self.end_of_turn, msg=i, role=role, train=True)
                b.add(" ", msg=i, role=role)
            else:
                raise TemplateError(
                    f"messages[{i}] has role {role!r}; this template raises 'Only user and assistant roles are "
                    "supported!' (system, user and assistant only)"
                )
        # add_generation_prompt has no effect: a prompt already ends with ' [/INST]'.


@register
class LlavaNextFixed(LlavaNext):
    name = "llava-next-fixed"
    description = "LLaVA-NeXT (v1.6-mistral) later processor template: '[INST] <image>\\ntext [/INST] answer</s> '"
    vlm_claims = ("llava-next-fixed",)
    end_of_turn = "</s>"


# LLaVA-OneVision (ChatML-like, Qwen2 backbone) -------------------------------------------------------------
@register
class LlavaOneVision(ChatFormat):
    name = "llava-onevision"
    description = "LLaVA-OneVision processor template: '<|im_start|>user <image>\\ntext<|im_end|>', no newline after"
    multimodal = True
    vlm_claims = ("llava-onevision",)
    image_placeholder = IMAGE
    switches: Mapping[str, Any] = {"bos_token": None, "eos_token": "<|im_end|>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        for i, m in enumerate(messages):
            role = m["role"]
            train = role == "assistant"
            b.add("<|im_start|>" + role + " ", msg=i, role=role)  # a space after the role, not a newline
            _images(b, m, i)  # '<image>' with nothing after it (videos would follow; refused upstream)
            for p in _parts(m, "text"):  # each text part led by '\n' (inside {% generation %} for the assistant)
                b.add("\n" + p["text"], msg=i, role=role, train=train)
            b.add("<|im_end|>", msg=i, role=role, train=train)  # no newline after it
        if add_generation_prompt:
            b.add("<|im_start|>assistant\n")  # a newline here, where the history has 'assistant ' + '\n'
