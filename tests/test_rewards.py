"""Reward functions: math answer matching on real GSM8K / MATH-500 rows, format and length rewards, the reward
model as a reward, and RewardSet (weights, async, failures, lookup)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.losses.advantages import grpo_advantages
from alignkit.losses.policy import overlong_penalty
from alignkit.reward_funcs import (
    REWARDS,
    RewardSet,
    answers_match,
    combine_rewards,
    extract_boxed,
    extract_final_answer,
    format_reward,
    get_reward,
    length_penalty,
    math_answer_reward,
    normalize_answer,
    parse_number,
    reward_model_reward,
)

DATA = Path(os.environ.get("ALIGNKIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
GSM8K = [DATA / "gsm8k" / "gsm8k.jsonl", DATA / "gsm8k" / "gsm8k_train.jsonl"]
MATH500 = DATA / "math500" / "math500.jsonl"
needs_gsm8k = pytest.mark.skipif(not all(p.is_file() for p in GSM8K), reason=f"GSM8K not found under {DATA}")
needs_math500 = pytest.mark.skipif(not MATH500.is_file(), reason=f"MATH-500 not found under {DATA}")
PROPS = settings(max_examples=40, deadline=None)


def _rows(*paths: Path) -> list[dict]:
    return [json.loads(ln) for p in paths for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _score(completions: list[str], answers: list[str | None]) -> list[float | None]:
    n = len(completions)
    return math_answer_reward([""] * n, completions, [[0]] * n, answer=answers)


# ---------------------------------------------------------------------------------------------------------------
# math: real data
# ---------------------------------------------------------------------------------------------------------------


@needs_gsm8k
def test_gsm8k_solutions_match_their_answers_and_corruptions_do_not():
    rows = _rows(*GSM8K)
    assert len(rows) > 3000
    answers = [r["answer"] for r in rows]
    as_trained = [r["solution"] + "\n#### " + r["answer"] for r in rows]  # GSM8K's own answer format
    assert _score(as_trained, answers) == [1.0] * len(rows)
    boxed = [r["solution"] + f"\nThe answer is $\\boxed{{{int(r['answer']):,}}}$." for r in rows]
    assert _score(boxed, answers) == [1.0] * len(rows)
    plus_one = [str(int(a) + 1) for a in answers]
    assert _score(as_trained, plus_one) == [0.0] * len(rows)
    # another row's (different) answer
    shuffled = answers[1:] + answers[:1]
    keep = [i for i in range(len(rows)) if int(shuffled[i]) != int(answers[i])]
    assert _score([as_trained[i] for i in keep], [shuffled[i] for i in keep]) == [0.0] * len(keep)


@needs_gsm8k
def test_gsm8k_raw_worked_answers_with_calculator_annotations():
    raw = _rows(DATA / "gsm8k" / "raw" / "test.jsonl")
    refs = [r["answer"].rsplit("####", 1)[1].strip() for r in raw]
    assert _score([r["answer"] for r in raw], refs) == [1.0] * len(raw)
    # the reference column may also hold the whole worked answer: its final "#### N" is used
    assert answers_match("#### 18", raw[0]["answer"])


@needs_gsm8k
def test_gsm8k_last_number_fallback_is_mostly_right():
    # Without "####" the last number of the worked solution is usually (not always) the answer.
    rows = _rows(*GSM8K)
    got = _score([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert set(got) == {0.0, 1.0}
    assert sum(got) / len(got) > 0.9


@needs_math500
def test_math500_solutions_match_and_corrupted_answers_do_not():
    rows = _rows(MATH500)
    assert len(rows) == 500
    answers = [r["answer"] for r in rows]
    assert _score([r["solution"] for r in rows], answers) == [1.0] * 500
    # "answer + 1" is never equal to the answer (for tuples / intervals it is not even well formed)
    assert _score([r["solution"] for r in rows], [a + "+1" for a in answers]) == [0.0] * 500
    numeric = [i for i, a in enumerate(answers) if re.fullmatch(r"-?\d+", a)]
    assert len(numeric) > 200
    assert _score([rows[i]["solution"] for i in numeric], [str(int(answers[i]) - 3) for i in numeric]) == [0.0] * len(
        numeric
    )


@needs_math500
def test_math500_answers_written_differently_still_match():
    rows = _rows(MATH500)
    rng = random.Random(0)

    def restyle(a: str) -> str:  # the same answer as a model might typeset it
        a = a.replace("\\frac", rng.choice(["\\frac", "\\dfrac", "\\tfrac"]))
        a = a.replace("(", rng.choice(["(", "\\left("])).replace(")", rng.choice([")", "\\right)"]))
        return rng.choice(["", "\\displaystyle "]) + a.replace(",", rng.choice([",", ", ", ",\\,"]))

    completions = [f"Reasoning ... so the answer is $\\boxed{{{restyle(r['answer'])}}}$." for r in rows]
    assert _score(completions, [r["answer"] for r in rows]) == [1.0] * 500
    numeric = [r for r in rows if re.fullmatch(r"-?\d+", r["answer"])]
    comps = [f"The final answer is {int(r['answer']):,}.00" for r in numeric]
    assert _score(comps, [r["answer"] for r in numeric]) == [1.0] * len(numeric)


@needs_math500
def test_normalize_is_idempotent_on_math500_answers():
    for r in _rows(MATH500):
        n = normalize_answer(r["answer"])
        assert n and normalize_answer(n) == n


# ---------------------------------------------------------------------------------------------------------------
# math: extraction and normalisation
# ---------------------------------------------------------------------------------------------------------------


def _braced(depth: int) -> st.SearchStrategy[str]:
    """Balanced TeX-ish strings with nested braces (and escaped \\{ \\} that must not count)."""
    leaf = st.text(alphabet="abc123+-^_ \\{}", max_size=4).map(
        lambda s: s.replace("\\", "").replace("{", "\\{").replace("}", "\\}")
    )
    if depth == 0:
        return leaf
    inner = _braced(depth - 1)
    return st.lists(st.one_of(leaf, inner.map(lambda s: "{" + s + "}")), max_size=3).map("".join)


@PROPS
@given(_braced(3), _braced(2), st.text(alphabet="xyz =,.", max_size=10))
def test_boxed_extraction_keeps_nested_braces_and_takes_the_last(first, last, noise):
    text = f"{noise} \\boxed{{{first}}} {noise} then $\\boxed{{{last}}}$ {noise}"
    assert extract_boxed(text) == last
    assert extract_boxed(f"\\boxed{{{first}}} and an unfinished \\boxed{{{last}") == first


def test_boxed_extraction_cases():
    assert extract_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed(r"\boxed{\{1,2\}} x") == r"\{1,2\}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"so \boxed 5$.") == "5"
    assert extract_boxed(r"\boxed{ 12 }") == " 12 "
    assert extract_boxed(r"\boxed{3") is None
    assert extract_boxed("no box here") is None


def test_final_answer_precedence():
    assert extract_final_answer("#### 3 then \\boxed{4}") == "4"  # boxed wins
    assert extract_final_answer("we get 5 apples\n#### 7\n") == "7"
    assert extract_final_answer("#### 18 eggs") == "18"
    assert extract_final_answer("It costs $1,234.50 in total, 3 times.") == "3"
    assert extract_final_answer("So x = -2.5.") == "-2.5"
    assert extract_final_answer("no digits") is None


@PROPS
@given(st.integers(-(10**9), 10**9), st.integers(1, 5))
def test_integer_renderings_match_and_neighbours_do_not(n, k):
    ref = str(n)
    sign = "-" if n < 0 else ""
    for form in (f"{n:,}", f"{n}.0", f"{n}.00", f"${n}", f"{sign}\\${abs(n)}", f"{n}\\%", f"{n}%", f"x = {n}"):
        assert answers_match(form, ref), form
    assert answers_match(f"{n:,}".replace(",", ",\\!"), ref)
    assert not answers_match(str(n + k), ref)
    assert not answers_match(f"{n + k:,}", ref)


@PROPS
@given(st.integers(-999, 999), st.integers(1, 999))
def test_fraction_renderings_match_equal_rationals(p, q):
    ref = f"\\frac{{{p}}}{{{q}}}" if p >= 0 else f"-\\frac{{{-p}}}{{{q}}}"
    forms = [f"{p}/{q}", ref.replace("\\frac", "\\dfrac"), f"{2 * p}/{2 * q}"]
    if 10**6 % q == 0:  # terminating decimal
        forms.append(str(Fraction(p, q).numerator / Fraction(p, q).denominator))
    for form in forms:
        assert answers_match(form, ref), (form, ref)
    assert not answers_match(f"{p + 1}/{q}", ref)
    assert parse_number(normalize_answer(ref)) == Fraction(p, q)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("1,000", "1000"),
        ("$18.00", "18"),
        ("\\$18.90", "18.9"),
        (".5", "0.5"),
        ("\\frac12", "0.5"),
        ("\\frac 59", "\\frac{5}{9}"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("1\\frac{4}{5}", "9/5"),
        ("137 \\frac{1}{2}", "137.5"),
        ("-\\frac{3}{8}", "-0.375"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90 degrees"),
        ("5.4 \\text{ cents}", "5.4"),
        ("864 \\mbox{ inches}^2", "864"),
        ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("4210_{5}", "4210_5"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\text{(C)}", "C"),
        ("(C)", "\\text{C}"),
        ("y = 2x + 3", "2x+3"),
        ("\\text{East}", "east"),
        ("18.", "18"),
    ],
)
def test_equivalent_answers(pred, ref):
    assert answers_match(pred, ref)
    assert answers_match(ref, pred)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("1,2", "12"),  # a list, not a thousands separator
        ("0.333", "\\frac{1}{3}"),
        ("\\sqrt{8}", "2\\sqrt{2}"),  # no symbolic algebra (documented)
        ("50", "0.5"),
        ("2x+3", "2x+4"),
        ("", "0"),
        ("1/0", "0"),
        (None, "1"),
    ],
)
def test_different_answers(pred, ref):
    assert not answers_match(pred, ref)


@PROPS
@given(st.text(alphabet="0123456789-+.,/ {}()=xC$%_^\\fracsqrtextboxd#", max_size=30))
def test_normalize_idempotent_and_match_symmetric(s):
    n = normalize_answer(s)
    assert normalize_answer(n) == n
    assert answers_match(s, "7") == answers_match("7", s)


def test_math_reward_none_without_answer_column():
    assert math_answer_reward(["p", "q"], ["\\boxed{1}", "2"], [[1], [2]]) == [None, None]
    assert _score(["\\boxed{1}", "2", "3"], ["1", None, "4"]) == [1.0, None, 0.0]
    # conversational completions: the last message's content
    assert _score([[{"role": "assistant", "content": "\\boxed{6}"}]], ["6"]) == [1.0]


# ---------------------------------------------------------------------------------------------------------------
# format and length
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("<think>add them</think>\nThe answer is 4.", True),
        ("  <think></think> 4", True),
        ("<think>a</think>", False),  # no answer
        ("<think>a</think>   \n", False),
        ("The answer is 4.", False),
        ("4 <think>a</think>", False),
        ("<think>a</think> 4 <think>b</think> 5", False),
        ("<think>a <think> b</think> 4", False),
        ("<think>a 4", False),
    ],
)
def test_format_reward(completion, ok):
    f = get_reward("format")
    assert f(["q"], [completion], [[0]]) == [1.0 if ok else 0.0]


def test_format_reward_answer_tags_custom_tags_and_prompt_opened_think():
    f = format_reward(answer=("<answer>", "</answer>"))
    comps = ["<think>x</think><answer>4</answer>", "<think>x</think> <answer> </answer>", "<think>x</think> 4"]
    assert f(["q"] * 3, comps, [[0]] * 3) == [1.0, 0.0, 0.0]
    g = get_reward("format", think="reasoning", value=0.5)
    assert g(["q", "q"], ["<reasoning>r</reasoning> 4", "<think>r</think> 4"], [[0], [0]]) == [0.5, 0.0]
    # Qwen3 / R1 templates end the prompt with "<think>\n": the completion starts inside the block
    h = format_reward()
    prompts = ["<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n"]
    assert h(prompts, ["steps</think> 4", "steps</think> 4"], [[0], [0]]) == [1.0, 0.0]
    assert format_reward(prompt_opens_think=False)(prompts[:1], ["steps</think> 4"], [[0]]) == [0.0]


@PROPS
@given(st.lists(st.integers(0, 80), min_size=1, max_size=12), st.integers(8, 64), st.data())
def test_length_penalty_is_dapo_overlong_shaping(lengths, max_len, data):
    buffer = data.draw(st.integers(1, max_len))
    factor = data.draw(st.floats(0.1, 2.0))
    f = get_reward("overlong", max_len=max_len, buffer=buffer, factor=factor)
    got = f([""] * len(lengths), [""] * len(lengths), [[7] * n for n in lengths])
    for n, v in zip(lengths, got):
        expected = -factor * min(max((n - max_len + buffer) / buffer, 0.0), 1.0)  # DAPO eq. (13)
        assert v == pytest.approx(expected, abs=1e-6)
    ref = overlong_penalty(torch.tensor(lengths), max_len, buffer, factor)
    torch.testing.assert_close(torch.tensor(got), ref.float())


def test_length_penalty_arguments():
    with pytest.raises(ValueError, match="buffer"):
        length_penalty(10, 0)
    with pytest.raises(TypeError):
        get_reward("length")  # max_len and buffer are required


# ---------------------------------------------------------------------------------------------------------------
# RewardSet
# ---------------------------------------------------------------------------------------------------------------


def const_reward(prompts, completions, completion_ids, **kw):
    """Dotted-path target: reward = number of completion tokens."""
    return [float(len(ids)) for ids in completion_ids]


def scaled_factory(scale: float = 1.0):
    """Dotted-path factory target."""

    def scaled(prompts, completions, completion_ids, **kw):
        return [scale * len(c) for c in completions]

    return scaled


def _batch(n: int = 4):
    return [f"p{i}" for i in range(n)], [f"c{i}" * (i + 1) for i in range(n)], [[1] * (i + 1) for i in range(n)]


def test_columns_arrive_as_keyword_lists_and_none_is_nan():
    seen = {}

    def uses_columns(prompts, completions, completion_ids, answer, level, **kw):
        seen.update(answer=answer, level=level, extra=sorted(kw))
        return [None if lv == 2 else float(lv) for lv in level]

    p, c, ids = _batch(3)
    R, metrics = RewardSet([uses_columns])(p, c, ids, answer=["1", "2", "3"], level=[1, 2, 3], subject=["a"] * 3)
    assert seen == {"answer": ["1", "2", "3"], "level": [1, 2, 3], "extra": ["subject"]}
    assert R.dtype == torch.float32 and R.shape == (3, 1)
    assert R[0, 0] == 1 and math.isnan(R[1, 0]) and R[2, 0] == 3
    assert metrics["rewards/uses_columns/mean"] == pytest.approx(2.0)
    assert metrics["rewards/uses_columns/frac_none"] == pytest.approx(1 / 3)
    assert metrics["reward_errors/uses_columns"] == 0


def test_async_rewards_run_concurrently():
    a_started, b_started = asyncio.Event(), asyncio.Event()

    async def a(prompts, completions, completion_ids, **kw):
        a_started.set()
        await asyncio.wait_for(b_started.wait(), 5)  # would time out (-> NaN) if run one after the other
        return [1.0] * len(completions)

    async def b(prompts, completions, completion_ids, **kw):
        b_started.set()
        await asyncio.wait_for(a_started.wait(), 5)
        return [2.0] * len(completions)

    p, c, ids = _batch()
    R, metrics = RewardSet([a, const_reward, b])(p, c, ids)
    assert not torch.isnan(R).any()
    torch.testing.assert_close(R[:, 0], torch.ones(4))
    torch.testing.assert_close(R[:, 2], torch.full((4,), 2.0))
    assert metrics["reward_errors/a"] == 0 and metrics["reward_errors/b"] == 0


def test_async_rewards_inside_a_running_event_loop():
    async def slow(prompts, completions, completion_ids, **kw):
        await asyncio.sleep(0.01)
        return [3.0] * len(completions)

    rs = RewardSet([slow, const_reward])
    p, c, ids = _batch()

    async def main():
        sync_inside_loop = rs(p, c, ids)[0]  # a running loop in this thread: runs on a helper thread
        awaited = (await rs.acall(p, c, ids))[0]
        return sync_inside_loop, awaited

    x, y = asyncio.run(main())
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(x[:, 0], torch.full((4,), 3.0))


def test_failing_reward_is_nan_counted_logged_once_and_training_goes_on(caplog):
    calls = {"n": 0}

    def flaky(prompts, completions, completion_ids, **kw):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("judge timed out")
        return [0.5] * len(completions)

    async def async_boom(prompts, completions, completion_ids, **kw):
        raise ConnectionError("sandbox down")

    rs = RewardSet([const_reward, flaky, async_boom], weights=[1.0, 2.0, 3.0], max_failed_steps=None)
    p, c, ids = _batch()
    with caplog.at_level(logging.WARNING, logger="alignkit.reward_funcs.core"):
        R1, m1 = rs(p, c, ids)
        R2, m2 = rs(p, c, ids)
        R3, m3 = rs(p, c, ids)
    # flaky's batch call and its retry of sample 0 raise; the retries of samples 1-3 score
    assert math.isnan(R1[0, 1]) and torch.equal(R1[1:, 1], torch.full((3,), 0.5))
    assert torch.isnan(R1[:, 2]).all()
    torch.testing.assert_close(R1[:, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # other rewards unaffected
    assert m1["reward_errors/flaky"] == 1 and m1["reward_errors/async_boom"] == 4  # failed samples
    assert m1["reward_errors/const_reward"] == 0
    torch.testing.assert_close(R3[:, 1], torch.full((4,), 0.5))
    assert m3["reward_errors/flaky"] == 0 and m3["reward_errors/async_boom"] == 4
    assert rs.error_counts == {"flaky": 1, "async_boom": 12}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # once per failing reward, with the traceback
    assert {w.exc_info[0] for w in warnings} == {RuntimeError, ConnectionError}
    assert "judge timed out" in caplog.text and "Traceback" in caplog.text
    # the batch is still usable: finite advantages from the rewards that worked
    A, _ = grpo_advantages(R1, group_size=2, reward_weights=rs.weights)
    assert torch.isfinite(A).all() and A.abs().sum() > 0
    assert not math.isnan(m1["reward"])


def test_all_failing_gives_unscorable_rows_not_a_crash():  # once: max_failed_steps calls in a row stop a run
    def boom(prompts, completions, completion_ids, **kw):
        raise ValueError("nope")

    R, metrics = RewardSet([boom])(*_batch())
    assert torch.isnan(R).all() and math.isnan(metrics["reward"])
    A, m = grpo_advantages(R, group_size=2)
    assert (A == 0).all() and m["n_unscorable"] == 4


def test_interrupts_are_not_swallowed():
    def stop(prompts, completions, completion_ids, **kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RewardSet([stop])(*_batch())


@pytest.mark.parametrize("asynchronous", [False, True])
def test_wrong_length_is_an_error_naming_the_reward(asynchronous):
    def short(prompts, completions, completion_ids, **kw):
        return [1.0] * (len(completions) - 1)

    async def short_async(prompts, completions, completion_ids, **kw):
        return short(prompts, completions, completion_ids)

    f = short_async if asynchronous else short
    with pytest.raises(ValueError, match=f"reward '{f.__name__}' returned 3 values for 4 completions"):
        RewardSet([const_reward, f])(*_batch())


def test_bad_values_and_bad_batches_are_errors():
    def text(prompts, completions, completion_ids, **kw):
        return ["good"] * len(completions)

    with pytest.raises(TypeError, match="reward 'text'"):
        RewardSet([text])(*_batch())
    p, c, ids = _batch()
    with pytest.raises(ValueError, match="column 'answer'"):
        RewardSet([const_reward])(p, c, ids, answer=["1"])
    with pytest.raises(ValueError, match="must match"):
        RewardSet([const_reward])(p, c[:2], ids)
    with pytest.raises(ValueError, match="weights"):
        RewardSet([const_reward], weights=[1.0, 2.0])


def _column_reward(rows: list[list[float | None]], j: int):
    def column(prompts, completions, completion_ids, **kw):
        return [r[j] for r in rows]

    return column


@PROPS
@given(
    st.integers(1, 3).flatmap(
        lambda k: st.tuples(
            st.lists(st.lists(st.one_of(st.none(), st.floats(-5, 5)), min_size=k, max_size=k), min_size=4, max_size=4),
            st.lists(st.floats(-2, 2), min_size=k, max_size=k),
        )
    )
)
def test_weights_match_the_advantage_functions(rows_weights):
    rows, weights = rows_weights
    k = len(weights)
    funcs = [_column_reward(rows, j) for j in range(k)]
    rs = RewardSet(funcs, weights=weights, names=[f"r{j}" for j in range(k)])
    R, metrics = rs(*_batch(4))
    expected = torch.tensor([[math.nan if v is None else v for v in r] for r in rows], dtype=torch.float32)
    torch.testing.assert_close(R, expected, equal_nan=True)
    total = rs.weighted_sum(R)
    for i, r in enumerate(rows):
        present = [(w, v) for w, v in zip(weights, r) if v is not None]
        if present:
            assert total[i].item() == pytest.approx(sum(w * v for w, v in present), abs=1e-5)
        else:
            assert math.isnan(total[i])
    # sum-then-normalise: passing [N,K] + weights equals passing the weighted sum
    A1, _ = grpo_advantages(R, group_size=2, reward_weights=rs.weights)
    A2, _ = grpo_advantages(total, group_size=2)
    torch.testing.assert_close(A1, A2)


def test_lookup_by_name_and_dotted_path():
    assert {"math_answer", "format", "overlong", "length", "reward_model"} <= set(REWARDS)
    assert get_reward("math_answer") is math_answer_reward
    for spec in ("tests.test_rewards:const_reward", "tests.test_rewards.const_reward"):
        assert get_reward(spec)([""], [""], [[1, 2]]) == [2.0]
    f = get_reward("tests.test_rewards:scaled_factory", scale=2.0)
    assert f([""], ["abc"], [[0]]) == [6.0]
    assert get_reward(const_reward) is const_reward
    with pytest.raises(KeyError, match="math_answer"):
        get_reward("no_such_reward")
    with pytest.raises(ImportError, match="no_such_module"):
        get_reward("no_such_module:f")
    with pytest.raises(AttributeError, match="nothing"):
        get_reward("tests.test_rewards:nothing")
    with pytest.raises(TypeError, match="non-callable"):
        get_reward("tests.test_rewards:PROPS.max_examples")


def test_reward_set_from_names_and_duplicate_names():
    rs = combine_rewards(["math_answer", "tests.test_rewards:const_reward", "format", "format"], weights=[1, 1, 1, 2])
    assert rs.names == ["math_answer", "const_reward", "format_1", "format_2"]
    R, metrics = rs(["q"], ["<think>t</think> \\boxed{4}"], [[1, 2, 3]], answer=["4"])
    torch.testing.assert_close(R, torch.tensor([[1.0, 3.0, 1.0, 1.0]]))
    assert metrics["reward"] == pytest.approx(1 + 3 + 1 + 2)
    assert "reward_errors/format_2" in metrics


# ---------------------------------------------------------------------------------------------------------------
# reward model as a reward
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm():
    from transformers import AutoModelForSequenceClassification

    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.models import tiny_llama_config

    tok = byte_tokenizer()
    # pad_token_id=None: with batch size 1 HF pools the last token, an independent reference for our pooling
    cfg = tiny_llama_config(
        len(tok), hidden=32, layers=1, heads=2, kv_heads=1, num_labels=1, pad_token_id=None, initializer_range=0.2
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(cfg)
    return model, tok


def _hf_score(model, tok, text: str) -> float:
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


def test_reward_model_scores_prompt_plus_completion(tiny_rm):
    model, tok = tiny_rm
    prompts = ["2+2=", "Name a colour: ", "x", "a much longer prompt than the others, to force padding: "]
    comps = ["4", "blue", "yy", "ok"]
    f = reward_model_reward(model, tok, batch_size=3)
    got = f(prompts, comps, [[0]] * 4)
    expected = [_hf_score(model, tok, p + c + tok.eos_token) for p, c in zip(prompts, comps)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 4) for v in got)) == 4  # it reads the text, not a constant
    assert reward_model_reward(model, tok, batch_size=1)(prompts, comps, [[0]] * 4) == pytest.approx(got, abs=1e-5)


def test_reward_model_with_chat_format(tiny_rm):
    model, tok = tiny_rm
    f = reward_model_reward(model, tok, chat_format="chatml", batch_size=2)
    prompts, comps = ["What is 2+2?", "Hi"], ["4", "Hello there"]
    got = f(prompts, comps, [[0]] * 2)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False)
        for p, c in zip(prompts, comps)
    ]
    assert got == pytest.approx([_hf_score(model, tok, t) for t in texts], abs=1e-5)
    # as a reward in a set, with max_length cutting the prompt from the left
    g = reward_model_reward(model, tok, max_length=8, name="rm")
    R, metrics = RewardSet([g, "math_answer"])(prompts, comps, [[0]] * 2, answer=["4", "5"])
    assert not torch.isnan(R).any() and "rewards/rm/mean" in metrics
    ids = tok(prompts[0] + comps[0] + tok.eos_token, add_special_tokens=False)["input_ids"][-8:]
    with torch.no_grad():
        assert R[0, 0].item() == pytest.approx(model(input_ids=torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)
