"""The KTO / BCO loop: z0 per step, exact accumulation, BCO state across checkpoints, automatic unpairing, learning."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.data.preference import collate_unpaired, tokenize_unpaired
from alignkit.loops.common import read_metrics
from alignkit.loops.kto import KTOConfig, kl_reference_point, train_kto
from alignkit.models import build_tiny_model, tiny_llama_config
from alignkit.reference import ModelReference, Scorer, batch_sequence_logps

TOK = byte_tokenizer()
CONFIG = tiny_llama_config(len(TOK), hidden=16, layers=1, heads=2, kv_heads=2)
U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
PAIRED = [
    {"prompt": [U(f"{a}+{a}")], "chosen": [A(str(2 * a))], "rejected": [A(str(2 * a + 1) * (1 + a % 3))]}
    for a in range(8)
]


def _cfg(tmp_path, name: str, **kw) -> KTOConfig:
    base = dict(
        output_dir=str(tmp_path / name),
        chat_format="chatml",
        batch_size=8,
        max_steps=2,
        lr=1e-2,
        reference_cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    return KTOConfig(**{**base, **kw})


def _run(tmp_path, name: str, rows=PAIRED, **kw):
    model = build_tiny_model(CONFIG, seed=0)
    summary = train_kto(_cfg(tmp_path, name, **kw), model=model, tokenizer=TOK, train_data=rows)
    return model, read_metrics(tmp_path / name), summary


def test_paired_data_is_unpaired_and_first_step_is_at_the_reference(tmp_path):
    _, recs, summary = _run(tmp_path, "kto", max_steps=3)
    assert "8 rows -> 16 examples" in summary["report"]
    first = recs[0]
    # policy == reference at step 1: h = 0 and z0 = 0, so every term is λ/2
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)
    assert first["n_desirable"] + first["n_undesirable"] == first["num_examples"] == 8
    keys = {"loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "num_tokens"}
    assert keys <= set(first)
    assert recs[-1]["rewards/margins"] > first["rewards/margins"]
    # weights scale the two sides
    _, weighted, _ = _run(tmp_path, "w", max_steps=1, desirable_weight=2.0, undesirable_weight=1.0)
    n_d, n_u = weighted[0]["n_desirable"], weighted[0]["n_undesirable"]
    assert weighted[0]["loss"] == pytest.approx((2.0 * 0.5 * n_d + 0.5 * n_u) / 8, abs=1e-5)


def test_reference_point_is_the_clamped_mean_over_mismatched_sequences():
    examples, _ = tokenize_unpaired(TOK, PAIRED, chat_format="chatml")
    policy, other = build_tiny_model(CONFIG, seed=0), build_tiny_model(CONFIG, seed=1)
    cfg = KTOConfig(chat_format="chatml")
    micro = [examples[:5], examples[5:12]]

    @torch.no_grad()
    def manual(p, r) -> float:
        kb = collate_unpaired(examples[:12], pad_token_id=TOK.pad_token_id, kl=True)
        diff = batch_sequence_logps(p, kb)["sum"] - batch_sequence_logps(r, kb)["sum"]
        return max(0.0, float(diff.mean()))

    values = []
    for p, r in ((policy, other), (other, policy)):
        z0 = kl_reference_point(p, micro, cfg, ModelReference(r, Scorer()), TOK.pad_token_id)
        assert float(z0) == pytest.approx(manual(p, r), abs=1e-4)
        values.append(float(z0))
    assert max(values) > 0.0 and min(values) == 0.0  # one direction is positive, the other clamped


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
def test_accumulated_micro_batches_equal_one_batch(tmp_path, loss):
    """z0 and the normaliser are per step: 2 micro-batches of 4 == 1 batch of 8, exactly."""
    m1, r1, _ = _run(tmp_path, "one", batch_size=8, grad_accum=1, loss=loss)
    m2, r2, _ = _run(tmp_path, "two", batch_size=4, grad_accum=2, loss=loss)
    for a, b in zip(r1, r2):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=2e-6)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)


def test_bco_state_is_carried_and_checkpointed(tmp_path):
    _, straight, s1 = _run(tmp_path, "straight", loss="bco", max_steps=4, epochs=2)
    assert s1["bco_state"]["count"] == 32.0  # every example of 4 steps of 8 folded into the running mean
    assert straight[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # r = δ = 0 at step 1: log 2
    deltas = [r["delta"] for r in straight]
    assert len(set(round(d, 7) for d in deltas)) == 4  # the running mean moves every step

    # 2 steps, then a new process-like run resuming from the checkpoint: same losses and the same final state
    model = build_tiny_model(CONFIG, seed=0)
    cfg = _cfg(tmp_path, "split", loss="bco", max_steps=4, epochs=2, save_every=2)
    stop = _Stop(at=2)
    with pytest.raises(_Stopped):
        train_kto(cfg, model=model, tokenizer=TOK, train_data=PAIRED, callbacks=[stop])
    cfg.resume = True
    s2 = train_kto(cfg, model=build_tiny_model(CONFIG, seed=0), tokenizer=TOK, train_data=PAIRED)
    resumed = read_metrics(tmp_path / "split")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["delta"] == pytest.approx(b["delta"], abs=1e-7)
    assert s2["bco_state"] == pytest.approx(s1["bco_state"])


class _Stopped(Exception):
    pass


class _Stop:
    """A callback that aborts training right after the checkpoint of step `at` (a crash without cleanup)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, step: int, record: dict) -> None:
        if step == self.at:
            raise _Stopped
