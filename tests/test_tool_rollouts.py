"""Multi-turn tool rollouts (alignkit.rollout.multi_turn) and their place in GRPO: the layout of the rows (only the
model's tokens trained, the glue and tool results never, one render rebuilds the row), the budgets (max_tool_calls,
max_completion_length with rollback), faults (hang, raise, non-text, 1 MB), parse errors fed back, environments,
turn-level advantages, and that the loss never sees a tool token."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit import templates, tools
from alignkit.config import build_config
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.prompts import load_prompts
from alignkit.loops import policy_gradient
from alignkit.loops.grpo import GRPOConfig, train_grpo
from alignkit.losses.advantages import turn_advantages
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.reward_funcs import RewardSet
from alignkit.rollout.base import Rollouts
from alignkit.rollout.multi_turn import ToolUse, tool_rollouts
from alignkit.rollout.round import generate_and_score, prepare_round
from alignkit.templates import TemplateError

TOK = byte_tokenizer()
END = TOK.convert_tokens_to_ids("<|im_end|>")


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def hermes_call(name: str, **arguments: Any) -> str:  # noqa: ANN401
    """A Hermes / Qwen2.5 tool call as the model writes it."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def call_text(fmt: Any, calls: list[dict[str, Any]], context: list[dict[str, Any]], switches: dict) -> str:  # noqa: ANN401
    """What a model that writes ``fmt``'s own format generates for a turn with ``calls`` (no end marker)."""
    msg = {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"t000c{k:04d}", "type": "function", "function": c} for k, c in enumerate(calls)]}  # fmt: skip
    r = fmt.render([*context, msg], add_generation_prompt=False, **switches)
    spans = [s for s in r.spans if s.trainable and s.message_index == len(context)]
    return r.text[min(s.start for s in spans) : max(s.end for s in spans)]


class Scripted:
    """A Generator whose turn t of rollout s (read from the seed the rollout passes: ``s * 1009 + t``) is
    ``script(s, t, context_text)``: a string (its tokens, then the stop token) or ``(text, False)`` (cut, no stop)."""

    def __init__(self, script: Callable[[int, int, str], Any], stop: int = END) -> None:
        self.script, self.stop, self.calls = script, stop, 0

    def generate(self, prompt_ids, *, n, max_new_tokens, seed=None, **_: Any) -> Rollouts:  # noqa: ANN001
        assert n == 1
        self.calls += 1
        comps, finished = [], []
        for ids, s in zip(prompt_ids, seed):
            out = self.script(s // 1009, s % 1009, TOK.decode(ids))
            ended = not isinstance(out, tuple)
            text = out if ended else out[0]
            c = TOK(text, add_special_tokens=False)["input_ids"] + ([self.stop] if ended else [])
            if len(c) > max_new_tokens:
                c, ended = c[:max_new_tokens], False
            comps.append(c)
            finished.append(ended)
        logps = [[-0.25 - 0.01 * i for i in range(len(c))] for c in comps]
        return Rollouts([list(p) for p in prompt_ids], comps, logps, finished)

    def update_weights(self, model: Any) -> None:  # noqa: ANN401
        pass

    def close(self) -> None:
        pass


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": [{"role": "user", "content": f"{11 + i}*{21 + i}"}], "answer": str((11 + i) * (21 + i))}
            for i in range(n)]  # fmt: skip


def _calculator_script(fmt: Any, switches: dict) -> Callable[[int, int, str], str]:  # noqa: ANN401
    def script(s: int, t: int, text: str) -> str:
        import re

        a, b = map(int, re.findall(r"(\d+)\*(\d+)", text)[0])
        if t == 0:
            return call_text(fmt, [{"name": "multiply", "arguments": {"a": a, "b": b}}],
                             [{"role": "user", "content": f"{a}*{b}"}], switches)  # fmt: skip
        return str(a * b)

    return script


def _rollouts(fmt_name: str, script: Callable, tool_use: ToolUse, rows=None, n: int = 2, max_new: int = 200):  # noqa: ANN001
    fmt = templates.get_format(fmt_name)
    prompts = load_prompts(rows or _rows(2), TOK, chat_format=fmt_name, verbose=False,
                           switches={"tools": tool_use.schemas()})  # fmt: skip
    return tool_rollouts(Scripted(script), TOK, fmt, prompts, tool_use, n=n, sampling={"max_new_tokens": max_new},
                         stops=[END], seeds=[100 * i for i in range(len(prompts))])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# layout: model tokens trained, nothing else; one render rebuilds the row
