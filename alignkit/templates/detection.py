"""Detection by behaviour: render probe conversations with the model's own template and match them.

A template with cosmetic Jinja edits that renders the same text is still recognised. When no registered
format matches, `GenericFormat` renders with the tokenizer's own template and derives assistant spans from
incremental renders, checking that each render extends the previous one.
"""

from __future__ import annotations

from typing import Any

from alignkit.templates.base import REGISTRY, Builder, ChatFormat, Rendered, TemplateError

PROBES: list[tuple[list[dict[str, Any]], bool]] = [
    ([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 😀"}], False),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Q1\n\nwith blank line"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "  Q2  "},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": " two "},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "four\n"},
        ],
        False,
    ),
    ([{"role": "user", "content": "only user"}], False),
    ([{"role": "user", "content": "only user"}], True),
]

# Multimodal formats must also match on image conversations (TRL's list-of-parts content).
MULTIMODAL_PROBES: list[tuple[list[dict[str, Any]], bool]] = [
    (
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "image"}]},
        ],
        True,
    ),
    ([{"role": "user", "content": [{"type": "text", "text": "no image"}]}], True),
    (
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption?"}]},
        ],
        True,
    ),
]


def _template_and_tokens(obj: Any) -> tuple[str, dict[str, str] | None]:
    if isinstance(obj, str):
        return obj, None
    template = getattr(obj, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what inference uses
        template = template.get("default")
    if not template:
        raise ValueError(f"{type(obj).__name__} has no chat_template; pick a format with chat_format=<name>")
    tokens = {k: getattr(obj, k, None) or "" for k in ("bos_token", "eos_token")}
    return template, tokens


def _official(template: str, messages: list, gen: bool, kwargs: dict[str, Any]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen, **kwargs)
    return out[0][0] if isinstance(out, tuple) else out[0]


def _matches(fmt: ChatFormat, template: str, tokens: dict[str, str] | None) -> bool:
    kw: dict[str, Any] = {}
    for k in ("bos_token", "eos_token"):
        if tokens is not None:
            kw[k] = tokens[k]
        elif k in fmt.switches:
            kw[k] = fmt.switches[k] or ""
    # No date is passed: templates that print a date then use their own default or today's date, and so
    # does each format's `date_string` switch (None = today), whichever way the template reads the clock.
    ours_kw = {k: v for k, v in kw.items() if k in fmt.switches}
    rendered = 0
    for messages, gen in PROBES + (MULTIMODAL_PROBES if fmt.multimodal else []):
        try:
            want: str | None = _official(template, messages, gen, kw)
        except Exception:  # noqa: BLE001 - the template refusing a probe is itself a behaviour to match
            want = None
        try:
            got: str | None = fmt.render(messages, add_generation_prompt=gen, **ours_kw).text
        except TemplateError:
            got = None
        if got != want:
            return False
        rendered += want is not None
    # A format that refuses every probe, like the template does, has shown nothing (e.g. tool-only templates).
    return rendered > 0


def detect_all(tokenizer_or_template: Any) -> list[ChatFormat]:
    """Every registered format whose renders equal the template's on all probe conversations; multimodal
    formats (which also matched the image probes) first."""
    template, tokens = _template_and_tokens(tokenizer_or_template)
    found = [f for f in REGISTRY.formats.values() if _matches(f, template, tokens)]
    return sorted(found, key=lambda f: not f.multimodal)


def detect(tokenizer_or_template: Any) -> ChatFormat | None:
    """The registered format that renders exactly like this tokenizer's (or template string's) template.

    Several formats can render identically (e.g. two Llama 3 point releases); the first registered wins,
    which is harmless because they then produce the same text and spans on the probes.
    """
    found = detect_all(tokenizer_or_template)
    return found[0] if found else None


class GenericFormat(ChatFormat):
    """Renders with the tokenizer's own template; assistant spans from incremental renders, verified.

    For each assistant message i: render(messages[:i], generation prompt) must be a prefix of
    render(messages[:i+1]), which must be a prefix of the full render. The assistant span is what message i
    added, from its content to the end of the end-of-turn marker (trailing whitespace excluded). Templates
    that rewrite earlier turns (e.g. drop reasoning from history) break the prefix property: then spans are
    ambiguous and we raise rather than guess.
    """

    name = "generic"
    description = "the tokenizer's own template, spans from incremental renders"
    switches: dict[str, Any] = {"bos_token": None, "eos_token": None}

    def __init__(self, tokenizer: Any) -> None:
        self.template, self.tokens = _template_and_tokens(tokenizer)

    def _r(self, messages: list, gen: bool, sw: dict) -> str:
        kw = {**self.tokens, **{k: v for k, v in sw.items() if v is not None}}
        try:
            return _official(self.template, messages, gen, kw)
        except Exception as e:  # noqa: BLE001
            raise TemplateError(f"the tokenizer's chat template refused this conversation: {e}") from e

    def _render(self, b: Builder, messages: list, add_generation_prompt: bool, sw: dict) -> None:
        full = self._r(messages, add_generation_prompt, sw)
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._r(messages[:i], True, sw) if i else ""
            upto = self._r(messages[: i + 1], False, sw)
            if not upto.startswith(before):
                before = self._r(messages[:i], False, sw) if i else ""
            if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
                raise TemplateError(
                    "cannot derive assistant spans: this chat template rewrites earlier turns, so incremental "
                    f"renders are not prefixes of each other (at message {i}). Pick a registered format with "
                    f"chat_format=<name>; registered: {sorted(REGISTRY.formats)}"
                )
            added = upto[len(before) :]
            raw = m.get("content") or ""
            start = added.find(raw) if raw else -1
            if start < 0 and raw.strip():  # the template stripped the content
                start = added.find(raw.strip())
            start = start if start >= 0 else len(added) - len(added.lstrip())
            end = len(added.rstrip())
            b.add(full[pos : len(before) + start])
            b.add(added[start:end], msg=i, role="assistant", train=True)
            pos = len(before) + end
        b.add(full[pos:])

    def render(self, messages: Any, add_generation_prompt: bool = False, **switches: Any) -> Rendered:
        return super().render(messages, add_generation_prompt, **switches)
