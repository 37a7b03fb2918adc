"""Byte-identical conformance of every registered chat format with the official template it claims.

For each (format, claimed template family): the kit's golden conversations, then generated ones
(hypothesis), rendered by alignkit and by transformers' Jinja renderer with the official template. Where
the official template raises, the alignkit renderer must raise TemplateError too.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit import templates
from alignkit.templates import TemplateError
from tests import conformance_kit as ck

pytestmark = pytest.mark.skipif(not ck.HAVE_KIT, reason=ck.SKIP_REASON)

CLAIMS = [(f.name, fam) for f in templates.base.iter_formats() for fam in f.claims]


def _switches(fmt, family):
    sw = ck.format_switches_for(family)
    return {k: v for k, v in sw.items() if k in fmt.switches}


def _check_spans(fmt_name, messages, r):
    # Spans tile the text exactly and every assistant message owns trainable text.
    pos = 0
    for s in r.spans:
        assert s.start == pos and s.end > s.start, (fmt_name, r.spans)
        pos = s.end
    assert pos == len(r.text)
    for s in r.spans:
        if s.trainable:
            assert s.message_index is not None and messages[s.message_index]["role"] == "assistant"


def _compare(fmt_name, family, messages, add_generation_prompt):
    fmt = templates.get_format(fmt_name)
    try:
        expected = ck.reference_render(family, messages, add_generation_prompt)
    except Exception as e:  # the official template refuses this conversation
        with pytest.raises(TemplateError):
            fmt.render(messages, add_generation_prompt=add_generation_prompt, **_switches(fmt, family))
        return type(e)
    r = fmt.render(messages, add_generation_prompt=add_generation_prompt, **_switches(fmt, family))
    assert r.text == expected, f"{fmt_name} vs official {family}:\n--- ours\n{r.text!r}\n--- official\n{expected!r}"
    _check_spans(fmt_name, messages, r)
    return None


def test_at_least_20_formats_claim_templates():
    assert len(templates.list_formats()) >= 20
    assert len({fam for _, fam in CLAIMS}) >= 20


@pytest.mark.parametrize(("fmt_name", "family"), CLAIMS)
def test_goldens(fmt_name, family):
    fmt = templates.get_format(fmt_name)
    for name, (messages, gen, expected) in ck.goldens(family).items():
        if expected is None:
            with pytest.raises(TemplateError):
                fmt.render(messages, add_generation_prompt=gen, **_switches(fmt, family))
            continue
        r = fmt.render(messages, add_generation_prompt=gen, **_switches(fmt, family))
        assert r.text == expected, f"{fmt_name}/{name}:\n--- ours\n{r.text!r}\n--- golden\n{expected!r}"
        _check_spans(fmt_name, messages, r)


_chars = st.one_of(
    st.characters(blacklist_categories=("Cs",)),
    st.sampled_from(list(" \n\t\r😀👍🏽👩‍💻日本語éא")),
)
_text = st.text(_chars, min_size=1, max_size=30).map(lambda s: s if s.strip() else s + "x")
_padded = st.tuples(st.sampled_from(["", " ", "  ", "\n", "\n\n"]), _text, st.sampled_from(["", " ", "\n", "\n\n"]))
_content = _padded.map(lambda t: "".join(t))


@st.composite
def conversations(draw):
    n_turns = draw(st.integers(1, 5))
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(_content)})
    for _ in range(n_turns):
        msgs.append({"role": "user", "content": draw(_content)})
        msgs.append({"role": "assistant", "content": draw(_content)})
    gen = draw(st.booleans())
    if gen:
        msgs.pop()  # end on a user turn and ask for the generation prompt
    return msgs, gen


@pytest.mark.parametrize(("fmt_name", "family"), CLAIMS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations())
def test_generated_conversations(fmt_name, family, conv):
    messages, gen = conv
    _compare(fmt_name, family, messages, gen)