# ---------------------------------------------------------------------------------------------------------------

FORMATS = ["qwen2.5", "hermes-3-tool-use", "qwen3", "llama-3.1", "mistral-v0.3", "glm-4.6", "command-r7b"]


@pytest.mark.parametrize("name", FORMATS)
def test_rows_train_exactly_the_model_tokens_and_match_one_render(name):
    fmt = templates.get_format(name)
    tool_use = ToolUse({"multiply": multiply})
    switches = {"tools": [tools.function_schema(multiply)]}
    if "date_string" in fmt.switches:
        switches["date_string"] = "26 Jul 2024"
    script = _calculator_script(fmt, switches)
    sampled: dict[tuple[int, int], list[int]] = {}

    def recording(s: int, t: int, text: str) -> str:
        out = script(s, t, text)
        sampled[(s, t)] = TOK(out, add_special_tokens=False)["input_ids"] + [END]
        return out

    try:
        ro = _rollouts(name, recording, tool_use)
    except TemplateError as e:  # a format whose template refuses this conversation: say so, do not pass silently
        pytest.fail(f"{name}: {e}")
    forks = int(ro.metrics["tools/forks"])
    assert len(ro.completion_ids) == 4 + forks and sorted(set(ro.rollout_index)) == [0, 1, 2, 3]
    assert ro.metrics["tools/calls_per_rollout"] == 1 and ro.metrics["tools/turns"] == 2
    seeds, answers = [0, 1, 100, 101], [r["answer"] for r in _rows(2) for _ in range(2)]
    for r in range(4):
        rows = [i for i, k in enumerate(ro.rollout_index) if k == r]
        model_tokens = [t for i in rows for t, k in zip(ro.completion_ids[i], ro.trained[i]) if k]
        assert model_tokens == sampled[(seeds[r], 0)] + sampled[(seeds[r], 1)]  # exactly the sampled tokens
        for i in rows:
            m, lp = ro.trained[i], ro.sampler_logps[i]
            assert all(x == 0.0 for x, k in zip(lp, m) if not k) and all(x < 0 for x, k in zip(lp, m) if k)
        # the tool result is never trained: in the glue, or in the prompt of the row a fork started
        untrained = "".join(TOK.decode([t for t, k in zip(ro.completion_ids[i], ro.trained[i]) if not k])
                            + (TOK.decode(ro.prompt_ids[i]) if j else "") for j, i in enumerate(rows))  # fmt: skip
        assert answers[r] in untrained
        assert ro.finished[r] and ro.texts[r] == answers[r]
        if forks == 0 and ro.metrics["tools/rewrites"] == 0 and ro.metrics["tools/mismatches"] == 0:
            msgs = ro.trajectories[r]
            full = fmt.render(msgs, add_generation_prompt=False, **switches)
            end = max(s.end for s in full.spans if s.trainable and s.message_index == len(msgs) - 1)
            (i,) = rows
            assert (
                ro.prompt_ids[i] + ro.completion_ids[i] == TOK(full.text[:end], add_special_tokens=False)["input_ids"]
            )
    if name == "qwen3":  # an empty <think> block shows on the last turn only: history is rewritten, rows fork
        assert forks == 4


