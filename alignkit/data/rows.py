"""Row formats accepted everywhere (TRL's field names), normalised to one shape with clear errors.

Accepted rows:
    {"messages": [{"role", "content"}, ...]}                         conversational
    {"conversations": [{"from", "value"}, ...]}                       ShareGPT
    {"prompt": str, "completion": str}                                plain prompt / completion
    {"prompt": [messages], "completion": [messages]}                  conversational prompt / completion
    {"text": str}                                                     plain language modelling

Every row becomes a `Sample`: either `messages` (+ `completion_start`, the index of the first completion
message, for prompt/completion rows) or plain `prompt` / `text` strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}


class RowError(ValueError):
    """A dataset row that does not have the expected shape. The message names the row, field and expectation."""

    def __init__(self, index: int | None, field: str, expected: str, got: Any = None) -> None:
        where = f"row {index}" if index is not None else "row"
        got_s = "" if got is None else f"; got {_short(got)}"
        super().__init__(f"{where}, field {field!r}: expected {expected}{got_s}")
        self.index, self.field = index, field


def _short(x: Any, n: int = 80) -> str:
    s = repr(x) if not isinstance(x, type) else x.__name__
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass
class Sample:
    """A normalised row: `messages` for chat rows, or plain strings for `text` / plain prompt-completion rows."""

    messages: list[dict[str, Any]] | None = None
    completion_start: int | None = None  # first message index of the completion (prompt/completion rows)
    prompt: str | None = None  # plain prompt (with `text` holding the completion)
    text: str | None = None
    tools: list[dict] | None = None


def check_messages(msgs: Any, index: int | None, field: str, *, alternate: bool = True) -> list[dict[str, Any]]:
    if not isinstance(msgs, Sequence) or isinstance(msgs, (str, bytes)):
        raise RowError(index, field, "a list of {'role', 'content'} dicts", type(msgs))
    if len(msgs) == 0:
        raise RowError(index, field, "a non-empty list of messages", msgs)
    out = []
    for j, m in enumerate(msgs):
        f = f"{field}[{j}]"
        if not isinstance(m, Mapping):
            raise RowError(index, f, "a dict with 'role' and 'content'", type(m))
        if "role" not in m:
            raise RowError(index, f + ".role", f"one of {ROLES}", "missing")
        if m["role"] not in ROLES:
            raise RowError(index, f + ".role", f"one of {ROLES}", m["role"])
        c = m.get("content")
        if c is None and not m.get("tool_calls"):
            raise RowError(index, f + ".content", "a string", "missing")
        if c is not None and not isinstance(c, str):
            raise RowError(index, f + ".content", "a string (multimodal parts are not supported here)", type(c))
        out.append({k: v for k, v in m.items() if v is not None})
    if alternate:
        _check_alternation(out, index, field)
    return out


def _check_alternation(msgs: list[dict[str, Any]], index: int | None, field: str) -> None:
    """user and assistant must alternate (tool results may follow an assistant turn; one leading system)."""
    prev = None
    for j, m in enumerate(msgs):
        r = m["role"]
        if r == "system":
            if j != 0:
                raise RowError(index, f"{field}[{j}].role", "'system' only as the first message", r)
            continue
        if r == "tool":
            if prev not in ("assistant", "tool"):
                raise RowError(index, f"{field}[{j}].role", "'tool' only after an assistant message", r)
        elif r == prev:
            want = "assistant" if r == "user" else "user"
            raise RowError(index, f"{field}[{j}].role", f"{want!r} (user and assistant must alternate)", r)
        elif r == "assistant" and prev is None:
            raise RowError(index, f"{field}[{j}].role", "'user' before the first assistant message", r)
        prev = r


def _sharegpt(turns: Any, index: int | None) -> list[dict[str, Any]]:
    if not isinstance(turns, Sequence) or isinstance(turns, (str, bytes)):
        raise RowError(index, "conversations", "a list of {'from', 'value'} dicts", type(turns))
    msgs = []
    for j, t in enumerate(turns):
        if not isinstance(t, Mapping) or "from" not in t or "value" not in t:
            raise RowError(index, f"conversations[{j}]", "a dict with 'from' and 'value'", t)
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise RowError(index, f"conversations[{j}].from", f"one of {sorted(SHAREGPT_ROLES)}", t["from"])
        msgs.append({"role": role, "content": t["value"]})
    return check_messages(msgs, index, "conversations")


def normalize_row(row: Mapping[str, Any], index: int | None = None, *, alternate: bool = True) -> Sample:
    """One dataset row -> `Sample`, or `RowError` naming the row index, the field and what was expected."""
    if not isinstance(row, Mapping):
        raise RowError(index, "<row>", "a dict", type(row))
    tools = row.get("tools")
    if "messages" in row and row["messages"] is not None:
        return Sample(messages=check_messages(row["messages"], index, "messages", alternate=alternate), tools=tools)
    if "conversations" in row and row["conversations"] is not None:
        return Sample(messages=_sharegpt(row["conversations"], index), tools=tools)
    if "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return Sample(prompt=p, text=c)
        if isinstance(p, str) or isinstance(c, str):
            raise RowError(index, "prompt/completion", "both strings or both lists of messages", (type(p), type(c)))
        pm = check_messages(p, index, "prompt", alternate=False)
        cm = check_messages(c, index, "completion", alternate=False)
        msgs = pm + cm
        _check_alternation(msgs, index, "prompt+completion")
        return Sample(messages=msgs, completion_start=len(pm), tools=tools)
    if "text" in row:
        if not isinstance(row["text"], str):
            raise RowError(index, "text", "a string", type(row["text"]))
        return Sample(text=row["text"])
    raise RowError(
        index,
        "<fields>",
        "one of 'messages', 'conversations' (ShareGPT), 'prompt'+'completion', or 'text'",
        sorted(row.keys()),
    )
