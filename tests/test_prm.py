"""PRM heads, scoring, trajectory scores, the reward adapter, the loop (learning, resume, CLI) and GRPO with a PRM
as its reward."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.collate import pad_collate
from alignkit.data.prm import IGNORE_INDEX, StepSplitter, tokenize_prm_rows
from alignkit.data.rows import RowError as RowError_
from alignkit.losses.reward import prm_loss
from alignkit.models import tiny_llama_config
from alignkit.prm import prm_head, prm_reward, score_steps, step_logits, step_metrics, trajectory_scores

TOK = byte_tokenizer()


def _prm(num_labels: int = 2, seed: int = 0, **kw) -> torch.nn.Module:  # noqa: ANN003
    cfg = tiny_llama_config(len(TOK), hidden=32, layers=1, heads=2, kv_heads=1, num_labels=num_labels, **kw)
    torch.manual_seed(seed)
    return AutoModelForTokenClassification.from_config(cfg).eval()


def _lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        tiny_llama_config(len(TOK), hidden=32, layers=1, heads=2, kv_heads=1)
    ).eval()


PAIRS = [
    ("1+1", ["1+1=2", "2+3=6"]),
    ("Q: longer prompt", ["a", "bb", "ccc", "dddd"]),
    ([{"role": "user", "content": "chat"}], ["x=1", "y=2"]),
    ("none", []),
]


def _batch(rows: list[dict]) -> dict:
    ex, _ = tokenize_prm_rows(TOK, rows)
    return pad_collate(ex, pad_token_id=TOK.pad_token_id)


ROWS = [{"prompt": p, "completions": s, "labels": [k % 2 == 0 for k in range(len(s))]} for p, s in PAIRS[:3]]

# --------------------------------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["classification", "scalar", "lm"])
def test_step_logits_equal_full_forward_at_label_tokens(head: str) -> None:
    b = _batch(ROWS)
    pos = b["labels"] != IGNORE_INDEX
    kw = {"attention_mask": b["attention_mask"], "position_ids": b["position_ids"]}
    if head == "lm":
        model, cand = _lm(), (ord("-"), ord("+"))
        full = model(b["input_ids"], **kw).logits[..., list(cand)]  # read at the label token, no shift
    else:
        model, cand = _prm(2 if head == "classification" else 1), None
        full = model(b["input_ids"], **kw).logits
        if head == "scalar":
            full = torch.cat([torch.zeros_like(full), full], -1)
    assert prm_head(model, cand) == head
    got = step_logits(model, b["input_ids"], pos, candidate_ids=cand, **kw)
    assert got.shape == (int(pos.sum()), 2)
    torch.testing.assert_close(got, full[pos], atol=1e-5, rtol=1e-4)


def test_scalar_head_loss_is_bce_with_soft_labels() -> None:
    z = torch.randn(7, 1)
    q = torch.rand(7)
    logits = torch.cat([torch.zeros_like(z), z], -1)
    loss, _ = prm_loss(logits, (q > 0.5).long(), normalizer=7, soft_labels=q)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(z.squeeze(-1), q))


def test_prm_head_errors() -> None:
    with pytest.raises(ValueError, match="candidate_ids"):
        prm_head(_lm())
    with pytest.raises(ValueError, match="1 or 2 outputs"):
        prm_head(_prm(3))


# --------------------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------------------


def test_score_steps_batched_matches_single_and_training_positions() -> None:
    model = _prm()
    batched = score_steps(model, TOK, PAIRS, batch_size=3)
    singles = [score_steps(model, TOK, p, s) for p, s in PAIRS]
    assert [len(x) for x in batched] == [2, 4, 2, 0]
    for a, b in zip(batched, singles):
        assert a == pytest.approx(b, abs=1e-5)
    flat = [p for row in batched for p in row]
    assert [p for row in score_steps(model, TOK, PAIRS, batch_size=1) for p in row] == pytest.approx(flat, abs=1e-5)
    # The same probabilities as the training forward at the training label positions.
    b = _batch(ROWS)
    pos = b["labels"] != IGNORE_INDEX
    probs = model(b["input_ids"], attention_mask=b["attention_mask"]).logits[pos].softmax(-1)[:, 1].tolist()
    assert [p for row in batched[:3] for p in row] == pytest.approx(probs, abs=1e-5)
    assert model.training is False and all(0 < p < 1 for row in batched for p in row)


def test_score_steps_truncation_gives_nan_and_restores_mode() -> None:
    model = _prm().train()
    scores = score_steps(model, TOK, "Q:", ["1+1=2", "2+2=4", "3+3=6"], max_length=14)
    assert not math.isnan(scores[0]) and not math.isnan(scores[1]) and math.isnan(scores[2])
    assert model.training  # put back as found


def test_trajectory_scores() -> None:
    s = [[0.9, 0.5, 0.8], [0.4], [], [0.6, math.nan]]
    want = {
        "min": [0.5, 0.4, math.nan, 0.6],
        "prod": [0.36, 0.4, math.nan, 0.6],
        "mean": [2.2 / 3, 0.4, math.nan, 0.6],
        "last": [0.8, 0.4, math.nan, 0.6],
        "geo_mean": [0.36 ** (1 / 3), 0.4, math.nan, 0.6],
    }
    for how, w in want.items():
        assert trajectory_scores(s, how) == pytest.approx(w, nan_ok=True, abs=1e-6)
    with pytest.raises(ValueError, match="unknown step aggregation"):
        trajectory_scores(s, "max")


def test_step_metrics() -> None:
    scores = torch.tensor([0.9, 0.2, 0.7, 0.1, 0.8, 0.6])
    labels = torch.tensor([1, 0, 0, 1, 1, 1])
    m = step_metrics(scores, labels)
    # predicted bad: idx 1, 3; truly bad: idx 1, 2 -> tp 1, precision 1/2, recall 1/2
    assert m["step_accuracy"] == pytest.approx(4 / 6)
    assert m["majority_baseline"] == pytest.approx(4 / 6)
    assert m["bad_precision"] == m["bad_recall"] == m["bad_f1"] == pytest.approx(0.5)
    assert m["n_bad"] == 2 and m["n_steps"] == 6


def test_prm_reward_contract() -> None:
    model = _prm()
    reward = prm_reward(model, TOK, step_splitter="paragraphs", aggregation="prod")
    prompts = ["p1", "p2", [{"role": "user", "content": "chat"}], "p4"]
    completions = ["a\n\nb", "   \n\n", [{"role": "assistant", "content": "x\n\ny\n\nz"}], "only"]
    out = reward(prompts, completions, completion_ids=None, answer=["1", "2", "3", "4"])
    assert reward.__name__ == "prm_prod" and out[1] is None
    steps = [["a", "b"], ["x", "y", "z"], ["only"]]
    want = trajectory_scores(score_steps(model, TOK, list(zip([prompts[0], prompts[2], prompts[3]], steps))), "prod")
    assert [out[0], out[2], out[3]] == pytest.approx(want, abs=1e-6)
    custom = prm_reward(model, TOK, step_splitter=lambda t: t.split("|"), aggregation="min")
    assert custom(["p"], ["a|b"]) == pytest.approx(trajectory_scores(score_steps(model, TOK, [("p", ["a", "b"])])))
    assert StepSplitter("marker")("s1 ки\ns2 ки") == ["s1", "s2"]
    with pytest.raises(ValueError, match="aggregation"):
        prm_reward(model, TOK, aggregation="max")


# --------------------------------------------------------------------------------------------------------------------
# the loop: learning, resume, CLI
# --------------------------------------------------------------------------------------------------------------------


def comparison_rows(n: int, seed: int, steps: int = 4) -> list[dict]:
    """Steps are claims "a<b" about two distinct digits; a false claim is a wrong step. Neither digit alone decides
    the label (a model reading one digit tops out near 78% accuracy); relating the two gets 100%."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pairs = [rng.sample(range(10), 2) for _ in range(steps)]
        rows.append(
            {"prompt": "Check:", "completions": [f"{a}<{b}" for a, b in pairs], "labels": [a < b for a, b in pairs]}
        )
    return rows


