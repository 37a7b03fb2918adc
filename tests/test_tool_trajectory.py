"""Multi-turn tool trajectories, token in and token out: the model's tokens are the only trained ones, tool results
and the template's glue never are, and without a fork the trajectory equals one full render, tokenized."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from alignkit import templates, tools
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.templates import TemplateError
from alignkit.tools.trajectory import Trajectory

TOK = byte_tokenizer()
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Evaluate arithmetic.", "parameters": {
    "type": "object", "properties": {"expr": {"type": "string", "description": "the expression"}},
    "required": ["expr"]}}}]  # fmt: skip
FORMATS = ["qwen2.5", "qwen3", "hermes-3-tool-use", "llama-3.1", "mistral-v0.3", "glm-4.6", "gpt-oss", "command-r7b"]

_word = st.text(st.sampled_from("abcxyz 0123+*=.\n"), min_size=1, max_size=10).filter(lambda s: s.strip())
# an expression starting with a letter: never a JSON value (GLM-4.6 writes string arguments raw, numbers as JSON)
_call = st.fixed_dictionaries(
    {"name": st.just("calc"), "arguments": st.fixed_dictionaries({"expr": _word.map("x".__add__)})}
)
ONE_CALL_PER_TURN = {"gpt-oss"}  # its template writes only a turn's first call


def _switches(fmt) -> dict:  # noqa: ANN001
    sw = {"tools": TOOLS} if "tools" in fmt.switches else {}
    if "date_string" in fmt.switches:
        sw["date_string"] = "26 Jul 2024"
    return sw


def _assistant(calls: list[dict], content: str | None, turn: int) -> dict:
    msg: dict = {"role": "assistant"}
    if content is not None:
        msg["content"] = content
    if calls:
        msg["tool_calls"] = [{"id": f"c{turn:02d}{k}abcde", "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}}
                             for k, c in enumerate(calls)]  # fmt: skip
    return msg


def _model_turn(traj: Trajectory, calls: list[dict], content: str | None, turn: int) -> tuple[list[int], dict]:
    """(the tokens a model that writes exactly the template's format samples, the message they parse into): what
    the format renders after the prompt through the turn's end (content "" where the format requires one); where
    the template renders the context otherwise once the turn follows, the turn's trainable text."""
    msg = _assistant(calls, content, turn)
    try:
        r = traj.fmt.render([*traj.messages, msg], add_generation_prompt=False, **traj.switches)
    except TemplateError:
        msg = _assistant(calls, "", turn)
        r = traj.fmt.render([*traj.messages, msg], add_generation_prompt=False, **traj.switches)
    k = len(traj.messages)
    end = max(s.end for s in r.spans if s.trainable and s.message_index == k)
    if r.text.startswith(traj.text):
        text = r.text[len(traj.text) : end]
    else:
        text = "".join(r.text[s.start : s.end] for s in r.spans if s.trainable and s.message_index == k)
    return TOK(text, add_special_tokens=False)["input_ids"], msg


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(turns=st.lists(st.tuples(st.lists(_call, min_size=1, max_size=2), st.lists(_word, min_size=2, max_size=2)),
                      min_size=1, max_size=3),
       answer=_word)  # fmt: skip
def test_only_model_tokens_are_trained_and_one_render_rebuilds_the_trajectory(name, turns, answer):
    fmt = templates.get_format(name)
    if name in ONE_CALL_PER_TURN:
        assume(all(len(calls) == 1 for calls, _ in turns))
    try:
        traj = Trajectory.start(fmt, TOK, [{"role": "user", "content": "Compute things."}], _switches(fmt))
        model_turns = []
        for t, (calls, outputs) in enumerate(turns):
            g, msg = _model_turn(traj, calls, None, t)
            traj.add_model_turn(g, msg)
            model_turns.append(g)
            assert tools.parse_tool_calls(name, TOK.decode(g)) == calls  # what the rollout would parse
            results = [{"role": "tool", "tool_call_id": f"c{t:02d}{k}abcde", "name": c["name"],
                        "content": outputs[k % 2]} for k, c in enumerate(calls)]  # fmt: skip
            traj.add_tool_results(results)
        g, final = _model_turn(traj, [], answer, len(turns))
        traj.add_model_turn(g, final)
        model_turns.append(g)
    except TemplateError:
        assume(False)  # a conversation this format (like its template) refuses
    rows = traj.rows()
    assert len(rows) == traj.forks + 1
    trained = [t for row in rows for t, m in zip(row.input_ids, row.trained) if m]
    assert trained == [t for g in model_turns for t in g]  # exactly the model's tokens, in order
    for row in rows:
        assert len(row.input_ids) == len(row.trained) == len(row.turn)
        assert all((turn >= 0) == m for turn, m in zip(row.turn, row.trained))
    if traj.forks == 0 and traj.rewrites == 0:
        full = fmt.render(traj.messages, add_generation_prompt=False, **traj.switches)
        end = max(s.end for s in full.spans if s.trainable and s.message_index == len(traj.messages) - 1)
        assert rows[0].input_ids == TOK(full.text[:end], add_special_tokens=False)["input_ids"]
        assert traj.mismatches == 0


def test_a_tool_message_rendered_otherwise_in_history_is_counted():
    """The Hermes template closes the last tool message without the newline it writes once more turns follow: the
    row keeps what the model saw, and the trajectory says its text is not one render of the conversation."""
    fmt = templates.get_format("hermes-3-tool-use")
    traj = Trajectory.start(fmt, TOK, [{"role": "user", "content": "q"}], _switches(fmt))
    g, msg = _model_turn(traj, [{"name": "calc", "arguments": {"expr": "1"}}], None, 0)
    traj.add_model_turn(g, msg)
    glue = TOK.decode(traj.add_tool_results([{"role": "tool", "name": "calc", "content": "1"}]))
    assert glue.endswith("</tool_response><|im_end|><|im_start|>assistant\n")
    g, final = _model_turn(traj, [], "one", 1)
    traj.add_model_turn(g, final)
    assert traj.rewrites == 1 and traj.forks == 0 and traj.mismatches == 0


def test_a_template_that_rewrites_history_forks_a_new_row():
    """Qwen3 keeps reasoning only after the last user query; a model turn's <think> block vanishes from history
    once a new user turn follows, so the next turn starts a new row (nothing trains on text the model never saw)."""
    fmt = templates.get_format("qwen3")
    traj = Trajectory.start(fmt, TOK, [{"role": "user", "content": "q1"}])
    msg = {"role": "assistant", "content": "<think>\nhm\n</think>\n\nfirst"}
    r = fmt.render([*traj.messages, msg])
    end = max(s.end for s in r.spans if s.trainable and s.message_index == 1)
    g = TOK(r.text[len(traj.text) : end], add_special_tokens=False)["input_ids"]
    traj.add_model_turn(g, msg)
    added = traj.add_tool_results([{"role": "user", "content": "q2"}])  # a follow-up user turn, as an env would
    assert traj.forks == 1 and len(traj.rows()) == 2
    assert added == traj.rows()[1].input_ids and not any(traj.rows()[1].trained)
    assert "hm" not in TOK.decode(traj.rows()[1].input_ids)  # the new row's prompt is the rewritten history
    assert [t for t, m in zip(traj.rows()[0].input_ids, traj.rows()[0].trained) if m] == g
