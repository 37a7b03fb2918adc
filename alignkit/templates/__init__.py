"""Chat-format renderers (no Jinja), a registry, and detection by behaviour.

from alignkit import templates
templates.list_formats()                    # registered names
fmt = templates.get_format("qwen2.5")
r = fmt.render(messages, add_generation_prompt=False, **switches)
r.text, r.spans                              # text + labelled character spans
templates.detect(tokenizer_or_template)      # a registered format or None
"""

from __future__ import annotations

# Importing the format modules registers their formats.
from alignkit.templates import (  # noqa: F401
    fmt_chatml,
    fmt_classic,
    fmt_cohere,
    fmt_deepseek,
    fmt_gemma_phi,
    fmt_llama,
    fmt_mistral,
    fmt_others,
    fmt_vlm_chatml,
    fmt_vlm_llava,
    fmt_vlm_others,
)
from alignkit.templates.base import REGISTRY, Builder, ChatFormat, Rendered, Span, TemplateError
from alignkit.templates.detection import GenericFormat, detect, detect_all

__all__ = [
    "Builder",
    "ChatFormat",
    "Rendered",
    "Span",
    "TemplateError",
    "GenericFormat",
    "detect",
    "detect_all",
    "get_format",
    "list_formats",
]


def list_formats() -> list[str]:
    """Names of all registered chat formats, sorted."""
    return sorted(REGISTRY.formats)


def get_format(name: str | ChatFormat) -> ChatFormat:
    """The registered format called `name` (KeyError with the closest names otherwise)."""
    return REGISTRY.get(name)