def _cfg(tmp_path, **kw):  # noqa: ANN001, ANN003, ANN202
    from alignkit.loops.prm import PRMConfig

    base = dict(output_dir=str(tmp_path), batch_size=16, lr=3e-3, warmup_steps=5, max_length=64, progress=False)
    return PRMConfig(**{**base, **kw})


@pytest.mark.slow
def test_prm_learns_to_find_wrong_steps(tmp_path) -> None:
    from alignkit.loops.prm import train_prm
    from alignkit.metrics import read_metrics

    # One layer is enough (two heads fetch the digits, the MLP compares) and learns sooner than two; a constant
    # rate because the comparison "clicks" after a seed-dependent number of steps (40-90 over seeds 0-3).
    cfg = tiny_llama_config(
        len(TOK), hidden=64, layers=1, heads=4, kv_heads=2, num_labels=2, max_positions=64, classifier_dropout=0.0
    )
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(cfg)
    out = train_prm(
        _cfg(tmp_path, max_steps=120, eval_every=60, schedule="constant"),
        model=model,
        tokenizer=TOK,
        train_data=comparison_rows(120 * 16, seed=0),
        eval_data=comparison_rows(64, seed=1),
    )
    ev = out["eval"]
    assert ev["n_steps"] == 256 and 0.4 < ev["majority_baseline"] < 0.65
    assert ev["step_accuracy"] > 0.9 > ev["majority_baseline"] + 0.25, ev
    assert ev["bad_f1"] > 0.85, ev
    recs = read_metrics(tmp_path)
    assert {"loss", "lr", "grad_norm", "step_accuracy", "eval_step_accuracy", "eval_bad_f1"} <= set(recs[-1])
    assert recs[-1]["loss"] < recs[0]["loss"]
    # The trained PRM, used through score_steps, tells a wrong step from a right one.
    p = score_steps(model, TOK, "Check:", ["1<8", "7<2", "3<5", "9<0"])
    assert p[0] > 0.5 and p[2] > 0.5 and p[1] < 0.5 and p[3] < 0.5, p