_step = st.sampled_from(["call", "bad", "answer", "cut"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(st.lists(_step, min_size=1, max_size=5), min_size=1, max_size=4),
       budget=st.integers(30, 400), max_calls=st.integers(0, 3))  # fmt: skip
def test_random_trajectories_train_only_model_tokens(plans, budget, max_calls):
    """Random plans of calls, malformed calls, answers and cut turns under random budgets: the trained tokens are
    exactly the sampled ones that were kept, the metrics add up, and no row outgrows the budget."""

    def script(s: int, t: int, text: str) -> Any:  # noqa: ANN401
        plan = plans[s % len(plans)]
        step = plan[t] if t < len(plan) else "answer"
        if step == "call":
            return hermes_call("multiply", a=t, b=7)
        if step == "bad":
            return '<tool_call>\n{"name": "multiply", "arguments": {"a": \n</tool_call>'
        if step == "cut":
            return ("x" * 12, False)
        return f"answer {t}"

    tool_use = ToolUse({"multiply": multiply}, max_tool_calls=max_calls, max_completion_length=budget)
    rows = [{"prompt": [{"role": "user", "content": "q"}]}] * len(plans)
    ro = _rollouts("qwen2.5", script, tool_use, rows=rows, n=1, max_new=60)
    ends_by = ro.metrics
    for c, m in zip(ro.completion_ids, ro.trained):
        assert len(c) <= budget
        assert m[0]  # a completion starts with a model token
        text = TOK.decode([t for t, k in zip(c, m) if not k])
        assert "<tool_call>" not in text and "answer" not in text  # nothing the model wrote is untrained
        assert all("<tool_response>" not in TOK.decode([t]) for t, k in zip(c, m) if k)
    n = len(plans)
    ends = sum(ends_by[f"tools/truncations/{k}"] for k in ("length", "max_tool_calls", "overflow", "render_error"))
    assert ends + sum(ro.finished) == n  # every rollout ends one way
    assert ends_by["tools/max_calls"] <= max_calls


# ---------------------------------------------------------------------------------------------------------------
# budgets and faults
# ---------------------------------------------------------------------------------------------------------------


def test_a_result_that_would_overflow_is_rolled_back_and_the_rollout_ends_cleanly():
    def long_tool(n: int) -> str:
        """Return n characters.

        Args:
            n: how many
        """
        return "y" * n

    def script(s: int, t: int, text: str) -> str:
        return '<tool_call>\n{"name": "long_tool", "arguments": {"n": 300}}\n</tool_call>' if t == 0 else "done"

    ro = _rollouts("qwen2.5", script, ToolUse({"long_tool": long_tool}, max_completion_length=200), n=1)
    assert ro.metrics["tools/truncations/overflow"] == 2 and not any(ro.finished)
    for c, m, traj in zip(ro.completion_ids, ro.trained, ro.trajectories):
        assert all(m) and TOK.decode(c).endswith("</tool_call><|im_end|>")  # the row ends on the model's turn
        assert [msg["role"] for msg in traj] == ["user", "assistant"]  # the tool message was rolled back too


def test_max_tool_calls_ends_the_rollout():
    def script(s: int, t: int, text: str) -> str:
        return '<tool_call>\n{"name": "multiply", "arguments": {"a": 1, "b": 2}}\n</tool_call>'

    ro = _rollouts("qwen2.5", script, ToolUse({"multiply": multiply}, max_tool_calls=3), n=1)
    assert ro.metrics["tools/truncations/max_tool_calls"] == 2 and ro.metrics["tools/calls_per_rollout"] == 3
    assert ro.metrics["tools/turns"] == 4 and not any(ro.finished)


def test_a_malformed_call_is_answered_with_the_parse_error_and_the_model_retries():
    def script(s: int, t: int, text: str) -> str:
        if t == 0:
            return '<tool_call>\n{"name": "multiply", "arguments": {"a": 1,\n</tool_call>'
        if t == 1:
            assert "not valid JSON" in text.rsplit("<tool_response>", 1)[1]  # the model reads what was wrong
            return '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
        assert "42" in text.rsplit("<tool_response>", 1)[1]
        return "42"

    ro = _rollouts("qwen2.5", script, ToolUse({"multiply": multiply}), n=1)
    assert ro.metrics["tools/failures/parse_error"] == 2 and all(ro.finished) and ro.texts == ["42", "42"]


def _faulty_tools() -> dict[str, Callable[..., Any]]:
    def hang(x: int) -> str:
        """Never returns in time.

        Args:
            x: anything
        """
        time.sleep(5)
        return "late"

    def boom(x: int) -> str:
        """Raises.

        Args:
            x: anything
        """
        raise RuntimeError("kaput")

    def obj(x: int) -> dict:
        """Returns a dict.

        Args:
            x: anything
        """
        return {"value": x}

    def huge(x: int) -> str:
        """Returns 1 MB.

        Args:
            x: anything
        """
        return "z" * 1_000_000

    return {"hang": hang, "boom": boom, "obj": obj, "huge": huge}


FAULT_ORDER = ["hang", "boom", "obj", "huge"]


def _fault_script(s: int, t: int, text: str) -> str:
    if t == 0:  # rollout j of prompt "11*21" calls FAULT_ORDER[j], of "12*22" FAULT_ORDER[2 + j]
        name = FAULT_ORDER[(2 if "12*22" in text else 0) + s % 2]
        return hermes_call(name, x=1)
    return "ok"


def test_faulty_tools_become_messages_and_are_counted():
    t0 = time.perf_counter()
    ro = _rollouts("qwen2.5", _fault_script, ToolUse(_faulty_tools(), timeout_s=0.5, max_output_chars=1000,
                                                     max_completion_length=4000))  # fmt: skip
    assert time.perf_counter() - t0 < 4  # the hanging tool did not hold the round
    m = ro.metrics
    assert (m["tools/failures/timeout"], m["tools/failures/error"], m["tools/failures/truncated"]) == (1, 1, 1)
    assert m["tools/converted"] == 1 and all(ro.finished)
    results = [traj[2]["content"] for traj in ro.trajectories]
    assert "did not finish in time" in results[0] and "kaput" in results[1]
    assert json.loads(results[2]) == {"value": 1} and len(results[3]) < 1100


def test_grpo_with_faulty_tools_runs_on_and_logs_the_counts(tmp_path):
    model = _tiny()
    cfg = build_config(GRPOConfig, dict(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, max_steps=2,
                                        max_new_tokens=80, micro_batch_size=4, progress=False, chat_format="qwen2.5",
                                        max_prompt_length=None,
                                        tool_timeout_s=0.5, tool_max_output_chars=1000, max_completion_length=4000,
                                        log_completions_every=1))  # fmt: skip
    out = train_grpo(cfg, model=model, tokenizer=TOK, train_data=_rows(2), reward_funcs=[_is_ok],
                     tools=_faulty_tools(), generator=Scripted(_fault_script))  # fmt: skip
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and out["last"]["tools/failures/timeout"] == 1
    for k in ("error", "truncated"):
        assert metrics[0][f"tools/failures/{k}"] == 1
    sample = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()][0]
    assert "<tool_response>" in sample["completion"]  # the logged completion shows the tool results


