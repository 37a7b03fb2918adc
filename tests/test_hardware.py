"""Device placement, precision, activation checkpointing and packing kernels: what a CPU can show, plus the
`gpu` tests (skipped, saying why, without CUDA; `benchmarks/gpu_check.sh` runs them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from alignkit import hardware
from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.collate import pack_collate, packed_forward_kwargs, pad_collate
from alignkit.demo import make_rows
from alignkit.loops.sft import SFTConfig, train_sft
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.scoring import model_token_logps

TOK = byte_tokenizer()
ROWS = [{"messages": r["messages"]} for r in make_rows(128, 2, seed=0)]
CUDA = torch.cuda.is_available()
_needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (run by benchmarks/gpu_check.sh on a GPU machine)")


def gpu(test):  # noqa: ANN001, ANN201
    """The `gpu` marker (what `pytest -m gpu` selects) and a skip that says why without CUDA."""
    return pytest.mark.gpu(_needs_cuda(test))


def _model(seed: int = 0, **kw) -> torch.nn.Module:
    return build_tiny_model(tiny_llama_config(len(TOK), hidden=32, layers=2, heads=2, kv_heads=2), seed=seed, **kw)


def _sft(out, **kw) -> list[dict]:
    cfg = SFTConfig(output_dir=str(out), chat_format="chatml", max_steps=12, batch_size=16, packing=False, lr=3e-3,
                    progress=False, epochs=4, save_every=None, **kw)  # fmt: skip
    train_sft(cfg, model=_model(), tokenizer=TOK, train_data=ROWS)
    return read_metrics(out)


# ---------------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_device():
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    assert hardware.resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            hardware.resolve_device("cuda:0")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_every_loop_runs_with_an_explicit_and_an_automatic_device(tmp_path, device):
    """SFT, DPO, KTO, reward, PRM and GRPO each take a step with device=cpu and device=auto (CPU here)."""
    from alignkit.loops.dpo import DPOConfig, train_dpo
    from alignkit.loops.grpo import GRPOConfig, train_grpo
    from alignkit.loops.kto import KTOConfig, train_kto
    from alignkit.loops.prm import PRMConfig, train_prm
    from alignkit.loops.reward_model import RewardConfig, train_reward
    from alignkit.reward_model import ScalarHeadModel
    from tests.conftest import preference_rows

    common = dict(device=device, max_steps=1, progress=False, batch_size=4)
    pairs = preference_rows(8)
    want = hardware.resolve_device(device)
    m = _model()
    train_sft(SFTConfig(output_dir=str(tmp_path / "sft"), chat_format="chatml", **common), model=m, tokenizer=TOK,
              train_data=ROWS[:8])  # fmt: skip
    assert next(m.parameters()).device == want
    train_dpo(DPOConfig(output_dir=str(tmp_path / "dpo"), chat_format="chatml", reference_cache_dir=str(tmp_path),
                        **common), model=_model(), tokenizer=TOK, train_data=pairs)  # fmt: skip
    train_kto(KTOConfig(output_dir=str(tmp_path / "kto"), chat_format="chatml", reference_cache_dir=str(tmp_path),
                        **common), model=_model(), tokenizer=TOK, train_data=pairs)  # fmt: skip
    from transformers import AutoModel

    rm = ScalarHeadModel(AutoModel.from_config(_model().config), 32)
    train_reward(RewardConfig(output_dir=str(tmp_path / "rm"), chat_format="chatml", **common), model=rm,
                 tokenizer=TOK, train_data=pairs)  # fmt: skip
    prm_rows = [{"prompt": "1<2?", "completions": ["1<2", "so yes"], "labels": [True, True]}] * 4
    from transformers import AutoModelForTokenClassification

    prm_cfg = _model().config
    prm_cfg.num_labels = 2
    prm = AutoModelForTokenClassification.from_config(prm_cfg)
    train_prm(PRMConfig(output_dir=str(tmp_path / "prm"), **common), model=prm, tokenizer=TOK, train_data=prm_rows)
    rows = [{"prompt": [{"role": "user", "content": f"2*{a}"}], "answer": str(2 * a)} for a in range(4)]
    g = GRPOConfig(output_dir=str(tmp_path / "grpo"), chat_format="chatml", group_size=2, prompts_per_step=2,
                   max_new_tokens=4, micro_batch_size=4, device=device, max_steps=1, progress=False)  # fmt: skip
    train_grpo(g, model=_model(), tokenizer=TOK, train_data=rows, reward_funcs=[lambda p, c, ids, **k: [1.0] * len(c)])
    for name in ("sft", "dpo", "kto", "rm", "prm", "grpo"):
        assert read_metrics(tmp_path / name)[-1]["step"] == 1, name


# ---------------------------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_training_learns_and_tracks_fp32(tmp_path, precision):
    ref = _sft(tmp_path / "fp32")
    low = _sft(tmp_path / precision, precision=precision)
    a, b = [r["loss"] for r in ref], [r["loss"] for r in low]
    assert b[-1] < b[0] - 0.5, b  # it learns
    # bf16 rounds activations (bf16-mixed) or weights (bf16): the curves agree within a few percent
    for x, y in zip(a, b):
        assert abs(x - y) <= 0.05 * abs(x) + 0.02, (a, b)


def test_bf16_keeps_fp32_master_weights_and_resumes_them_exactly(tmp_path):
    out = tmp_path / "run"
    model = _model()
    cfg = SFTConfig(output_dir=str(out), chat_format="chatml", max_steps=3, batch_size=16, packing=False, lr=1e-4,
                    progress=False, precision="bf16", save_every=1)  # fmt: skip
    train_sft(cfg, model=model, tokenizer=TOK, train_data=ROWS)
    assert next(model.parameters()).dtype == torch.bfloat16
    from alignkit.checkpoint import latest_checkpoint, read_state

    state = read_state(latest_checkpoint(out))
    masters = state["master"]["master"]
    assert all(t.dtype == torch.float32 for t in masters)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # lr 1e-4 updates are below bf16's resolution for many weights: the fp32 masters keep them
    assert any(not torch.equal(m.to(torch.bfloat16).float(), m) for m in masters)
    assert all(torch.equal(m.to(torch.bfloat16), p.detach()) for m, p in zip(masters, trainable))
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["optimizer"]["state"].values())


def test_the_log_prob_kernel_stays_fp32_under_autocast():
    torch.manual_seed(0)
    h, w = torch.randn(6, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (6,))
    from alignkit.logprobs import chunked_token_logps

    plain = chunked_token_logps(h, w, t)["logps"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = chunked_token_logps(h, w, t)["logps"]
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)  # bf16 tiles would be off by ~1e-2


# ---------------------------------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    ex = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (9, 5, 12)]
    b = pad_collate(ex, pad_token_id=0)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        m = _model()
        m.train()
        if checkpointing:
            hardware.apply_activation_checkpointing(m)
        out = model_token_logps(m, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
        out["logps"].sum().backward()
        return [p.grad for p in m.parameters()]

    for a, c in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_sft_with_gradient_checkpointing_matches_without(tmp_path):
    a = _sft(tmp_path / "plain")
    b = _sft(tmp_path / "ckpt", gradient_checkpointing=True)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# packing through the torch-native kernel (flex attention: forward on CPU, forward + backward on GPU)
# ---------------------------------------------------------------------------------------------------------------


def _packed_vs_unpacked(model: torch.nn.Module, device: str) -> float:
    ex = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 4, 9)]
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v
          for k, v in packed_forward_kwargs(pack_collate(ex), "flex_attention").items()}  # fmt: skip
    packed = model(**kw).logits[0]
    alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]], device=device)).logits[0] for e in ex])
    return float((packed - alone).abs().max())


def test_flex_attention_packing_equals_unpacked_on_cpu():
    model = _model(attn_implementation="flex_attention").eval()
    with torch.no_grad():
        assert _packed_vs_unpacked(model, "cpu") < 1e-5
    sdpa = _model(attn_implementation="sdpa").eval()  # a packing that ignored documents would differ
    with torch.no_grad():
        kw = packed_forward_kwargs(pack_collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 2), "sdpa")
        kw["position_ids"] = torch.arange(6)[None]  # one long document instead of two
        crossed = sdpa(**kw).logits[0, 3:]
        alone = sdpa(input_ids=torch.tensor([[5, 6, 7]])).logits[0]
    assert float((crossed - alone).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------------


@gpu
def test_gpu_every_loop_places_model_and_batches_on_cuda(tmp_path):
    test_every_loop_runs_with_an_explicit_and_an_automatic_device(tmp_path, "auto")


@gpu
def test_gpu_flex_attention_packing_forward_and_backward():
    model = _model(attn_implementation="flex_attention").cuda().train()
    assert _packed_vs_unpacked(model, "cuda") < 1e-4
    ex = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 4, 9)]
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v
          for k, v in packed_forward_kwargs(pack_collate(ex), "flex_attention").items()}  # fmt: skip
    model(**kw).logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@gpu
def test_gpu_chunked_logps_match_naive():
    from alignkit.logprobs import chunked_token_logps

    torch.manual_seed(0)
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(5000, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 5000, (300,), device="cuda")
    got = chunked_token_logps(h, w, t, token_chunk=128, vocab_chunk=1024)["logps"]
    want = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    g1 = torch.autograd.grad(got.sum(), (h, w))
    g2 = torch.autograd.grad(want.sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_gpu_bf16_learning(tmp_path, precision):
    recs = _sft(tmp_path / precision, precision=precision, device="cuda")
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    assert "mem_peak_allocated_gb" in recs[-1] and recs[-1]["tokens_per_s"] > 0
