"""Reward calling conventions and failures: TRL-style rewards (keywords, message completions), signatures that
fit neither convention, one failing sample, a reward that always fails (stops the run), infinite rewards."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
import torch

from alignkit.config import build_config
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.errors import RewardFailedError
from alignkit.loops.grpo import GRPOConfig, train_grpo
from alignkit.metrics import read_metrics
from alignkit.reward_funcs import RewardSet, RewardState
from tests.rl_support import PROMPT_ROWS, tiny_policy

CHAT = [{"role": "user", "content": "2+2?"}]


def ours(prompts, completions, completion_ids, **kw):
    """alignkit's convention: reward = number of completion tokens."""
    return [float(len(ids)) for ids in completion_ids]


def _batch(n: int = 4):
    return [f"p{i}" for i in range(n)], [f"c{i}" for i in range(n)], [[1] * (i + 1) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# calling conventions
# ---------------------------------------------------------------------------------------------------------------


def test_trl_style_reward_gets_keywords_and_message_completions():
    seen: dict = {}

    def trl_len(completions, **kwargs):  # TRL's documented shape
        seen.update(completions=completions, **kwargs)
        return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    rs = RewardSet([trl_len, ours])
    assert rs.conventions == ["trl", "alignkit"]
    rs.trainer_state = RewardState(global_step=7, max_steps=10)
    prompts = [CHAT, "plain text prompt"]
    R, _ = rs(prompts, ["abc", "de"], [[1, 2, 3, 0], [4, 5]], answer=["4", "x"])
    # conversational prompt -> one assistant message (as TRL builds it); a text prompt -> the text
    assert seen["completions"] == [[{"role": "assistant", "content": "abc"}], "de"]
    assert seen["prompts"] == prompts and seen["completion_ids"] == [[1, 2, 3, 0], [4, 5]]
    assert seen["answer"] == ["4", "x"]
    assert seen["trainer_state"].global_step == 7 and seen["trainer_state"].max_steps == 10
    assert callable(seen["log_metric"]) and callable(seen["log_extra"])
    torch.testing.assert_close(R, torch.tensor([[3.0, 4.0], [2.0, 2.0]]))


def test_trl_style_variants_and_what_they_receive():
    def prompts_and_completions(prompts, completions, **kwargs):  # two positional slots: keywords
        return [1.0 if isinstance(c, list) else 0.0 for c in completions]

    def keyword_only(*, completions, trainer_state, log_metric, **kwargs):
        log_metric("judge/calls", 2.0)
        return [float(trainer_state.global_step)] * len(completions)

    def named_columns_only(completions, answer):  # no **kwargs: gets only what it names
        return [float(a == c[0]["content"]) for a, c in zip(answer, completions)]

    async def async_trl(completions, log_extra, **kwargs):
        await asyncio.sleep(0)
        log_extra("judge_note", ["ok"] * len(completions))
        return [0.5] * len(completions)

    def only_kwargs(**kwargs):
        return [float(len(kwargs["completion_ids"][i])) for i in range(len(kwargs["completions"]))]

    funcs = [prompts_and_completions, keyword_only, named_columns_only, async_trl, only_kwargs]
    rs = RewardSet(funcs)
    assert rs.conventions == ["trl"] * 5
    rs.trainer_state = RewardState(global_step=3)
    R, metrics = rs([CHAT, CHAT], ["4", "5"], [[1], [1, 2]], answer=["4", "4"], level=[1, 2])
    torch.testing.assert_close(R, torch.tensor([[1.0, 3.0, 1.0, 0.5, 1.0], [1.0, 3.0, 0.0, 0.5, 2.0]]))
    assert metrics["judge/calls"] == 2.0  # TRL log_metric -> the set's metrics
    assert rs.extra_columns == {"judge_note": ["ok", "ok"]}


def test_our_convention_is_kept_for_prompts_first_and_renamed_positional_rewards():
    def renamed(p, c, ids, **kw):  # the positional contract with its own names: called positionally, as before
        return [float(len(x)) for x in ids]

    def no_kwargs(prompts, completions, completion_ids):  # columns it does not name are not passed
        return [1.0] * len(completions)

    def texts(prompts, completions, completion_ids, **kw):
        assert all(isinstance(c, str) for c in completions)  # ours gets texts, even for chat prompts
        return [1.0] * len(completions)

    rs = RewardSet([ours, renamed, no_kwargs, texts, "math_answer", "format"])
    assert rs.conventions == ["alignkit"] * 6
    R, _ = rs([CHAT, CHAT], ["\\boxed{4}", "5"], [[1, 2], [3]], answer=["4", "4"])
    assert R[:, :4].tolist() == [[2.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    assert R[:, 4].tolist() == [1.0, 0.0]


def test_reward_convention_attribute_overrides_the_detection():
    def written_for_trl(prompts, completions, completion_ids, **kwargs):  # ambiguous: ours unless marked
        return [1.0 if isinstance(c, list) else 0.0 for c in completions]

    assert RewardSet([written_for_trl]).conventions == ["alignkit"]
    written_for_trl.reward_convention = "trl"
    rs = RewardSet([written_for_trl])
    assert rs.conventions == ["trl"]
    assert rs([CHAT], ["4"], [[1]])[0].item() == 1.0
    written_for_trl.reward_convention = "hf"
    with pytest.raises(ValueError, match="reward_convention"):
        RewardSet([written_for_trl])


def test_signature_fitting_neither_convention_is_refused_when_built():
    def two_positional(a, b, /):
        return [0.0]

    with pytest.raises(TypeError, match=r"reward 'two_positional' .*needs 'a', 'b' positionally"):
        RewardSet([two_positional])

    def typo(completion, **kwargs):  # `completion`: neither a TRL keyword nor a column
        return [0.0] * len(kwargs["completions"])

    with pytest.raises(TypeError, match=r"reward 'typo' .*needs 'completion', which is never passed.*answer"):
        RewardSet([typo], columns=["answer"])

    def needs_scale(prompts, completions, completion_ids, scale):
        return [scale] * len(completions)

    with pytest.raises(TypeError, match=r"reward 'needs_scale' .*'scale'"):
        RewardSet([ours, needs_scale], columns={"answer"})
    RewardSet([needs_scale], columns={"scale"})  # a column of that name: fine

    # columns unknown when built: the first batch without it raises (a bug, not a NaN column for the whole run)
    rs = RewardSet([typo])
    with pytest.raises(TypeError, match=r"reward 'typo' needs 'completion'.*its columns: answer"):
        rs(["p"], ["c"], [[1]], answer=["a"])


def test_wrong_signature_is_refused_by_train_grpo_before_generating(tmp_path):
    tok = byte_tokenizer()

    def wrong(completion, **kwargs):
        return [0.0] * len(kwargs["completions"])

    cfg = GRPOConfig(output_dir=str(tmp_path), max_steps=2, progress=False)
    with pytest.raises(TypeError, match="reward 'wrong'"):
        train_grpo(cfg, model=tiny_policy(tok), tokenizer=tok, train_data=PROMPT_ROWS, reward_funcs=[wrong])
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first round


# ---------------------------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async", "trl"])
def test_one_failing_sample_is_nan_alone(kind, caplog):
    def picky(prompts, completions, completion_ids, **kw):
        if "bad" in completions:
            raise ValueError("cannot parse 'bad'")
        return [1.0] * len(completions)

    async def picky_async(prompts, completions, completion_ids, **kw):
        return picky(prompts, completions, completion_ids)

    def picky_trl(completions, **kwargs):
        return picky(None, [c[0]["content"] for c in completions], None)

    f = {"sync": picky, "async": picky_async, "trl": picky_trl}[kind]
    rs = RewardSet([ours, f], names=["ours", "picky"])
    p = [CHAT] * 4 if kind == "trl" else _batch()[0]
    ids = _batch()[2]
    with caplog.at_level(logging.WARNING, logger="alignkit.reward_funcs.core"):
        R, metrics = rs(p, ["ok", "bad", "ok", "ok"], ids)
    assert R[:, 1].isnan().tolist() == [False, True, False, False]
    assert R[[0, 2, 3], 1].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(R[:, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert metrics["reward_errors/picky"] == 1 and metrics["reward_errors/ours"] == 0
    assert metrics["rewards/picky/frac_none"] == pytest.approx(0.25)
    assert "cannot parse 'bad'" in caplog.text and "1 of 4 samples" in caplog.text


@pytest.mark.parametrize("asynchronous", [False, True])
def test_reward_failing_on_every_sample_stops_after_max_failed_steps(asynchronous):
    def broken(prompts, completions, completion_ids, **kw):
        return {}["no_such_field"]

    async def broken_async(prompts, completions, completion_ids, **kw):
        return broken(prompts, completions, completion_ids)

    rs = RewardSet([ours, broken_async if asynchronous else broken], names=["ours", "broken"], max_failed_steps=3)
    for _ in range(2):  # below the limit: NaN, the run goes on
        R, metrics = rs(*_batch())
        assert R[:, 1].isnan().all() and metrics["reward_errors/broken"] == 4
    with pytest.raises(RewardFailedError, match=r"(?s)reward 'broken' .*3 scoring calls in a row.*Traceback.*"):
        rs(*_batch())
    try:
        rs(*_batch())
    except RewardFailedError as e:
        assert "no_such_field" in str(e) and "KeyError" in str(e) and "return {}" in str(e)  # its traceback
        assert isinstance(e.__cause__, KeyError)


def test_failure_streak_resets_on_a_call_with_a_score_and_can_be_off():
    calls = {"n": 0}

    def mostly_broken(prompts, completions, completion_ids, **kw):
        calls["n"] += 1
        if calls["n"] != 6:  # only call 6 (the retry of sample 1 in the second batch) gets through
            raise ConnectionError("judge down")
        return [0.0]

    rs = RewardSet([mostly_broken], max_failed_steps=2)
    rs(*_batch(2))  # calls 1-3: all fail (streak 1)
    R, _ = rs(*_batch(2))  # calls 4-6: call 6 scores sample 1 -> streak back to 0
    assert R[:, 0].isnan().tolist() == [True, False]
    rs(*_batch(2))  # streak 1
    with pytest.raises(RewardFailedError, match="2 scoring calls"):
        rs(*_batch(2))

    def always(prompts, completions, completion_ids, **kw):
        raise RuntimeError("x")

    for off in (None, 0):
        never = RewardSet([always], max_failed_steps=off)
        for _ in range(5):
            assert never(*_batch())[0].isnan().all()
    with pytest.raises(ValueError, match="max_failed_steps"):
        RewardSet([always], max_failed_steps=-1)


@pytest.mark.parametrize("value", [math.inf, -math.inf, torch.tensor([0.0, math.inf, 0.0, 0.0])])
def test_infinite_reward_is_an_error_naming_it(value):
    def blowup(prompts, completions, completion_ids, **kw):
        return value if isinstance(value, torch.Tensor) else [0.0, value, 0.0, 0.0]

    with pytest.raises(ValueError, match=r"reward 'blowup' returned -?inf for completion 1: rewards must be finite"):
        RewardSet([ours, blowup])(*_batch())

    def inf_when_retried(prompts, completions, completion_ids, **kw):  # the per-sample path checks too
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [math.inf if completions[0] == "c2" else 1.0]

    with pytest.raises(ValueError, match=r"reward 'inf_when_retried' returned inf for completion 2"):
        RewardSet([inf_when_retried])(*_batch())


# ---------------------------------------------------------------------------------------------------------------
# in the GRPO loop
# ---------------------------------------------------------------------------------------------------------------


def _grpo(tmp_path, reward, rows=PROMPT_ROWS, **kw):
    base = dict(output_dir=str(tmp_path), group_size=4, prompts_per_step=2, max_new_tokens=2, lr=1e-2,
                micro_batch_size=8, progress=False)  # fmt: skip
    tok = byte_tokenizer()
    cfg = build_config(GRPOConfig, {**base, **kw})
    return train_grpo(cfg, model=tiny_policy(tok), tokenizer=tok, train_data=rows, reward_funcs=[reward])


def test_grpo_stops_on_a_reward_that_always_fails(tmp_path):
    def judge(prompts, completions, completion_ids, **kw):
        raise ConnectionError("judge endpoint refused the connection")

    with pytest.raises(RewardFailedError, match=r"(?s)reward 'judge' .*2 scoring calls.*judge endpoint refused"):
        _grpo(tmp_path, judge, max_steps=6, max_reward_failures=2)
    assert len(read_metrics(tmp_path)) == 1  # one zero-gradient step, then the second failed round stops it


def test_grpo_with_a_trl_style_reward_on_chat_prompts(tmp_path):
    seen = []

    def trl_reward(completions, trainer_state, answer, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps, completions[0], answer[0]))
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]

    rows = [{"prompt": [{"role": "user", "content": f"{i}+0"}], "answer": str(i)} for i in range(4)]
    _grpo(tmp_path, trl_reward, rows, max_steps=2, chat_format="chatml")
    assert [(s, m) for s, m, _, _ in seen] == [(0, 2), (1, 2)]
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(a, str) for _, _, c, a in seen)
    assert [r["reward_errors/trl_reward"] for r in read_metrics(tmp_path)] == [0, 0]
