"""The SFT loop end to end: CLI on local files, gradient accumulation exactness, LoRA, eval, TensorBoard."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.cli import main
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.demo import make_rows
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config


def _model(tok, seed=0):
    return build_tiny_model(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2), seed=seed)


def _rows(n=64):
    return [{"messages": r["messages"]} for r in make_rows(n, 2, seed=0)]


def test_cli_on_local_model_and_jsonl(tmp_path, capsys):
    tok = byte_tokenizer()
    model_dir = tmp_path / "model"
    _model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {model_dir}\ndataset: {data}\nchat_format: chatml\nmax_steps: 4\nbatch_size: 8\n")
    out = tmp_path / "run"
    rc = main(
        [
            "sft",
            "--config",
            str(cfg),
            f"output_dir={out}",
            "eval_dataset=" + str(data),
            "eval_every=2",
            "lr=1e-3",
            "progress=false",
            "report_to=[tensorboard]",
            "packing=false",
        ]
    )
    assert rc == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["num_trained_tokens"] > 0 and r["num_tokens"] > r["num_trained_tokens"] for r in records)
    assert "eval_loss" in records[1] and "eval_loss" in records[3]
    assert any((out / "tensorboard").iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "timing/step_time_s"} <= scalars, scalars
    assert not {t for t in scalars if "/" not in t}  # every tag grouped
    assert any("config" in t for t in events.Tags()["tensors"])  # the run's config as a text table
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[alignkit] step ")]
    assert lines[0].startswith("[alignkit] step 1/4 loss=") and len(lines) == 4  # no bar: one line per step
    assert (out / "latest").read_text().strip() == "checkpoint-4"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    assert main(["plot", str(out)]) == 0 and (out / "curves.png").exists()


def _one_step(tmp_path, tok, rows, name, **kw):
    model = _model(tok)
    cfg = SFTConfig(
        output_dir=str(tmp_path / name),
        chat_format="chatml",
        max_steps=1,
        lr=1e-2,
        progress=False,
        max_grad_norm=None,
        max_length=512,
        **kw,
    )
    out = train_sft(cfg, model=model, tokenizer=tok, train_data=rows)
    return out["last"], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a[0]["num_trained_tokens"] == b[0]["num_trained_tokens"]
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-5
    # grad_norm is taken before the optimizer step: equal norms = equal accumulated gradients' scale
    assert abs(a[0]["grad_norm"] - b[0]["grad_norm"]) <= 1e-5 * a[0]["grad_norm"]
    # Adam's first step is ~lr·sign(g): coordinates with |g| near eps may differ by rounding, nothing more
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=1e-4, rtol=1e-4)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    """Micro-batches with the step's global token count as normaliser == one big batch (same data, one step)."""
    tok, rows = byte_tokenizer(), _rows(16)
    full = _one_step(tmp_path, tok, rows, "full", batch_size=16, grad_accum=1, packing=False)
    accum = _one_step(tmp_path, tok, rows, "accum", batch_size=4, grad_accum=4, packing=False)
    _assert_same(full, accum)


def test_packed_accumulation_equals_one_bin(tmp_path):
    """All 16 rows in one packed bin vs spread over several accumulated bins: same loss and update."""
    from alignkit.data.plan import plan_batches
    from alignkit.data.tokenize import tokenize_rows

    tok, rows = byte_tokenizer(), _rows(16)
    ex, _ = tokenize_rows(tok, rows, chat_format="chatml")
    n_bins = len(plan_batches([len(e["input_ids"]) for e in ex], seed=0, epochs=1, grad_accum=1, pack_tokens=100))
    assert n_bins > 2
    one = _one_step(tmp_path, tok, rows, "one", packing=True, pack_tokens=10_000, grad_accum=1)
    many = _one_step(tmp_path, tok, rows, "many", packing=True, pack_tokens=100, grad_accum=n_bins)
    _assert_same(one, many)


def test_lora_trains_adapter_only(tmp_path):
    pytest.importorskip("peft")
    tok = byte_tokenizer()
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SFTConfig(
        output_dir=str(tmp_path),
        chat_format="chatml",
        max_steps=5,
        batch_size=8,
        lr=1e-2,
        progress=False,
        lora_r=4,
        lora_targets=["q_proj", "v_proj"],
        packing=False,
        epochs=5,
    )
    out = train_sft(cfg, model=model, tokenizer=tok, train_data=_rows())
    records = read_metrics(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "checkpoint-5" / "adapter_model.safetensors").is_file()
    for k, v in model.state_dict().items():  # base weights untouched (peft wraps the same tensors)
        if "lora_" not in k and k.replace("base_model.model.", "").replace(".base_layer", "") in before:
            assert torch.equal(v, before[k.replace("base_model.model.", "").replace(".base_layer", "")]), k
    assert out["steps"] == 5
