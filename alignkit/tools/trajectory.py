"""A multi-turn tool trajectory, token in and token out: the model's tokens are kept exactly as sampled, and only
the text between its turns (tool results, the template's glue, the next generation prompt) is rendered by the
chat format and tokenized.

    traj = Trajectory.start(fmt, tokenizer, prompt_messages, switches={"tools": schemas})
    ids = traj.ids                                   # the first prompt, what the engine continues
    traj.add_model_turn(generated_ids, message, logps)  # the sampled tokens (trained), their parsed message
    traj.add_tool_results([{"role": "tool", "content": ...}, ...])   # rendered glue appended (never trained)
    rows = traj.rows()                               # [(input_ids, trained mask, turn index per token)]

After each tool turn the conversation is rendered again with the generation prompt; what was there before must be
a prefix of it (the text the tokens so far stand for). A template that rewrites history (Qwen3 drops earlier
``<think>`` blocks) breaks that: the trajectory then starts a new training row (the "extension" rule) whose prompt
is the conversation as the template now renders it, so no row trains on tokens the model never saw in that
context. ``forks`` counts them. A template that renders an earlier message differently once another follows (the
Hermes template's last tool message) is counted in ``rewrites``: the row still holds exactly what the model saw,
it just differs from one render of the whole conversation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Trajectory", "TrajectoryRow"]


@dataclass
class TrajectoryRow:
    """One training row: ``input_ids``, ``trained`` (True on the model's own tokens), ``turn`` (the model turn a
    trained token belongs to, -1 elsewhere) and ``logps`` (the sampler's log-prob of a trained token, 0.0
    elsewhere), all of equal length."""

    input_ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)

    def extend(self, ids: Sequence[int], trained: bool, turn: int = -1, logps: Sequence[float] | None = None) -> None:
        if logps is not None and len(logps) != len(ids):
            raise ValueError(f"{len(logps)} log-probs for {len(ids)} tokens")
        self.input_ids += list(ids)
        self.trained += [trained] * len(ids)
        self.turn += [turn if trained else -1] * len(ids)
        self.logps += [float(x) for x in logps] if logps is not None else [0.0] * len(ids)

    @property
    def prompt_length(self) -> int:
        """Tokens before the first trained one: the row's prompt (all of it when nothing is trained)."""
        return next((i for i, t in enumerate(self.trained) if t), len(self.trained))


@dataclass
class Trajectory:
    """See the module docstring. ``text`` is what the current row's tokens stand for (the model's turns as the
    template renders them; where the model wrote them differently its tokens are kept and ``mismatches`` counts)."""

    fmt: Any
    tokenizer: Any
    switches: dict[str, Any]
    messages: list[dict[str, Any]]
    text: str
    done_rows: list[TrajectoryRow] = field(default_factory=list)
    row: TrajectoryRow = field(default_factory=TrajectoryRow)
    turns: int = 0
    forks: int = 0
    rewrites: int = 0
    mismatches: int = 0

    @classmethod
    def start(
        cls, fmt: Any, tokenizer: Any, prompt: Sequence[Mapping[str, Any]], switches: Mapping[str, Any] | None = None
    ) -> Trajectory:
        sw = dict(switches or {})
        text = fmt.render(list(prompt), add_generation_prompt=True, **sw).text
        traj = cls(fmt, tokenizer, sw, [dict(m) for m in prompt], text)
        traj.row.extend(cls._encode(tokenizer, text), trained=False)
        return traj

    @staticmethod
    def _encode(tokenizer: Any, text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    @property
    def ids(self) -> list[int]:
        """The current row's tokens: what the engine continues from."""
        return self.row.input_ids

    def add_model_turn(
        self, generated_ids: Sequence[int], message: Mapping[str, Any], logps: Sequence[float] | None = None
    ) -> None:
        """The model's sampled tokens (kept as they are, trained), the assistant message they were parsed into
        (content and ``tool_calls``), which later renders of the conversation show, and the sampler's log-probs of
        the tokens (None: 0.0)."""
        self.messages.append(dict(message))
        self.row.extend(generated_ids, trained=True, turn=self.turns, logps=logps)
        r = self.fmt.render(self.messages, add_generation_prompt=False, **self.switches)
        end = _turn_end(r, len(self.messages) - 1)
        sampled = self.tokenizer.decode(list(generated_ids))
        if not r.text.startswith(self.text):  # the context the model saw renders otherwise now
            self.rewrites += 1
            self.text += sampled
        else:
            if r.text[len(self.text) : end] != sampled:
                self.mismatches += 1  # the model wrote its turn otherwise than the template renders it: tokens kept
            self.text = r.text[:end]
        self.turns += 1

    def add_tool_results(self, tool_messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append the tool messages and the next generation prompt; returns the tokens added to the current row
        (a new row's whole prompt after a fork)."""
        self.messages += [dict(m) for m in tool_messages]
        full = self.fmt.render(self.messages, add_generation_prompt=True, **self.switches).text
        if full.startswith(self.text):
            glue = self._encode(self.tokenizer, full[len(self.text) :])
            self.row.extend(glue, trained=False)
            self.text = full
            return glue
        # the template rewrote what the model saw: a new row, prompted with the conversation as rendered now
        self.forks += 1
        self.done_rows.append(self.row)
        self.row = TrajectoryRow()
        self.row.extend(self._encode(self.tokenizer, full), trained=False)
        self.text = full
        return list(self.row.input_ids)

    def snapshot(self) -> dict[str, Any]:
        """The state to :meth:`restore` (a tool turn rolled back when its result would not fit)."""
        keys = ("messages", "text", "done_rows", "row", "turns", "forks", "rewrites", "mismatches")
        return copy.deepcopy({k: getattr(self, k) for k in keys})

    def restore(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    @property
    def completion_length(self) -> int:
        """Tokens of the current row after its prompt (model turns and the glue between them)."""
        return len(self.row.input_ids) - self.row.prompt_length

    def rows(self) -> list[TrajectoryRow]:
        """Every training row: the finished ones (before forks) and the current one."""
        return [*self.done_rows, self.row]


def _turn_end(rendered: Any, message_index: int) -> int:
    """End offset of message ``message_index``'s trainable text (its end-of-turn marker included)."""
    ends = [s.end for s in rendered.spans if s.message_index == message_index and s.trainable]
    if not ends:
        raise ValueError(f"message {message_index} renders no trainable text (is it an assistant message?)")
    return max(ends)
