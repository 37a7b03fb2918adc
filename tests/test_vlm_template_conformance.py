"""Byte-identical conformance of every multimodal chat format with the official processor template it claims.

For each (format, VLM family in `shared/conformance/vlm/`): the kit's multimodal goldens, then generated
conversations (1-3 images, images in later turns, text-only turns and string content mixed in), rendered by
alignkit and by transformers' Jinja renderer with the official template. Where the official template raises,
alignkit raises TemplateError. Every image part is a span of its own holding the format's placeholder.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit import templates
from alignkit.templates import TemplateError
from tests import conformance_kit as ck

pytestmark = pytest.mark.skipif(not ck.HAVE_VLM_KIT, reason=ck.SKIP_REASON)

VLM_CLAIMS = [(f.name, fam) for f in templates.base.iter_formats() for fam in f.vlm_claims]
REQUIRED_FAMILIES = {
    "qwen2.5-vl",
    "gemma-3",
    "llava-1.5",
    "llava-next",
    "smolvlm",
    "llama-3.2-vision",
    "mistral-small-3.1",
}


def _switches(fmt, kwargs: dict) -> dict:
    # The references are rendered with the clock frozen (ck.FROZEN_NOW) and date_string=ck.DATE_STRING; a format's
    # `date_string` switch stands for both, so it gets that date too (as in test_template_conformance.py).
    kwargs = {"date_string": ck.DATE_STRING, **kwargs}
    return {k: v for k, v in kwargs.items() if k in fmt.switches}


def _check(fmt, messages, r, official: str) -> None:
    assert r.text == official, f"{fmt.name}:\n--- ours\n{r.text!r}\n--- official\n{official!r}"
    pos = 0
    for s in r.spans:  # spans tile the text, in order
        assert s.start == pos and s.end > s.start, (fmt.name, r.spans)
        pos = s.end
    assert pos == len(r.text)
    for s in r.spans:
        if s.trainable:
            assert s.message_index is not None and messages[s.message_index]["role"] == "assistant"
    images = r.image_spans()
    assert all(r.text[s.start : s.end] == fmt.image_placeholder and not s.trainable for s in images), images
    assert len(images) == r.text.count(fmt.image_placeholder), (fmt.name, r.text)


def _compare(fmt, family, messages, add_generation_prompt, **kwargs):
    entry = ck.template_entry(family, ck.VLM_KIT)
    kw = {"bos_token": entry["bos_token"] or "", "eos_token": entry["eos_token"] or "", **kwargs}
    try:
        official = ck.reference_render(family, messages, add_generation_prompt, kit=ck.VLM_KIT, **kw)
    except Exception:  # the official template refuses this conversation
        with pytest.raises(TemplateError):
            fmt.render(messages, add_generation_prompt=add_generation_prompt, **_switches(fmt, kw))
        return
    r = fmt.render(messages, add_generation_prompt=add_generation_prompt, **_switches(fmt, kw))
    _check(fmt, messages, r, official)


def test_the_required_vlm_families_are_claimed():
    assert REQUIRED_FAMILIES <= {fam for _, fam in VLM_CLAIMS}
    for name, _ in VLM_CLAIMS:
        assert templates.get_format(name).multimodal


@pytest.mark.parametrize(("fmt_name", "family"), VLM_CLAIMS)
def test_goldens(fmt_name, family):
    fmt = templates.get_format(fmt_name)
    entry = ck.template_entry(family, ck.VLM_KIT)
    golden = json.loads((ck.VLM_KIT / "renders" / family / "golden.json").read_text(encoding="utf-8"))
    for name, conv in golden["conversations"].items():
        sw = _switches(fmt, conv["template_kwargs"])
        path = ck.VLM_KIT / "renders" / family / f"{name}.txt"
        if entry["render_results"].get(name, "ok") != "ok" or not path.exists():
            with pytest.raises(TemplateError):
                fmt.render(conv["messages"], add_generation_prompt=conv["add_generation_prompt"], **sw)
            continue
        r = fmt.render(conv["messages"], add_generation_prompt=conv["add_generation_prompt"], **sw)
        _check(fmt, conv["messages"], r, path.read_bytes().decode("utf-8"))


_chars = st.one_of(st.characters(blacklist_categories=("Cs",)), st.sampled_from(list(" \n\t😀日本語é")))
# Hypothesis also draws string constants from the code under test, e.g. a format's placeholder "<image>": user text
# holding a placeholder verbatim renders it as text (no image span), which the count check in _check cannot tell apart.
_PLACEHOLDERS = sorted({f.image_placeholder for f in templates.base.iter_formats() if f.multimodal})
_text = (
    st.text(_chars, min_size=1, max_size=20)
    .map(lambda s: s if s.strip() else s + "x")
    .filter(lambda s: not any(p in s for p in _PLACEHOLDERS))
)
_padded = st.tuples(st.sampled_from(["", " ", "\n"]), _text, st.sampled_from(["", " ", "\n"])).map("".join)
_text_part = _padded.map(lambda t: {"type": "text", "text": t})
_image_part = st.sampled_from([{"type": "image"}, {"type": "image", "text": None}])


@st.composite
def conversations(draw):
    """A user/assistant conversation with 0-3 images spread over the user turns (TRL's row shapes)."""
    n_turns = draw(st.integers(1, 3))
    total_images = draw(st.integers(0, 3))
    image_turns = sorted(draw(st.lists(st.integers(0, n_turns - 1), min_size=total_images, max_size=total_images)))
    msgs = []
    system = draw(st.sampled_from(["none", "none", "list", "string"]))
    if system == "list":
        msgs.append({"role": "system", "content": [draw(_text_part)]})
    elif system == "string":
        msgs.append({"role": "system", "content": draw(_padded)})
    for t in range(n_turns):
        images = [draw(_image_part) for _ in range(image_turns.count(t))]
        if not images and draw(st.booleans()):
            user: object = draw(_padded)  # a plain string turn mixed in
        else:
            parts = draw(st.lists(_text_part, min_size=0 if images else 1, max_size=2)) + images
            user = draw(st.permutations(parts))
        msgs.append({"role": "user", "content": list(user) if isinstance(user, (list, tuple)) else user})
        if t < n_turns - 1 or draw(st.booleans()):
            answer = draw(_padded)
            msgs.append(
                {"role": "assistant", "content": draw(st.sampled_from([answer, [{"type": "text", "text": answer}]]))}
            )
    return msgs


@pytest.mark.parametrize(("fmt_name", "family"), VLM_CLAIMS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations(), gen=st.booleans())
def test_generated_conversations(fmt_name, family, messages, gen):
    entry = ck.template_entry(family, ck.VLM_KIT)
    _compare(templates.get_format(fmt_name), family, messages, gen, **(entry.get("render_kwargs") or {}))


def test_text_only_formats_refuse_list_content_naming_the_message():
    with pytest.raises(
        TemplateError, match=r"messages\[0\]\['content'\] must be a string \(this format is text-only\)"
    ):
        templates.get_format("chatml").render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_unsupported_parts_are_refused_naming_the_part():
    fmt = next((templates.get_format(n) for n, _ in VLM_CLAIMS), None)
    if fmt is None:
        pytest.fail("no multimodal format is registered")
    with pytest.raises(TemplateError, match=r"messages\[0\]\['content'\]\[1\]\['type'\] = 'video'"):
        fmt.render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}])
    with pytest.raises(TemplateError, match=r"messages\[0\]\['content'\]\[0\] is a text part without a string 'text'"):
        fmt.render([{"role": "user", "content": [{"type": "text"}]}])
