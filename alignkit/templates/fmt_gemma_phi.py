"""Chat formats: Gemma 1/2/3 (<start_of_turn>role ... <end_of_turn>) and Phi-3 / Phi-3.5 (<|role|> ... <|end|>)."""

from __future__ import annotations

from typing import Any

from alignkit.templates._common import add_turn, check_alternation, first_message, required
from alignkit.templates.base import Builder, ChatFormat, TemplateError, register


# Gemma --------------------------------------------------------------------------------------------
@register
class Gemma(ChatFormat):
    """Gemma: BOS, strict user/model alternation, no system role, trimmed content, "assistant" shown as "model"."""

    name = "gemma"
    description = "Gemma (1): <start_of_turn>user|model\\ntrimmed content<end_of_turn>\\n; rejects system messages"
    claims = ("gemma",)
    switches = {"bos_token": "<bos>"}
    system_error = "System role not supported"

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        if first_message(messages)["role"] == "system":
            raise TemplateError(self.system_error)
        check_alternation(messages)
        b.add(sw["bos_token"])
        for i, m in enumerate(messages):
            role = m["role"]
            shown = "model" if role == "assistant" else role
            # `content | trim` renders a missing content as "".
            add_turn(b, i, role, f"<start_of_turn>{shown}\n", m.get("content", "").strip(), "<end_of_turn>", "\n")
        if add_generation_prompt:
            b.add("<start_of_turn>model\n")


@register
class Gemma2(Gemma):
    name = "gemma-2"
    description = "Gemma 2: same template as Gemma 1"
    claims = ("gemma-2",)


@register
class Gemma3(Gemma):
    """Gemma 3, original release template. It folds a system message into the first user turn but reads it as
    `messages[0]['content'][0]['text']` (list-of-parts content), so any plain-string system message makes it
    fail; string content is all alignkit messages carry, hence a system message is refused here too."""

    name = "gemma-3"
    description = "Gemma 3 (original template): like Gemma 2; a string system message is refused as the template does"
    claims = ("gemma-3",)
    system_error = (
        "Gemma-3's template reads the system message as content parts (messages[0]['content'][0]['text']) and "
        "fails on a string system message ('str object' has no attribute 'text')"
    )


# Phi-3 -------------------------------------------------------------------------------------------
_PHI_ROLES = ("system", "user", "assistant")


@register
class Phi3(ChatFormat):
    """Phi-3 (mid-2024 template): no BOS; system/user/assistant as <|role|>\\ncontent<|end|>\\n (other roles
    dropped); ends with the generation prompt, or with eos_token when there is none."""

    name = "phi-3"
    description = "Phi-3-mini (mid-2024): <|role|>\\ncontent<|end|>\\n, trailing eos without generation prompt"
    claims = ("phi-3",)
    switches = {"eos_token": "<|endoftext|>"}
    skip_empty_system = False

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        for i, m in enumerate(messages):
            role = m["role"]
            if role not in _PHI_ROLES or (self.skip_empty_system and role == "system" and not m.get("content")):
                continue
            add_turn(b, i, role, f"<|{role}|>\n", required(m, i), "<|end|>", "\n")
        # The trailing eos closes the document, not a turn: not trained on.
        b.add("<|assistant|>\n" if add_generation_prompt else sw["eos_token"])


@register
class Phi35(Phi3):
    name = "phi-3.5"
    description = "Phi-3.5-mini: Phi-3 format; an empty system message is dropped"
    claims = ("phi-3.5",)
    skip_empty_system = True


@register
class Phi3April(ChatFormat):
    """Phi-3 April-2024 release template: BOS; system (and tool) messages silently dropped; every user turn is
    followed by "<|assistant|>\\n", so add_generation_prompt changes nothing."""

    name = "phi-3-2404"
    description = "Phi-3-mini April 2024 template: drops system messages, assistant header after every user turn"
    claims = ("phi-3-2404",)
    switches = {"bos_token": "<s>"}

    def _render(self, b: Builder, messages: list[dict[str, Any]], add_generation_prompt: bool, sw: dict) -> None:
        b.add(sw["bos_token"])
        for i, m in enumerate(messages):
            if m["role"] == "user":
                b.add("<|user|>\n" + required(m, i) + "<|end|>\n", msg=i, role="user")
                # The header the user turn emits belongs to the assistant reply when there is one; otherwise
                # it acts as the generation prompt.
                if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
                    b.add("<|assistant|>\n", msg=i + 1, role="assistant")
                else:
                    b.add("<|assistant|>\n")
            elif m["role"] == "assistant":
                add_turn(b, i, "assistant", "", required(m, i), "<|end|>", "\n")
