"""Reward models: last-real-token scoring, save/load, TRL row formats, learning on the demo task, exact resume, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from alignkit.cli import main
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.collate import pad_collate
from alignkit.data.rows import RowError
from alignkit.demo import DemoConfig, make_rows
from alignkit.loops.reward_model import RewardConfig, evaluate, tokenize_pairs, train_reward
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.reward_model import ScalarHeadModel, build_reward_model, last_token_index, load_reward_model, score

TOK = byte_tokenizer()
PAD = TOK.pad_token_id  # == eos id in the byte tokenizer: plain rows END with the pad id


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw):  # noqa: ANN201
    return tiny_llama_config(len(TOK), hidden=32, layers=2, heads=2, kv_heads=2, **kw)


def tiny_reward_model(kind: str = "seqcls", seed: int = 0) -> torch.nn.Module:
    if kind == "seqcls":
        return build_reward_model(tiny_config(), seed=seed, pad_token_id=PAD)
    torch.manual_seed(seed)
    return ScalarHeadModel(AutoModel.from_config(tiny_config(pad_token_id=PAD)), 32)


def wrong_answer_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Chat rows with a numeric answer -> explicit-prompt conversational pairs: chosen = the right answer,
    rejected = a wrong number near it (off by 1 to 10)."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        right = int(r["messages"][1]["content"])
        wrong = right + rng.choice([d for d in range(-10, 11) if d and right + d >= 0])
        out.append(
            {
                "prompt": r["messages"][:1],
                "chosen": [{"role": "assistant", "content": str(right)}],
                "rejected": [{"role": "assistant", "content": str(wrong)}],
            }
        )
    return out


def sum_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append(
            {"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]}
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# scoring and the model folder
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["seqcls", "scalar_head"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_score_reads_last_real_token_under_padding(kind, side):
    model = tiny_reward_model(kind).eval()
    seqs = [[5, 6, 7, 8, 9, PAD], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21], [22]]
    with torch.no_grad():
        alone = torch.cat([score(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        b = pad_collate([{"input_ids": s} for s in seqs], pad_token_id=PAD, padding_side=side)
        batched = score(model, b["input_ids"], b["attention_mask"])
    assert batched.shape == (4,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    # the comparison can fail: distinct sequences get distinct rewards, so a wrong position would show
    assert len({round(x, 6) for x in alone.tolist()}) == 4


def test_hf_pooling_misreads_a_final_eos_that_equals_pad_and_ours_does_not():
    """Why `score` uses the attention mask: HF's pad-id pooling skips a real final eos when pad == eos."""
    model = tiny_reward_model().eval()
    seqs = [[5, 6, 7, PAD], [8, 9]]
    b = pad_collate([{"input_ids": s} for s in seqs], pad_token_id=PAD)
    with torch.no_grad():
        ours = score(model, b["input_ids"], b["attention_mask"])
        hf = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.squeeze(-1)
        alone = score(model, torch.tensor([seqs[0]]), torch.ones(1, 4, dtype=torch.long))
    assert torch.allclose(ours[0], alone[0], atol=1e-5)
    assert not torch.allclose(hf[0], alone[0], atol=1e-3)
    assert torch.allclose(hf[1], ours[1], atol=1e-5)  # they agree where the last token is not the pad id


def test_last_token_index_and_empty_rows():
    m = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(m).tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


@pytest.mark.parametrize("kind", ["seqcls", "scalar_head"])
def test_save_and_load_roundtrip(tmp_path, kind):
    model = tiny_reward_model(kind, seed=3).eval()
    model.save_pretrained(tmp_path / "rm")
    TOK.save_pretrained(tmp_path / "rm")
    loaded, tok = load_reward_model(tmp_path / "rm")
    assert type(loaded) is type(model) and loaded.config.pad_token_id == PAD
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(score(loaded.eval(), ids, mask), score(model, ids, mask))
    if kind == "seqcls":  # a plain HF folder: transformers alone reads it
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        with torch.no_grad():
            torch.testing.assert_close(score(hf, ids, mask), score(model, ids, mask))


