"""Multi-turn tool rollouts, token in and token out: generate, parse the calls, run the tools, append the rendered
results, generate again, until the model answers without a call or a budget runs out.

    tool_use = ToolUse(tools={"multiply": multiply}, max_tool_calls=4, max_completion_length=512)
    out = tool_rollouts(generator, tokenizer, fmt, prompts, tool_use, n=8, sampling=..., stops=..., seeds=...)

Each rollout is a :class:`alignkit.tools.Trajectory`: the model's sampled tokens are kept as they are (trained,
with the sampler's log-probs), and only the text between turns (tool results, the template's glue, the next
generation prompt) is rendered by the chat format (our byte-exact renderer) and tokenized, never trained. A
template that rewrites history forks a new training row (the extension rule, ``Trajectory``).

Per turn, every active rollout generates in one ``Generator.generate`` call (any backend: token ids in, token ids
out), and every call of every rollout runs at once (``run_tool_calls``: per-call timeout, output cut, failures as
messages for the model). A rollout ends when the model answers without a call, when its turn is cut (by
``max_new_tokens`` or by ``max_completion_length``: ``truncations/length``), when the next calls would exceed
``max_tool_calls`` (``truncations/max_tool_calls``), or when the tool results would not fit in
``max_completion_length`` (the results are rolled back and the rollout ends on the model's turn:
``truncations/overflow``). A malformed call is answered with the parser's message as a tool result
(``failures/parse_error``); the model may try again.

Environments (``ToolUse.environments``): a factory (class) per name, one instance per rollout. ``reset(row)``
returns None or text appended to the last user message; the instance's public methods (not ``reset``/``reward``)
are tools, shown in the prompt beside the standalone tools; ``reward()`` (optional) scores the finished rollout: a
float, or one float per assistant turn (turn-level rewards, see :func:`alignkit.losses.advantages.turn_advantages`).
Rows pick their environment by the ``environment_column`` (a single unnamed environment serves every row).
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.prompts import Prompt
from alignkit.templates import TemplateError
from alignkit.tools.base import ToolCallError, parse_tool_calls
from alignkit.tools.execute import FAILURES, run_tool_calls
from alignkit.tools.schema import function_schema
from alignkit.tools.trajectory import Trajectory

__all__ = ["ENVIRONMENT_HOOKS", "ToolRollouts", "ToolUse", "TRUNCATIONS", "environment_tools", "tool_rollouts"]

#: an environment's methods that are not tools
ENVIRONMENT_HOOKS = ("reset", "reward", "get_reward")
#: why a rollout ended before the model answered
TRUNCATIONS = ("length", "max_tool_calls", "overflow", "render_error")
TOOL_FAILURES = (*FAILURES, "parse_error")


@dataclass
class ToolUse:
    """What a tool rollout may call and how far it may go (see the module docstring)."""

    tools: dict[str, Callable[..., Any]] = field(default_factory=dict)  # standalone tools by name
    environments: dict[str | None, Callable[[], Any]] = field(default_factory=dict)  # name (None: every row) -> factory
    environment_column: str = "environment"  # the row field naming a row's environment (several environments)
    max_tool_calls: int = 8  # tool calls per rollout
    max_completion_length: int = 1024  # tokens of a training row after its prompt: model turns and the glue
    timeout_s: float = 30.0  # per tool call
    max_output_chars: int = 4096  # a tool result longer than this is cut (failures/truncated)
    schemas_in_prompt: bool = True  # pass the tools' JSON schemas to the chat format's `tools` switch

    def schemas(self) -> list[dict[str, Any]]:
        """The schemas of every tool a rollout of this run may see: standalone and every environment's."""
        named = dict(self.tools)
        for factory in self.environments.values():
            if isinstance(factory, type):
                named.update(environment_tools(factory))
        return [function_schema(fn, name) for name, fn in named.items()]

    def environment_for(self, row: Mapping[str, Any], i: int) -> Callable[[], Any] | None:
        """The environment factory of prompt row ``i`` (None without environments)."""
        if not self.environments:
            return None
        if list(self.environments) == [None]:
            return self.environments[None]
        name = row.get(self.environment_column)
        if name not in self.environments:
            raise ValueError(
                f"prompt row {i}: field {self.environment_column!r} is {name!r}; expected one of the environments "
                f"{sorted(k for k in self.environments if k is not None)}"
            )
        return self.environments[name]


def environment_tools(env: Any) -> dict[str, Callable[..., Any]]:  # noqa: ANN401 - any environment object
    """The public methods of an environment instance (its tools), by name. Given a class, its methods bound to a
    stand-in object: for their schemas only (``ToolUse.schemas``)."""
    cls, obj = (env, object()) if isinstance(env, type) else (type(env), env)
    out = {}
    for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction):
        if not name.startswith("_") and name not in ENVIRONMENT_HOOKS:
            out[name] = fn.__get__(obj)
    return out


