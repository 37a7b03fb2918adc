"""Running the tool calls of a rollout: concurrently, each bounded in time and output, failures as messages.

``run_tool_calls(calls, tools)`` runs every call (sync or async callables, by name) at once, each on a daemon
thread of its own, and returns one :class:`ToolResult` per call, in order. Whatever a tool does, the rollout goes
on: an unknown tool, arguments the function does not take, an exception, a timeout, or output over
``max_output_chars`` (cut, with a note) each become the text the model reads as that call's result, and
``ToolResult.failure`` names the kind for the metrics (``unknown_tool``, ``bad_arguments``, ``error``, ``timeout``,
``truncated``; None when the call went through). Output that is not text is converted (JSON for dicts, lists and
numbers, ``str`` otherwise) and flagged ``converted``.

A sync call that times out keeps its (daemon) thread until the function returns, since Python cannot stop a
thread; nothing waits for it, not even interpreter exit. An async tool is cancelled at its timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.tools.base import ToolCall

__all__ = ["FAILURES", "ToolResult", "run_tool_calls"]

FAILURES = ("unknown_tool", "bad_arguments", "error", "timeout", "truncated")


@dataclass
class ToolResult:
    """The result of one call: ``content`` is what the model reads (a tool message's content)."""

    name: str
    content: str
    failure: str | None = None  # one of FAILURES, None for a call that went through
    seconds: float = 0.0
    converted: bool = False  # the tool returned something other than text (converted to text)


def _as_text(value: Any) -> tuple[str, bool]:  # noqa: ANN401
    """(the text of a tool's return value, whether it was already text)."""
    if isinstance(value, str):
        return value, True
    if isinstance(value, (dict, list, int, float, bool)) or value is None:
        try:
            return json.dumps(value, ensure_ascii=False), False
        except (TypeError, ValueError):
            pass
    return str(value), False


def _invoke(fn: Callable[..., Any], arguments: Mapping[str, Any], timeout_s: float) -> Any:  # noqa: ANN401
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
        return asyncio.run(asyncio.wait_for(fn(**arguments), timeout_s))  # an async tool is cancelled on timeout
    out = fn(**arguments)
    if inspect.isawaitable(out):
        return asyncio.run(asyncio.wait_for(out, timeout_s))
    return out


def _bad_arguments(fn: Callable[..., Any], arguments: Mapping[str, Any]) -> str | None:
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as e:
        return str(e)
    except ValueError:  # no signature (a builtin): let the call itself say
        return None
    return None


class _Call(threading.Thread):
    """One tool call on a daemon thread: a hanging tool never holds up the rollout or the interpreter's exit."""

    def __init__(self, fn: Callable[..., Any], arguments: Mapping[str, Any], timeout_s: float) -> None:
        super().__init__(daemon=True, name="alignkit-tool")
        self.fn, self.arguments, self.timeout_s = fn, arguments, timeout_s
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = _invoke(self.fn, self.arguments, self.timeout_s)
        except BaseException as e:  # noqa: BLE001 - reported as the call's result
            self.error = e


def run_tool_calls(
    calls: Sequence[ToolCall],
    tools: Mapping[str, Callable[..., Any]] | Sequence[Mapping[str, Callable[..., Any]]],
    *,
    timeout_s: float = 30.0,
    max_output_chars: int = 4096,
) -> list[ToolResult]:
    """Run ``calls`` (parsed by :func:`alignkit.tools.parse_tool_calls`) with ``tools`` (name -> callable; or one
    such mapping per call, when the calls of several rollouts with their own environments run together), all at
    once, each within ``timeout_s`` seconds of the start; results in the calls' order."""
    t0 = time.perf_counter()
    per_call = [tools] * len(calls) if isinstance(tools, Mapping) else list(tools)
    if len(per_call) != len(calls):
        raise ValueError(f"{len(per_call)} tool mappings for {len(calls)} calls: give one mapping, or one per call")
    running: list[_Call | ToolResult] = []
    for c, tools in zip(calls, per_call):
        fn = tools.get(c["name"])
        if fn is None:
            msg = f"Error: there is no tool {c['name']!r}; the tools are {sorted(tools)}."
            running.append(ToolResult(c["name"], msg, "unknown_tool"))
            continue
        bad = _bad_arguments(fn, c["arguments"])
        if bad is not None:
            msg = f"Error: tool {c['name']!r} was called with arguments it does not take ({bad})."
            running.append(ToolResult(c["name"], msg, "bad_arguments"))
            continue
        th = _Call(fn, c["arguments"], timeout_s)
        th.start()
        running.append(th)
    results = []
    for c, r in zip(calls, running):
        if isinstance(r, ToolResult):
            results.append(r)
            continue
        r.join(max(0.0, t0 + timeout_s - time.perf_counter()))
        results.append(_result(c["name"], r, time.perf_counter() - t0, max_output_chars))
    return results


def _result(name: str, call: _Call, seconds: float, max_output_chars: int) -> ToolResult:
    if call.is_alive() or isinstance(call.error, (asyncio.TimeoutError, TimeoutError)):
        return ToolResult(name, f"Error: tool {name!r} did not finish in time.", "timeout", seconds)
    if call.error is not None:
        msg = f"Error: tool {name!r} raised {type(call.error).__name__}: {call.error}"
        return ToolResult(name, msg[:max_output_chars], "error", seconds)
    text, was_text = _as_text(call.value)
    failure = None
    if len(text) > max_output_chars:
        cut = len(text) - max_output_chars
        text, failure = text[:max_output_chars] + f"\n[... {cut} more characters cut]", "truncated"
    return ToolResult(name, text, failure, seconds, converted=not was_text)