def test_reward_model_from_a_causal_lm_keeps_the_backbone(tmp_path):
    lm = build_tiny_model(tiny_config(pad_token_id=PAD), seed=1)
    lm.save_pretrained(tmp_path / "lm")
    TOK.save_pretrained(tmp_path / "lm")
    rm, _ = load_reward_model(tmp_path / "lm", seed=0)
    rm2, _ = load_reward_model(tmp_path / "lm", seed=0)
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    for k, v in lm.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[k], v), k
    assert torch.equal(rm.score.weight, rm2.score.weight)  # the fresh head is seeded: runs repeat
    assert rm.score.weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------------------------


def test_explicit_and_implicit_prompts_give_the_same_tokens():
    user = [{"role": "user", "content": "2+3"}]
    good, bad = [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "6"}]
    rows = [
        {"prompt": user, "chosen": good, "rejected": bad, "margin": 1.0},  # explicit, conversational
        {"chosen": user + good, "rejected": user + bad, "margin": 0.5},  # implicit, conversational
    ]
    pairs, dropped = tokenize_pairs(rows, TOK, chat_format="chatml", max_length=None)
    assert dropped == 0 and pairs[0]["chosen_ids"] == pairs[1]["chosen_ids"]
    assert pairs[0]["rejected_ids"] == pairs[1]["rejected_ids"] != pairs[0]["chosen_ids"]
    assert TOK.decode(pairs[0]["chosen_ids"]).endswith("<|im_start|>assistant\n5<|im_end|>\n")
    assert [p["margin"] for p in pairs] == [1.0, 0.5]
    plain = [{"prompt": "2+3=", "chosen": "5", "rejected": "6"}, {"chosen": "2+3=5", "rejected": "2+3=6"}]
    pairs, _ = tokenize_pairs(plain, TOK, chat_format="chatml", max_length=None)
    assert pairs[0] == pairs[1] and "margin" not in pairs[0]
    assert TOK.decode(pairs[0]["chosen_ids"]) == "2+3=5" + TOK.eos_token
    # max_length drops the whole pair (TRL's filter), it never truncates one side
    pairs, dropped = tokenize_pairs(plain, TOK, chat_format="chatml", max_length=5)
    assert pairs == [] and dropped == 2


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"prompt": "a", "chosen": "b"}, "row 1, field 'rejected'"),
        ({"chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}, "row 1, field 'chosen/rejected'"),
        ({"prompt": "a", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "d"}, "row 1, field"),
    ],
)
def test_bad_rows_name_row_and_field(row, needle):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(RowError, match=None) as e:
        tokenize_pairs([good, row], TOK, chat_format="chatml", max_length=None)
    assert needle in str(e.value)


def test_partial_margin_column_is_an_error_unless_unused():
    rows = [{"chosen": "a", "rejected": "b", "margin": 1.0}, {"chosen": "c", "rejected": "d"}]
    with pytest.raises(RowError, match="row 1, field 'margin'"):
        tokenize_pairs(rows, TOK, chat_format="chatml", max_length=None)
    pairs, _ = tokenize_pairs(rows, TOK, chat_format="chatml", max_length=None, use_margin=False)
    assert all("margin" not in p for p in pairs)


