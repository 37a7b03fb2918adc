"""Detection by behaviour: every official template is recognised, also after cosmetic Jinja edits."""

from __future__ import annotations

import copy

import pytest

from alignkit import templates
from tests import conformance_kit as ck

pytestmark = pytest.mark.skipif(not ck.HAVE_KIT, reason=ck.SKIP_REASON)

CLAIMED = sorted({fam for f in templates.base.iter_formats() for fam in f.claims})
PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye!"},
]


def _tokenizer(family, template):
    tok = copy.deepcopy(ck.load_tokenizer(ck.template_entry(family)["render_tokenizer"]))
    tok.chat_template = template
    return tok


def _cosmetic(template: str) -> str:
    """Edits that change the Jinja source but not one rendered byte."""
    return "{#- edited copy -#}{% set _alignkit_unused = 0 %}" + template.replace("{{ ", "{{  ").replace(" }}", "  }}")


@pytest.mark.parametrize("family", CLAIMED)
@pytest.mark.parametrize("edit", ["verbatim", "cosmetic"])
def test_detect_official_template(family, edit):
    text = ck.template_text(family)
    if edit == "cosmetic":
        text = _cosmetic(text)
    tok = _tokenizer(family, text)
    fmt = templates.detect(tok)
    if family in ("hermes-3-tool-use", "command-r-plus-tool-use"):
        # these templates refuse every conversation without `tools`: nothing to observe, nothing detected
        assert fmt is None or family in fmt.claims
        return
    assert fmt is not None, family
    # the detected format may be an identical sibling (e.g. llama-3.3 renders exactly like llama-3.1)
    sw = {k: getattr(tok, k) or "" for k in ("bos_token", "eos_token") if k in fmt.switches}
    if "date_string" in fmt.switches:
        sw["date_string"] = ck.DATE_STRING
    try:
        want = ck.reference_render(family, PROBE, False, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    except Exception:
        return
    assert fmt.render(PROBE, **sw).text == want, (family, fmt.name)


def test_detect_returns_none_for_unknown_template():
    tok = _tokenizer("zephyr", "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert templates.detect(tok) is None