def test_resume_is_exact_and_heads(tmp_path) -> None:
    from alignkit.loops.prm import train_prm

    rows = comparison_rows(32, seed=3)
    rows[0]["labels"] = [0.9, 0.1, 0.6, 0.3]  # soft labels ride along

    def run(d, steps, **kw):  # noqa: ANN001, ANN003, ANN202
        model = _prm()
        out = train_prm(
            _cfg(d, batch_size=4, max_steps=steps, save_every=2, **kw), model=model, tokenizer=TOK, train_data=rows
        )
        return model, out

    ref, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    model, out = run(tmp_path / "b", 4, resume=True)
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert out["last"]["step"] == 4 and out["last"]["num_steps"] == 16
    # scalar (BCE) and LM heads train through the same loop
    for head, model in [("scalar", _prm(1)), ("lm", _lm())]:
        before = [p.detach().clone() for p in model.parameters()]
        train_prm(_cfg(tmp_path / head, head=head, max_steps=1), model=model, tokenizer=TOK, train_data=rows)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cli_prm(tmp_path) -> None:
    from alignkit.cli import main
    from alignkit.metrics import read_metrics

    model_dir = tmp_path / "model"
    _prm().save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in comparison_rows(8, seed=4)))
    args = [f"model={model_dir}", f"dataset={data}", f"eval_dataset={data}", "eval_split=train", "eval_every=2"]
    rc = main(["prm", *args, f"output_dir={tmp_path / 'run'}", "batch_size=4", "max_steps=2", "progress=false"])
    assert rc == 0
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2] and "eval_bad_f1" in recs[-1]
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert prm_head(reloaded) == "classification"


def test_prm_config_errors(tmp_path) -> None:
    from alignkit.loops.prm import candidate_ids, train_prm

    with pytest.raises(ValueError, match="one id"):
        candidate_ids(byte_tokenizer(), ["é", "+"])  # two UTF-8 bytes
    with pytest.raises(RowError_, match="labels"):
        train_prm(_cfg(tmp_path), model=_prm(), tokenizer=TOK, train_data=[{"prompt": "p", "completions": ["a"]}])


# --------------------------------------------------------------------------------------------------------------------
# GRPO with a PRM as its reward
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_with_prm_reward(tmp_path) -> None:
    """A PRM that learned "a step ending in a vowel is right" rewards a tiny policy's one-character completions;
    GRPO (HF backend) raises the PRM reward. The reward GRPO logs is exactly the adapter's output."""
    from alignkit.loops.grpo import GRPOConfig, train_grpo
    from alignkit.loops.prm import train_prm
    from alignkit.metrics import read_metrics
    from alignkit.models import build_tiny_model

    letters = "abcdefghijklmnopqrstuvwxyz"
    rng = random.Random(5)
    rows = [
        {"prompt": f"q{rng.randrange(16)}:", "completions": list(s), "labels": [c in "aeiou" for c in s]}
        for s in ("".join(rng.choice(letters) for _ in range(4)) for _ in range(40 * 16))
    ]
    prm = _prm()
    train_prm(_cfg(tmp_path / "prm", max_steps=40, lr=1e-2), model=prm, tokenizer=TOK, train_data=rows)
    vowel, other = score_steps(prm, TOK, [("q3:", ["a"]), ("q3:", ["k"])])
    assert vowel[0] > 0.8 and other[0] < 0.2, (vowel, other)

    reward = prm_reward(prm, TOK, aggregation="min")
    calls = []

    def recorded(prompts, completions, completion_ids, **kw):  # noqa: ANN001, ANN003, ANN202
        out = reward(prompts, completions, completion_ids, **kw)
        calls.append(out)
        return out

    recorded.__name__ = "prm"
    end = TOK.convert_tokens_to_ids("<|im_end|>")
    policy_cfg = tiny_llama_config(len(TOK), hidden=32, layers=2, eos_token_id=end, pad_token_id=TOK.pad_token_id)
    policy = build_tiny_model(policy_cfg, seed=0)
    grpo = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        group_size=8,
        prompts_per_step=4,
        max_new_tokens=1,
        max_steps=20,
        lr=3e-2,
        micro_batch_size=32,
        progress=False,
    )
    train_grpo(
        grpo, model=policy, tokenizer=TOK, train_data=[{"prompt": f"q{i}:"} for i in range(16)], reward_funcs=[recorded]
    )
    recs = read_metrics(tmp_path / "grpo")
    assert len(recs) == len(calls) == 20
    for rec, out in zip(recs, calls):
        scored = [v for v in out if v is not None]
        assert rec["rewards/prm/mean"] == pytest.approx(sum(scored) / len(scored), abs=1e-5)
    r = [rec["rewards/prm/mean"] for rec in recs]
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.25, r