# ---------------------------------------------------------------------------------------------------------------------
# learning on the demo task
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_model_learns_to_prefer_right_answers(demo_run, tmp_path):
    """From the SFT'd demo model: held-out pairwise accuracy goes from chance to >= 0.85 (0.915 when written)."""
    d = DemoConfig()
    eval_rows = make_rows(d.eval_size, d.digits, seed=d.seed + 1)  # the demo's own held-out problems
    held_out = {tuple(r["pair"]) for r in eval_rows}
    train = wrong_answer_pairs(make_rows(800, d.digits, seed=7, exclude=held_out), seed=0)
    evals = wrong_answer_pairs(eval_rows, seed=1)

    model, tok = load_reward_model(demo_run["checkpoint"], seed=0)
    cfg = RewardConfig(
        output_dir=str(tmp_path / "rm"),
        chat_format="chatml",
        batch_size=32,
        lr=1e-3,
        warmup_steps=5,
        schedule="cosine",
        epochs=2,
        eval_every=25,
        progress=False,
    )
    ev_pairs, _ = tokenize_pairs(evals, tok, chat_format="chatml", max_length=None)
    before = evaluate(model, ev_pairs, cfg, tok.pad_token_id)
    out = train_reward(cfg, model=model, tokenizer=tok, train_data=train, eval_data=evals)
    records = read_metrics(tmp_path / "rm")
    after = records[-1]
    assert after["step"] == out["steps"] >= 40
    keys = {"step", "loss", "lr", "grad_norm", "accuracy", "margin", "rewards/chosen", "rewards/rejected"}
    assert keys <= set(records[0]) and "eval_accuracy" in after
    assert abs(before["eval_accuracy"] - 0.5) < 0.2, before
    assert after["eval_accuracy"] >= 0.85, (before, after)
    assert after["eval_margin"] > before["eval_margin"] + 1.0
    # the saved checkpoint is the trained model: reloading reproduces the final evaluation
    reloaded, _ = load_reward_model(tmp_path / "rm" / f"checkpoint-{out['steps']}")
    again = evaluate(reloaded, ev_pairs, cfg, tok.pad_token_id)
    assert abs(again["eval_accuracy"] - after["eval_accuracy"]) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# exact resume and the CLI
# ---------------------------------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def _resume_run(run_dir, *, resume: bool, crash_at: int | None = None) -> None:
    rows = wrong_answer_pairs(sum_rows(96, seed=0), seed=0)
    for i, r in enumerate(rows):
        r["margin"] = (i % 3) * 0.5  # the margin column travels through the plan and the checkpoint

    def crash(step: int, record: dict) -> None:
        if step == crash_at:
            raise Crash

    cfg = RewardConfig(
        output_dir=str(run_dir),
        chat_format="chatml",
        batch_size=8,
        grad_accum=2,
        max_steps=6,
        save_every=2,
        lr=3e-3,
        warmup_steps=2,
        weight_decay=0.01,
        center_coef=0.01,
        progress=False,
        resume=resume,
    )
    train_reward(cfg, model=tiny_reward_model(), tokenizer=TOK, train_data=rows, callbacks=[crash])


def test_crash_then_resume_is_exact(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _resume_run(straight, resume=False)
    with pytest.raises(Crash):
        _resume_run(crashed, resume=False, crash_at=5)
    assert (crashed / "latest").read_text().strip() == "checkpoint-4"
    _resume_run(crashed, resume=True)  # a fresh model object: everything comes from checkpoint-4

    a, b = read_metrics(straight), read_metrics(crashed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("loss", "accuracy", "margin", "grad_norm", "lr"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    wa = load_file(straight / "checkpoint-6" / "model.safetensors")
    wb = load_file(crashed / "checkpoint-6" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w4 = load_file(crashed / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(w4[k], wb[k]) for k in wb)  # training moved the weights: not vacuous


def test_cli_reports_config_errors(capsys):
    assert main(["reward", "learning_rat=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "unknown RewardConfig key 'learning_rat'" in err
    assert main(["reward", "center_coef=lots"]) == 2
    assert "RewardConfig.center_coef" in capsys.readouterr().err


def test_cli_trains_from_a_causal_lm_folder(tmp_path):
    build_tiny_model(tiny_config(pad_token_id=PAD), seed=0).save_pretrained(tmp_path / "lm")
    TOK.save_pretrained(tmp_path / "lm")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in wrong_answer_pairs(sum_rows(16, seed=0), seed=0)))
    out = tmp_path / "run"
    args = [f"model={tmp_path / 'lm'}", f"dataset={data}", f"output_dir={out}", "batch_size=4", "progress=false"]
    assert main(["reward", *args, "chat_format=chatml"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    rm = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint-4")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == PAD