@dataclass
class _Rollout:
    traj: Trajectory
    tools: dict[str, Callable[..., Any]]
    env: Any
    seed: int
    calls: int = 0
    done: bool = False
    answered: bool = False  # ended on a model turn without a call (not cut)
    truncation: str | None = None
    final_text: str = ""  # the last model turn, decoded without its stop token
    last_ids: list[int] = field(default_factory=list)  # its tokens


@dataclass
class ToolRollouts:
    """The training rows of ``len(prompts) * n`` rollouts (groups contiguous) and what rewards need.

    Rows: ``prompt_ids`` / ``completion_ids`` / ``trained`` / ``sampler_logps`` / ``turn`` per row (a rollout has
    more than one row only after a fork); ``rollout_index[r]`` is row r's rollout. Per rollout: ``finished``
    (answered without being cut), ``texts`` (the last model turn, for rewards), ``trajectories`` (the whole
    conversation: messages with tool calls and results), ``environment_rewards`` (None, a float, or one per
    turn) and ``metrics``."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    trained: list[list[bool]]
    sampler_logps: list[list[float]]
    turn: list[list[int]]
    rollout_index: list[int]
    finished: list[bool]
    texts: list[str]
    last_ids: list[list[int]]
    trajectories: list[list[dict[str, Any]]]
    environment_rewards: list[Any]
    metrics: dict[str, float]


def _start(
    fmt: Any,
    tokenizer: Any,
    prompt: Prompt,
    i: int,
    tool_use: ToolUse,
    switches: Mapping[str, Any],
    seed: int,  # noqa: ANN401
) -> _Rollout:
    if isinstance(prompt.prompt, str):
        raise ValueError(f"prompt row {i}: tool rollouts need a conversation (a list of messages), not a string")
    messages = [dict(m) for m in prompt.prompt]
    row = {"prompt": prompt.prompt, **prompt.columns}
    factory = tool_use.environment_for(row, i)
    env = factory() if factory is not None else None
    tools = dict(tool_use.tools)
    if env is not None:
        observation = env.reset(row)
        if observation is not None:  # appended to the last user message (TRL's convention)
            if not isinstance(observation, str):
                got = type(observation).__name__
                raise TypeError(f"{type(env).__name__}.reset returned {got}; expected a str or None")
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
        tools.update(environment_tools(env))
    sw = dict(switches)
    if tools and tool_use.schemas_in_prompt:
        sw["tools"] = [function_schema(fn, name) for name, fn in tools.items()]
    return _Rollout(Trajectory.start(fmt, tokenizer, messages, sw), tools, env, seed)


def _message(fmt: Any, text: str, turn: int) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:  # noqa: ANN401
    """(the assistant message of a generated turn, its calls with ids, the parse error or None)."""
    try:
        calls = parse_tool_calls(fmt, text)
    except ToolCallError as e:
        return {"role": "assistant", "content": text}, [], str(e)
    if not calls:
        return {"role": "assistant", "content": text}, [], None
    # ids of 9 letters and digits: what the strictest templates (Mistral) accept
    with_ids = [{"id": f"t{turn:03d}c{k:04d}", "type": "function", "function": dict(c)} for k, c in enumerate(calls)]
    return {"role": "assistant", "content": "", "tool_calls": with_ids}, with_ids, None


def tool_rollouts(
    generator: Any,  # noqa: ANN401 - an alignkit.rollout.Generator
    tokenizer: Any,  # noqa: ANN401
    fmt: Any,  # noqa: ANN401 - the chat format (a ChatFormat)
    prompts: Sequence[Prompt],
    tool_use: ToolUse,
    *,
    n: int,
    sampling: Mapping[str, Any],
    stops: Sequence[int],
    seeds: Sequence[int],
    switches: Mapping[str, Any] | None = None,
) -> ToolRollouts:
    """``n`` multi-turn tool rollouts per prompt (see the module docstring). ``sampling``: ``max_new_tokens``
    (per model turn), ``temperature``, ``top_p``, ``top_k``; ``seeds``: one per prompt (rollout j of a prompt with
    seed s samples turn t from stream ``(s + j) * 1009 + t``); ``switches``: the chat format's switches."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    stop_set = set(stops)
    rollouts = [_start(fmt, tokenizer, p, i, tool_use, switches or {}, s + j)
                for i, (p, s) in enumerate(zip(prompts, seeds)) for j in range(n)]  # fmt: skip
    failures: Counter[str] = Counter()
    truncations: Counter[str] = Counter()
    tool_s = gen_s = 0.0
    per_turn = int(sampling["max_new_tokens"])
    turn = 0
    while True:
        active = [r for r in rollouts if not r.done]
        if not active:
            break
        budgets = [tool_use.max_completion_length - r.traj.completion_length for r in active]
        t0 = time.perf_counter()
        out = generator.generate(
            [r.traj.ids for r in active], n=1, max_new_tokens=min(per_turn, max(budgets)), stop_token_ids=list(stops),
            seed=[r.seed * 1009 + turn for r in active], temperature=sampling.get("temperature", 1.0),
            top_p=sampling.get("top_p", 1.0), top_k=sampling.get("top_k", -1),
        )  # fmt: skip
        gen_s += time.perf_counter() - t0
        pending: list[tuple[_Rollout, dict[str, Any], list[dict[str, Any]], str | None]] = []
        for r, budget, sampled, lps, fin in zip(active, budgets, out.completion_ids, out.logprobs, out.finished):
            ids, lps = list(sampled)[:budget], list(lps)[:budget]  # a turn past the row's budget is cut
            ended = bool(fin) and len(sampled) <= budget and ids[-1] in stop_set
            text = tokenizer.decode(ids[:-1] if ended else ids)
            msg, calls, error = _message(fmt, text, r.traj.turns)
            r.traj.add_model_turn(ids, msg, lps)
            r.final_text, r.last_ids = text, ids
            if not ended:
                r.done, r.truncation = True, "length"
            elif not calls and error is None:
                r.done, r.answered = True, True
            elif r.calls + max(len(calls), 1) > tool_use.max_tool_calls:
                r.done, r.truncation = True, "max_tool_calls"
            else:
                pending.append((r, msg, calls, error))
        # every call of every rollout at once
        flat = [c["function"] for _, _, calls, _ in pending for c in calls]
        t0 = time.perf_counter()
        results = run_tool_calls(flat, [r.tools for r, _, calls, _ in pending for _ in calls],
                                 timeout_s=tool_use.timeout_s, max_output_chars=tool_use.max_output_chars)  # fmt: skip
        tool_s += time.perf_counter() - t0
        k = 0
        for r, _msg, calls, error in pending:
            if error is not None:
                r.calls += 1
                failures["parse_error"] += 1
                tool_messages = [{"role": "tool", "name": "error", "content": f"Error: {error}"}]
            else:
                r.calls += len(calls)
                tool_messages = []
                for c in calls:
                    res = results[k]
                    k += 1
                    if res.failure is not None:
                        failures[res.failure] += 1
                    failures["converted"] += res.converted
                    tool_messages.append({"role": "tool", "tool_call_id": c["id"], "name": res.name,
                                          "content": res.content})  # fmt: skip
            state = r.traj.snapshot()
            try:
                r.traj.add_tool_results(tool_messages)
            except TemplateError:
                r.traj.restore(state)
                r.done, r.truncation = True, "render_error"
                continue
            if r.traj.completion_length >= tool_use.max_completion_length:  # no room for the results and a turn
                r.traj.restore(state)
                r.done, r.truncation = True, "overflow"
        turn += 1
    return _collect(rollouts, failures, truncations, tool_s, gen_s)


