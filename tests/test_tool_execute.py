"""Running tool calls: concurrently, bounded, and whatever a tool does the caller gets a result for the model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from alignkit.tools import ToolResult, run_tool_calls


def add(a: int, b: int) -> int:
    return a + b


def shout(text: str) -> str:
    return text.upper()


def hang(seconds: float = 60.0) -> str:
    time.sleep(seconds)
    return "never"


def boom() -> str:
    raise RuntimeError("disk on fire")


def huge() -> str:
    return "x" * 1_000_000


def table() -> dict:
    return {"rows": [1, 2], "ok": True}


class Opaque:
    def __str__(self) -> str:
        return "<opaque thing>"


async def slow_async(x: int) -> int:
    await asyncio.sleep(60)
    return x


async def fast_async(x: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * x


TOOLS = {f.__name__: f for f in (add, shout, hang, boom, huge, table, slow_async, fast_async)} | {"opaque": Opaque}


def _call(name, **arguments):  # noqa: ANN001, ANN202
    return {"name": name, "arguments": arguments}


def test_clean_calls_in_order_with_text_and_converted_results():
    out = run_tool_calls([_call("add", a=2, b=3), _call("shout", text="hi"), _call("table"), _call("fast_async", x=4)],
                         TOOLS)  # fmt: skip
    assert [r.content for r in out] == ["5", "HI", '{"rows": [1, 2], "ok": true}', "8"]
    assert [r.failure for r in out] == [None] * 4
    assert [r.converted for r in out] == [True, False, True, True]


def test_every_failure_becomes_a_message_and_a_counted_kind():
    calls = [_call("hang", seconds=30), _call("boom"), _call("huge"), _call("nope", q=1), _call("add", a=1),
             _call("slow_async", x=1), _call("opaque"), _call("add", a=1, b=1)]  # fmt: skip
    t0 = time.perf_counter()
    out = run_tool_calls(calls, TOOLS, timeout_s=0.5, max_output_chars=100)
    assert time.perf_counter() - t0 < 5  # the hanging and the slow tool are not waited for
    kinds = [r.failure for r in out]
    assert kinds == ["timeout", "error", "truncated", "unknown_tool", "bad_arguments", "timeout", None, None]
    assert "disk on fire" in out[1].content and out[1].content.startswith("Error: tool 'boom' raised RuntimeError")
    assert out[2].content.startswith("x" * 100) and "999900 more characters cut" in out[2].content
    assert "there is no tool 'nope'" in out[3].content and "'add'" in out[3].content
    assert "missing a required argument: 'b'" in out[4].content
    assert out[6].content == "<opaque thing>" and out[6].converted and out[7].content == "2"
    assert all(isinstance(r, ToolResult) for r in out)


def test_calls_run_concurrently():
    t0 = time.perf_counter()
    out = run_tool_calls([_call("hang", seconds=0.4) for _ in range(4)], TOOLS, timeout_s=5)
    assert [r.content for r in out] == ["never"] * 4
    assert time.perf_counter() - t0 < 1.2  # four 0.4 s calls at once, not one after another


def test_a_hanging_tool_does_not_hold_up_the_interpreter_exit():
    code = (
        "from alignkit.tools import run_tool_calls\nimport time\n"
        "def hang():\n    time.sleep(600)\n"
        "out = run_tool_calls([{'name': 'hang', 'arguments': {}}], {'hang': hang}, timeout_s=0.2)\n"
        "print(out[0].failure)\n"
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "timeout", p.stderr
    assert time.perf_counter() - t0 < 30
