r"""Math answer matching: GSM8K (``#### N``) and MATH-style (``\boxed{...}``) final answers.

The model's final answer is the content of its last complete ``\boxed{}`` (or ``\fbox{}``), else the text after
its last ``####``, else its last number. Both it and the reference go through ``normalize_answer`` (LaTeX
spacing, ``\left``/``\right``, ``\dfrac``, ``\frac12``, ``$``, ``%``, degrees, trailing units, thousands
commas, a short ``x =`` prefix) and match when the strings are equal or both are the same rational number
(``0.5`` = ``1/2`` = ``\frac{1}{2}``, ``18.00`` = ``18``, ``1\frac{4}{5}`` = ``9/5``). No symbolic algebra:
``\sqrt{8}`` does not match ``2\sqrt{2}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from alignkit.reward_funcs.core import RewardFunc, completion_text, register_reward

__all__ = [
    "answers_match",
    "extract_boxed",
    "extract_final_answer",
    "math_answer_reward",
    "normalize_answer",
    "parse_number",
]

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _group(s: str, i: int) -> tuple[str, int] | None:
    r"""Balanced ``{...}`` starting at ``s[i] == '{'`` -> (content, index after it); None if unbalanced.
    A backslash escapes the next character, so ``\{`` and ``\}`` do not count."""
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1 : j], j + 1
        j += 1
    return None


def _arg(s: str, i: int) -> tuple[str, int] | None:
    r"""One TeX argument at ``s[i:]`` (spaces skipped): a ``{group}``, a ``\command`` or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s) or s[i] == "}":
        return None
    if s[i] == "{":
        return _group(s, i)
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def extract_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` / ``\fbox{...}`` (nested braces kept), or None.

    ``\boxed 5`` (no braces) gives the next token; an unclosed ``\boxed{`` (truncated generation) is skipped."""
    found = None
    for m in _BOXED.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            g = _group(text, i)
            if g is not None:
                found = g[0]
        elif m.end() < len(text) and text[m.end()] == " ":
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                found = tok.group(0)
    return found


def extract_final_answer(text: str) -> str | None:
    r"""The model's final answer: last ``\boxed{}``, else after the last ``####`` (to end of line), else the last
    number in the text; None when there is none."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        # "#### 18 eggs" -> "18": a leading number followed by plain words only
        if m := re.fullmatch(r"\$?\s*(" + _NUMBER.pattern + r")\s*[A-Za-z .]*", tail):
            return m.group(1)
        if tail:
            return tail
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


_FRAC_SQRT = re.compile(r"\\(frac|sqrt(?:\[[^\]]*\])?)(?![A-Za-z])")


def _fix_fracs(s: str) -> str:
    r"""``\frac12``, ``\frac 59``, ``\frac{270}7`` -> ``\frac{1}{2}`` ...; same for ``\sqrt2``."""
    out, i = [], 0
    while i < len(s):
        m = _FRAC_SQRT.search(s, i)
        if m is None:
            out.append(s[i:])
            break
        out.append(s[i : m.start()])
        n_args = 2 if m.group(1) == "frac" else 1  # \sqrt[3]{x}: the index is part of the command
        j, args = m.end(), []
        for _ in range(n_args):
            a = _arg(s, j)
            if a is None:
                break
            args.append(_fix_fracs(a[0]))
            j = a[1]
        if len(args) < n_args:  # malformed: keep the rest verbatim
            out.append(s[m.start() :])
            break
        out.append(f"\\{m.group(1)}" + "".join("{" + a + "}" for a in args))
        i = j
    return "".join(out)


_UNIT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*([^{}]*)\}(?:\^\{?\d\}?)?\s*$")
_WRAPPED = re.compile(r"^\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_answer(s: Any) -> str:
    r"""A canonical string for comparing final answers (see the module docstring). Idempotent: the rules are
    applied until nothing changes (``\boxed{\boxed{1}}``, removals that expose another unit, ...)."""
    s = str(s)
    for _ in range(8):
        t = _normalize_once(s)
        if t == s:
            break
        s = t
    return s


# One left-to-right pass, so "\\" (a matrix row break) is never read as "\" + the next character.
_TEX_TOKEN = re.compile(r"\\\\|\\[()\[\],;:! $%]|\\(?:left|right)(?:\.|(?![A-Za-z]))|\\displaystyle(?![A-Za-z])")


def _tex_token(m: re.Match) -> str:
    tok = m.group(0)
    if tok == "\\\\":
        return tok
    return " " if tok[1:] in (",", ";", ":", "!", " ") else ""


def _normalize_once(s: str) -> str:
    s = s.strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_boxed(s) or s
    elif "####" in s:
        s = s.rsplit("####", 1)[1]
    s = _TEX_TOKEN.sub(_tex_token, s.strip()).replace("$", "").replace("%", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for deg in ("^{\\circ}", "^\\circ", "\\circ", "°"):
        s = s.replace(deg, "")
    s = s.strip()
    # trailing units: "5.4 \text{ cents}", "864 \mbox{ inches}^2"; a lone "\text{even}" is the answer itself
    while (m := _UNIT.search(s)) is not None and s[: m.start()].strip():
        s = s[: m.start()].strip()
    if m := re.fullmatch(r"(.*\d)\s*(?:degrees?|dollars?|cents?|units?)", s):
        s = m.group(1)
    while (m := _WRAPPED.match(s)) is not None:
        s = m.group(1).strip()
    s = _fix_fracs(s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)  # 4210_{5} = 4210_5, x^{2} = x^2
    s = s.rstrip(".").lstrip("+") if s not in (".", "+") else s
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    # "x=5" -> "5" when the left side is one symbol (the reference and the model may differ in writing it)
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and re.fullmatch(r"[A-Za-z]|\\[A-Za-z]+", lhs) and rhs:
        s = rhs
    if m := re.fullmatch(r"\(([A-Za-z])\)", s):  # multiple choice "(C)" -> "C"
        s = m.group(1)
    return s


def parse_number(s: str) -> Fraction | None:
    r"""A normalised answer as an exact rational: ``-12``, ``0.35``, ``.5``, ``3/4``, ``\frac{3}{4}``,
    ``1\frac{4}{5}`` (mixed number); None for anything else."""
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:]
    dec = r"\d+(?:\.\d*)?|\.\d+"
    try:
        if re.fullmatch(dec, s):
            return sign * Fraction(s)
        if m := re.fullmatch(rf"({dec})/({dec})", s):
            return sign * Fraction(m.group(1)) / Fraction(m.group(2))
        if m := re.fullmatch(rf"(\d+)?\\frac\{{(-?(?:{dec}))\}}\{{({dec})\}}", s):
            whole = Fraction(m.group(1)) if m.group(1) else Fraction(0)
            return sign * (whole + Fraction(m.group(2)) / Fraction(m.group(3)))
    except ZeroDivisionError:
        return None
    return None


def answers_match(prediction: Any, reference: Any) -> bool:
    """True when two final answers are the same after normalisation, or are equal rational numbers."""
    if prediction is None or reference is None:
        return False
    p, r = normalize_answer(prediction), normalize_answer(reference)
    if not p:
        return False
    if p == r:
        return True
    pn, rn = parse_number(p), parse_number(r)
    if pn is not None and rn is not None:
        return pn == rn
    return p.isalpha() and r.isalpha() and p.lower() == r.lower()


def math_answer_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    answer: Sequence[Any] | None = None,
    **columns: Any,
) -> list[float | None]:
    """1.0 when the completion's final answer matches the ``answer`` column, else 0.0; None for every sample when
    the dataset has no ``answer`` column, and for rows whose answer is None."""
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for c, ref in zip(completions, answer, strict=True):
        if ref is None:
            out.append(None)
            continue
        pred = extract_final_answer(completion_text(c))
        out.append(1.0 if answers_match(pred, ref) else 0.0)
    return out


math_answer_reward.__name__ = "math_answer"


@register_reward("math_answer")
def _math_answer() -> RewardFunc:
    return math_answer_reward
