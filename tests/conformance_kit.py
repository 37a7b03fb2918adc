"""Access to the shared conformance kit (`../shared/conformance`): official templates, goldens, tokenizers.

Test fixtures, not product code. Everything here returns None / skips when the kit is absent (a user's
clone); CI always has it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import sys
from pathlib import Path

KIT = Path(os.environ.get("ALIGNKIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "conformance"
HAVE_KIT = (KIT / "manifest.json").is_file()
VLM_KIT = KIT / "vlm"  # processor (multimodal) templates: same layout as KIT
HAVE_VLM_KIT = (VLM_KIT / "manifest.json").is_file()
SKIP_REASON = f"conformance kit not found at {KIT} (set ALIGNKIT_SHARED to the shared/ folder)"
FROZEN_NOW = _dt.datetime(2024, 7, 26, 12, 0, 0)
DATE_STRING = "26 Jul 2024"


@functools.cache
def manifest(kit: Path = KIT) -> dict:
    return json.loads((kit / "manifest.json").read_text(encoding="utf-8"))


@functools.cache
def template_entry(family: str, kit: Path = KIT) -> dict:
    for t in manifest(kit)["templates"]:
        if t["family"] == family:
            return t
    raise KeyError(f"no template family {family!r} in the conformance manifest {kit}")


@functools.cache
def template_text(family: str, kit: Path = KIT) -> str:
    return (kit / template_entry(family, kit)["file"]).read_bytes().decode("utf-8")


def goldens(family: str, kit: Path = KIT) -> dict:
    """{conversation name: (messages, add_generation_prompt, expected text or None if the template raises)}."""
    entry = template_entry(family, kit)
    g = json.loads((kit / "renders" / family / "golden.json").read_text(encoding="utf-8"))
    out = {}
    for name, conv in g["conversations"].items():
        path = kit / "renders" / family / f"{name}.txt"
        expected = path.read_bytes().decode("utf-8") if path.exists() else None
        if entry["render_results"].get(name, "ok") != "ok":
            expected = None
        out[name] = (conv["messages"], conv["add_generation_prompt"], expected)
    return out


class _FrozenDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206
        return cls(2024, 7, 26, 12, 0, 0, tzinfo=tz)


def reference_render(family: str, messages: list, add_generation_prompt: bool, kit: Path = KIT, **overrides) -> str:
    """Render with the official Jinja template exactly as the goldens were made (transformers' renderer,
    bos/eos from the manifest, date_string fixed, wall clock frozen). For the VLM kit, OpenAI `image_url` parts
    become image parts first, as the processor does."""
    from transformers.utils import chat_template_utils as ctu

    entry = template_entry(family, kit)
    kw = {"date_string": DATE_STRING, **(entry.get("render_kwargs") or {})}
    kw["bos_token"] = entry["bos_token"] or ""
    kw["eos_token"] = entry["eos_token"] or ""
    kw.update(overrides)
    tools = kw.pop("tools", None)
    msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if kit == VLM_KIT:
        for m in msgs:
            if isinstance(m.get("content"), list):
                m["content"] = [_openai_image(p) for p in m["content"]]
    saved = ctu.datetime
    ctu.datetime = _FrozenDatetime
    try:
        out = ctu.render_jinja_template(
            [msgs],
            tools=tools,
            chat_template=template_text(family, kit),
            add_generation_prompt=add_generation_prompt,
            **kw,
        )
    finally:
        ctu.datetime = saved
    return out[0][0] if isinstance(out, tuple) else out[0]


def _openai_image(part):  # noqa: ANN001, ANN202
    if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
        info = part["image_url"]
        return {"type": "image", "url": info.get("url", "") if isinstance(info, dict) else info}
    return part


def format_switches_for(family: str, kit: Path = KIT) -> dict:
    """The switches an alignkit format needs to reproduce the goldens' rendering call."""
    entry = template_entry(family, kit)
    sw = {"bos_token": entry["bos_token"] or "", "eos_token": entry["eos_token"] or "", "date_string": DATE_STRING}
    sw.update(entry.get("render_kwargs") or {})
    return sw


@functools.cache
def load_tokenizer(name: str):  # noqa: ANN201
    sys.path.insert(0, str(KIT))
    import kit_tokenizers

    return kit_tokenizers.load(name)
