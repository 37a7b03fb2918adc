"""Learning with a tool: a tiny model SFT'd on a few thousand calculator traces, then GRPO on 3-digit products it
cannot compute itself. The success rate of sampled rollouts on held-out problems rises clearly, and no micro-batch
of the loss ever trains a token of a tool result or of the template between turns."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
import torch

from alignkit import templates
from alignkit.config import build_config
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.prompts import load_prompts
from alignkit.loops import policy_gradient
from alignkit.loops.grpo import GRPOConfig, train_grpo
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.models import build_tiny_model, eval_mode, tiny_llama_config
from alignkit.rollout.hf import HFGenerator
from alignkit.rollout.multi_turn import ToolUse, tool_rollouts

FMT = "qwen2.5"
MAX_NEW, BUDGET = 100, 240


def calc(expr: str) -> str:
    """Evaluate a product like 12*34.

    Args:
        expr: the expression
    """
    a, b = expr.split("*")
    return str(int(a) * int(b))


def _prompt(a: int, b: int) -> dict[str, Any]:
    return {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": f"{a}*{b}"}],
            "answer": str(a * b)}  # fmt: skip


def _trace(a: int, b: int) -> dict[str, Any]:
    call = {"id": "t000c0000", "type": "function", "function": {"name": "calc", "arguments": {"expr": f"{a}*{b}"}}}
    return {"messages": [*_prompt(a, b)["prompt"], {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "t000c0000", "name": "calc", "content": str(a * b)},
                         {"role": "assistant", "content": str(a * b)}]}  # fmt: skip


def correct(prompts, completions, completion_ids, answer, **kw) -> list[float]:  # noqa: ANN001
    """1 when the model's last turn is the product."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def _success(model: torch.nn.Module, tok: Any, rows: list[dict[str, Any]], tool_use: ToolUse) -> float:  # noqa: ANN401
    """Fraction of 4 sampled rollouts (T=1) per held-out problem whose answer is right."""
    prompts = load_prompts(rows, tok, chat_format=FMT, verbose=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with eval_mode(model), torch.no_grad():
        ro = tool_rollouts(HFGenerator(model, tok.pad_token_id), tok, templates.get_format(FMT), prompts, tool_use,
                           n=4, sampling={"max_new_tokens": MAX_NEW, "temperature": 1.0}, stops=[end],
                           seeds=[7919 * i for i in range(len(prompts))])  # fmt: skip
    answers = [r["answer"] for r in rows for _ in range(4)]
    return sum(t.strip() == a for t, a in zip(ro.texts, answers)) / len(answers)


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    torch.manual_seed(0)
    rng = random.Random(0)

    def problem() -> tuple[int, int]:
        return rng.randint(100, 999), rng.randint(100, 999)

    traces = [_trace(*problem()) for _ in range(6000)]
    held_out = [_prompt(*problem()) for _ in range(64)]
    train_prompts = [_prompt(*problem()) for _ in range(500)]
    tok = byte_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(tiny_llama_config(len(tok), hidden=128, layers=4, eos_token_id=end,
                                               pad_token_id=tok.pad_token_id), seed=0)  # fmt: skip
    tmp = tmp_path_factory.mktemp("tool_learning")
    sft = build_config(SFTConfig, dict(output_dir=str(tmp / "sft"), chat_format=FMT, max_steps=300, batch_size=16,
                                       lr=3e-3, progress=False, max_length=256))  # fmt: skip
    train_sft(sft, model=model, tokenizer=tok, train_data=traces)
    tool_use = ToolUse({"calc": calc}, schemas_in_prompt=False, max_tool_calls=2, max_completion_length=BUDGET)
    before = _success(model, tok, held_out, tool_use)

    seen: list[tuple[Any, list[int]]] = []
    real = policy_gradient.micro_loss

    def spy(model, batch, rows, cfg, normalizer, n_tokens, vision=None):  # noqa: ANN001
        seen.append((batch, list(rows)))
        return real(model, batch, rows, cfg, normalizer, n_tokens, vision)

    grpo = build_config(GRPOConfig, dict(output_dir=str(tmp / "grpo"), chat_format=FMT, group_size=8,
                                         prompts_per_step=8, max_new_tokens=MAX_NEW, temperature=1.0,
                                         micro_batch_size=64, max_steps=30, lr=3e-4, progress=False,
                                         stop_tokens=["<|im_end|>"], tool_schemas_in_prompt=False, max_tool_calls=2,
                                         max_completion_length=BUDGET))  # fmt: skip
    mp = pytest.MonkeyPatch()
    mp.setattr(policy_gradient, "micro_loss", spy)
    try:
        out = train_grpo(grpo, model=model, tokenizer=tok, train_data=train_prompts, reward_funcs=[correct],
                         tools=[calc])  # fmt: skip
    finally:
        mp.undo()
    after = _success(model, tok, held_out, tool_use)
    print(f"\n[tool learning] held-out success of sampled rollouts: {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "seen": seen, "tok": tok, "out": out}


def test_grpo_with_a_calculator_raises_the_success_rate(tool_run):
    before, after = tool_run["before"], tool_run["after"]
    assert 0.02 < before < 0.5  # SFT taught the format but not reliable copying: room to learn, not zero
    assert after >= before + 0.1 and after >= 1.5 * before, (before, after)
    assert tool_run["out"]["last"]["tools/calls_per_rollout"] > 0.9  # it solves them with the tool


def _runs(mask: list[bool]) -> list[tuple[bool, int, int]]:
    """(trained, start, end) of each run of equal mask values."""
    out, start = [], 0
    for j in range(1, len(mask) + 1):
        if j == len(mask) or mask[j] != mask[start]:
            out.append((mask[start], start, j))
            start = j
    return out


# what Qwen2.5's template writes between a model turn and the next: the tool results and the generation prompt
GLUE = re.compile(
    r"\n<\|im_start\|>user\n(<tool_response>\n.*?\n</tool_response>\n?)+<\|im_end\|>\n<\|im_start\|>assistant\n",
    re.DOTALL,
)


def test_the_loss_never_sees_a_tool_token(tool_run):
    """In every micro-batch the loss saw, each untrained stretch of a completion is exactly template glue with tool
    results in it, and each trained stretch is one whole model turn (ending on its stop token, the last one maybe
    cut): the model's own tokens, whatever it wrote (at T=1 it sometimes writes tags itself), and nothing else."""
    tok = tool_run["tok"]
    assert len(tool_run["seen"]) == 30
    glued = 0
    for batch, rows in tool_run["seen"]:
        for i in rows:
            c = batch.completion_ids[i]
            runs = _runs(batch.cmask[i, : len(c)].tolist())
            assert runs[0][0]  # a completion starts with the model's turn
            for k, (trained, a, b) in enumerate(runs):
                text = tok.decode(c[a:b])
                if trained:
                    assert text.endswith("<|im_end|>") or k == len(runs) - 1
                else:
                    assert GLUE.fullmatch(text), text
                    glued += 1
    assert glued > 100  # the model called the tool in most rollouts: the check saw plenty of tool results