def _collect(
    rollouts: list[_Rollout], failures: Counter[str], truncations: Counter[str], tool_s: float, gen_s: float
) -> ToolRollouts:
    out = ToolRollouts([], [], [], [], [], [], [], [], [], [], [], {})
    for i, r in enumerate(rollouts):
        truncations[r.truncation or "none"] += 1
        rows = [row for row in r.traj.rows() if any(row.trained)]
        for row in rows:
            p = row.prompt_length
            out.prompt_ids.append(row.input_ids[:p])
            out.completion_ids.append(row.input_ids[p:])
            out.trained.append(row.trained[p:])
            out.sampler_logps.append(row.logps[p:])
            out.turn.append(row.turn[p:])
            out.rollout_index.append(i)
        out.finished.append(r.answered)
        out.texts.append(r.final_text)
        out.last_ids.append(r.last_ids)
        out.trajectories.append(r.traj.messages)
        reward = None
        if r.env is not None:
            hook = getattr(r.env, "reward", None) or getattr(r.env, "get_reward", None)
            reward = hook() if hook is not None else None
        out.environment_rewards.append(reward)
    n = len(rollouts)
    calls = [r.calls for r in rollouts]
    out.metrics = {
        "tools/calls_per_rollout": sum(calls) / n,
        "tools/max_calls": float(max(calls)),
        "tools/turns": sum(r.traj.turns for r in rollouts) / n,
        "tools/time_s": tool_s,
        "tools/gen_time_s": gen_s,
        "tools/forks": float(sum(r.traj.forks for r in rollouts)),
        "tools/rewrites": float(sum(r.traj.rewrites for r in rollouts)),
        "tools/mismatches": float(sum(r.traj.mismatches for r in rollouts)),
        **{f"tools/failures/{k}": float(failures[k]) for k in TOOL_FAILURES},
        "tools/converted": float(failures["converted"]),  # results that were not text (converted, not failures)
        **{f"tools/truncations/{k}": float(truncations[k]) for k in TRUNCATIONS},
    }
    return out