def _is_ok(prompts, completions, completion_ids, **kw) -> list[float]:  # noqa: ANN001
    return [float(c.strip() == "ok") for c in completions]


def _tiny(seed: int = 0) -> torch.nn.Module:
    cfg = tiny_llama_config(len(TOK), hidden=32, layers=2, eos_token_id=END, pad_token_id=TOK.pad_token_id)
    return build_tiny_model(cfg, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# environments, rewards over the trajectory, turn-level advantages
# ---------------------------------------------------------------------------------------------------------------


class Counter:
    """An environment: a counter the model increments; the reward is how close it got to the row's target."""

    def reset(self, row: dict) -> str:
        self.value, self.target, self.turn_scores = 0, row["target"], []
        return f" (reach {self.target})"

    def increment(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: the amount
        """
        self.value += by
        return str(self.value)

    def reward(self) -> float:
        return -abs(self.target - self.value)


class Echo:
    """A second environment with a tool of its own."""

    def reset(self, row: dict) -> None:
        self.said = []

    def echo(self, text: str) -> str:
        """Say it back.

        Args:
            text: the text
        """
        self.said.append(text)
        return text


def test_environments_are_routed_by_row_and_see_only_their_tools():
    rows = [{"prompt": [{"role": "user", "content": "count"}], "environment": "counter", "target": 3},
            {"prompt": [{"role": "user", "content": "talk"}], "environment": "echo"}]  # fmt: skip

    def script(s: int, t: int, text: str) -> str:
        if t >= 2:
            return "fin"
        if "count" in text and "(reach 3)" in text:
            return hermes_call("increment", by=t + 1)
        return '<tool_call>\n{"name": "increment", "arguments": {"by": 1}}\n</tool_call>'  # not an echo tool

    tool_use = ToolUse(environments={"counter": Counter, "echo": Echo})
    ro = _rollouts("qwen2.5", script, tool_use, rows=rows, n=2)
    assert ro.environment_rewards[:2] == [0.0, 0.0]  # 1 + 2 reaches 3
    assert ro.environment_rewards[2:] == [None, None]  # Echo has no reward()
    assert ro.metrics["tools/failures/unknown_tool"] == 4  # echo rows have no `increment`
    assert '"name": "increment"' in TOK.decode(ro.prompt_ids[0]) and "echo" not in TOK.decode(ro.prompt_ids[0])
    with pytest.raises(ValueError, match="environment.*'nope'"):
        _rollouts("qwen2.5", script, tool_use, rows=[{**rows[0], "environment": "nope"}], n=1)


class TurnScored(Counter):
    def reward(self) -> list[float]:
        return list(self.turn_scores)

    def increment(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: the amount
        """
        self.turn_scores.append(float(by))
        return super().increment(by)


def test_turn_rewards_give_each_turn_its_own_advantage():
    rows = [{"prompt": [{"role": "user", "content": "count"}], "target": 3}]

    def script(s: int, t: int, text: str) -> str:
        if t >= 1 + s % 2:  # rollout 0 makes one call, rollout 1 two
            return "fin"
        return hermes_call("increment", by=1 + s + t)

    tool_use = ToolUse(environments={None: TurnScored})
    prompts = load_prompts(rows, TOK, chat_format="qwen2.5", verbose=False, switches={"tools": tool_use.schemas()})
    rewards = RewardSet([_zero], columns={"target", "trajectory", "environment_reward"})
    fmt = templates.get_format("qwen2.5")
    scored = generate_and_score(generator=Scripted(script), tokenizer=TOK, prompts=list(prompts), rewards=rewards,
                                group_size=2, sampling={"max_new_tokens": 100}, stops=[END], seed=[0],
                                tool_use=tool_use, chat_format=fmt)  # fmt: skip
    # rollout 0: one scored turn (by 1) then the answer; rollout 1: two (by 2, by 3) then the answer
    assert torch.equal(torch.isnan(scored.turn_rewards), torch.tensor([[False, True], [False, False]]))
    batch = prepare_round(scored, rewards=rewards, advantage_fn=lambda R, w: (torch.zeros(R.shape[0]), {}),
                          turn_advantage=(2, 0.5))  # fmt: skip
    A_turn, _ = turn_advantages(scored.turn_rewards, group_size=2)
    assert batch.advantages.dim() == 2
    for row in range(2):
        turn = torch.tensor(scored.turn[row])
        for t in range(2):
            sel = batch.cmask[row, : len(turn)] & (turn == t)
            if sel.any():
                assert torch.allclose(
                    batch.advantages[row, : len(turn)][sel], 0.5 * A_turn[row, t].expand(int(sel.sum()))
                )
        assert (batch.advantages[row][~batch.cmask[row]] == 0).all()


def _zero(prompts, completions, completion_ids, **kw) -> list[float]:  # noqa: ANN001
    return [0.0] * len(completions)


_turn_table = st.lists(st.lists(st.one_of(st.none(), st.floats(-10, 10)), min_size=3, max_size=3), min_size=4,
                       max_size=4)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(table=_turn_table, a=st.floats(0.1, 10))
def test_turn_advantages_properties(table, a):
    R = torch.tensor([[math.nan if v is None else v for v in row] for row in table], dtype=torch.float64)
    A, metrics = turn_advantages(R, group_size=2)
    present = ~torch.isnan(R)
    assert (A[~present] == 0).all() and not metrics["turn_return_mean"].requires_grad
    # reward-to-go: the returns of each group are normalised over the group's turns, so they sum to ~0
    for g in range(2):
        rows = A[2 * g : 2 * g + 2][present[2 * g : 2 * g + 2]]
        assert abs(float(rows.sum())) < 1e-6 * max(1, rows.numel())
    # scale-free: scaling every reward (and eps with it) leaves the advantages as they are
    A_scaled, _ = turn_advantages(a * R, group_size=2, eps=a * 1e-4)
    assert torch.allclose(A, A_scaled, atol=1e-9)
    # the estimator as LOSSES.md states it, written out with Python loops
    for g in range(2):
        returns = {}
        for i in (2 * g, 2 * g + 1):
            for t in range(3):
                if table[i][t] is not None:
                    returns[(i, t)] = sum(v for v in table[i][t:] if v is not None)
        vals = list(returns.values())
        mu = sum(vals) / len(vals) if vals else 0.0
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        flat = len(vals) < 2 or max(vals) == min(vals)
        for (i, t), v in returns.items():
            assert math.isclose(float(A[i, t]), 0.0 if flat else (v - mu) / (sd + 1e-4), rel_tol=1e-6, abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the loss never sees a tool token
# ---------------------------------------------------------------------------------------------------------------


def test_tool_tokens_are_outside_every_mask_and_normaliser(tmp_path, monkeypatch):
    seen = []
    real = policy_gradient.micro_loss

    def spy(model, batch, rows, cfg, normalizer, n_tokens, vision=None):  # noqa: ANN001
        seen.append((batch, list(rows), normalizer))
        return real(model, batch, rows, cfg, normalizer, n_tokens, vision)

    monkeypatch.setattr(policy_gradient, "micro_loss", spy)
    fmt = templates.get_format("qwen2.5")
    cfg = build_config(GRPOConfig, dict(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, max_steps=1,
                                        max_new_tokens=80, micro_batch_size=4, progress=False, chat_format="qwen2.5",
                                        max_prompt_length=None,
                                        num_iterations=1))  # fmt: skip
    train_grpo(cfg, model=_tiny(), tokenizer=TOK, train_data=_rows(2), reward_funcs=[_zero], tools=[multiply],
               generator=Scripted(_calculator_script(fmt, {"tools": [tools.function_schema(
                   multiply)]})))  # fmt: skip
    batch, rows, normalizer = seen[0]
    trained_tokens = 0
    for i in rows:
        c = batch.completion_ids[i]
        m = batch.cmask[i, : len(c)]
        trained_tokens += int(m.sum())
        assert "<tool_response>" in TOK.decode([t for t, k in zip(c, m) if not k])
        assert "<tool_response>" not in TOK.decode([t for t, k in zip(c, m) if k])
    assert normalizer == trained_tokens  # token_mean: D counts the model's tokens only
    # glue positions carry no old log-probs, advantages or weights into the loss: NaN there changes nothing
    model = _tiny()
    loss, _ = real(model, batch, rows, cfg, normalizer, float(trained_tokens))
    poisoned = type(batch)(**{**batch.__dict__, "old_logps": torch.where(batch.cmask, torch.zeros_like(
        batch.cmask, dtype=torch.float32), torch.nan)})  # fmt: skip
    loss2, _ = real(model, poisoned, rows, cfg, normalizer, float(trained_tokens))
    assert torch.isfinite(loss2) and torch.allclose(loss, loss2)


def test_async_grpo_runs_tool_rollouts_on_its_rollout_worker(tmp_path):
    """Async GRPO (a worker thread driving the engine) makes the same multi-turn tool rounds as the sync loop."""
    fmt = templates.get_format("qwen2.5")
    script = _calculator_script(fmt, {"tools": [tools.function_schema(multiply)]})
    records = []
    cfg = build_config(GRPOConfig, dict(output_dir=str(tmp_path), group_size=2, prompts_per_step=2, max_steps=3,
                                        max_new_tokens=80, micro_batch_size=4, progress=False, chat_format="qwen2.5",
                                        max_prompt_length=None, async_rollout=True, max_staleness=1))  # fmt: skip
    train_grpo(cfg, model=_tiny(), tokenizer=TOK, train_data=_rows(4), reward_funcs=[_is_product], tools=[multiply],
               generator=Scripted(script), callbacks=[lambda step, rec: records.append(dict(rec))])  # fmt: skip
    assert len(records) == 3
    for rec in records:
        assert rec["tools/calls_per_rollout"] == 1 and rec["tools/turns"] == 2 and rec["reward"] == 1.0


def _is_product(prompts, completions, completion_ids, answer, **kw) -> list[float]:  # noqa: ANN001
    return [float(c.strip() == a) for c, a in zip(completions, answer)]
