"""Tools for multi-turn rollouts: JSON schemas from Python callables, and tool-call parsing per chat format.

    from alignkit import tools
    schema = tools.function_schema(my_function)             # OpenAI-style {"type": "function", "function": {...}}
    calls = tools.parse_tool_calls("qwen2.5", generated)    # [{"name": ..., "arguments": {...}}, ...]
    results = tools.run_tool_calls(calls, {"f": my_function})  # concurrent, bounded; failures as messages
    traj = tools.Trajectory.start(fmt, tokenizer, prompt)     # token in / token out across turns (trajectory.py)

A malformed call raises :class:`ToolCallError`, whose message is meant for the model (a rollout feeds it back as
the tool's result), never a crash of the run.
"""

from __future__ import annotations

# Importing the parser modules registers their parsers.
from alignkit.tools import parse_json, parse_special  # noqa: F401
from alignkit.tools.base import PARSERS, ToolCall, ToolCallError, parse_tool_calls, register_parser, tool_formats
from alignkit.tools.execute import FAILURES, ToolResult, run_tool_calls
from alignkit.tools.schema import function_schema
from alignkit.tools.trajectory import Trajectory, TrajectoryRow

__all__ = [
    "FAILURES",
    "PARSERS",
    "ToolCall",
    "ToolCallError",
    "ToolResult",
    "Trajectory",
    "TrajectoryRow",
    "function_schema",
    "parse_tool_calls",
    "register_parser",
    "run_tool_calls",
    "tool_formats",
]
