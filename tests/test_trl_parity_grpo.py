"""Parity with TRL 1.16 ``GRPOTrainer._compute_loss`` for every ``loss_type``.

TRL's own method runs, bound to a minimal stand-in ``self`` whose model forward is stubbed to return fixed
per-token log-probs and entropies; alignkit's ``pg_loss`` gets the same tensors. Values and gradients (w.r.t.
the log-probs and the entropies) must match. Single process, no gradient accumulation, training mode.

Mapping (TRL ``loss_type`` -> alignkit ``kind`` / ``agg`` / ``normalizer``; TRL's level flag -> ``level``):

==========  ==========  ===================  ====================================================================
TRL         kind        agg                  normalizer (W ranks, GA accumulation steps)
==========  ==========  ===================  ====================================================================
grpo        ppo_clip    seq_mean_token_mean  local B · GA  (TRL averages local rows, then ÷GA)
bnpo        ppo_clip    token_mean           "local" token count · GA
dr_grpo     ppo_clip    token_sum_constant   B · max_completion_length · GA
dapo        ppo_clip    token_mean           num_items_in_batch / W · GA / steps_per_generation
cispo       cispo       token_mean           as dapo; ratio_high = epsilon_high (absolute), ratio_low None
sapo        sapo        seq_mean_token_mean  as grpo; sapo_tau_pos/neg = sapo_temperature_pos/neg
luspo       ppo_clip    seq_mean_token_sum   as grpo (B · GA); TRL pairs it with level="sequence"
vespo       vespo       token_mean           as dapo; IS weights fold into φ's sequence ratio
==========  ==========  ===================  ====================================================================

Other knobs: ``(ratio_low, ratio_high) = ratio_bounds_from_eps(epsilon, epsilon_high)``; ``delta`` ->
``dual_clip``; ``beta`` -> ``kl_coef`` with k3 and ``kl_is_weight = use_bias_correction_kl``;
``importance_sampling_ratio`` -> ``is_weights``; ``off_policy_mask_threshold`` -> ``off_policy_seq_mask``;
``top_entropy_quantile`` q -> ``high_entropy_mask`` at the (1−q) quantile; ``entropy_coef`` -> ``entropy_coef``
with ``entropy_normalizer="local"``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from alignkit.losses.policy import (  # noqa: E402
    high_entropy_mask,
    off_policy_seq_mask,
    pg_loss,
    ratio_bounds_from_eps,
    rollout_is_weights,
)

pytestmark = pytest.mark.trl

B, T, P, MAX_LEN = 6, 7, 2, 9

MAPPING: dict[str, tuple[str, str]] = {
    "grpo": ("ppo_clip", "seq_mean_token_mean"),
    "bnpo": ("ppo_clip", "token_mean"),
    "dr_grpo": ("ppo_clip", "token_sum_constant"),
    "dapo": ("ppo_clip", "token_mean"),
    "cispo": ("cispo", "token_mean"),
    "sapo": ("sapo", "seq_mean_token_mean"),
    "luspo": ("ppo_clip", "seq_mean_token_sum"),
    "vespo": ("vespo", "token_mean"),
}


def _normalizer(loss_type: str, m: torch.Tensor) -> float | str:
    if loss_type in ("grpo", "sapo", "luspo"):
        return float(B)
    if loss_type == "bnpo":
        return "local"
    if loss_type == "dr_grpo":
        return float(B * MAX_LEN)
    return float(m.sum())  # num_items_in_batch of this (only) rank and step


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 5, 1, 3, 0, 6])  # an empty row: TRL still counts it in its row means
    m = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    logp = -(torch.rand(B, T, generator=g) * 2.5 + 0.05)
    return SimpleNamespace(
        logp=logp,
        old=logp + 0.35 * torch.randn(B, T, generator=g),
        ref=logp + 0.3 * torch.randn(B, T, generator=g),
        sampling=logp + 0.3 * torch.randn(B, T, generator=g),
        A=torch.tensor([1.3, -0.7, 0.4, -1.6, 0.9, -0.2]),
        H=torch.rand(B, T, generator=g) * 2,
        m=m,
    )


class _Accelerator:
    """Single-process stand-in for the accelerate calls ``_compute_loss`` makes."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x


def _trl(loss_type: str, logp: torch.Tensor, H: torch.Tensor, inputs: dict, cfg: dict):
    args = SimpleNamespace(
        delta=cfg.get("delta"),
        use_bias_correction_kl=cfg.get("use_bias_correction_kl", True),
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        steps_per_generation=1,
    )
    eps = cfg.get("epsilon", 0.2)
    stub = SimpleNamespace(
        args=args,
        loss_type=loss_type,
        beta=cfg.get("beta", 0.0),
        epsilon_low=eps,
        epsilon_high=cfg.get("epsilon_high") if cfg.get("epsilon_high") is not None else eps,
        importance_sampling_level=cfg.get("level", "token"),
        off_policy_mask_threshold=cfg.get("opsm"),
        top_entropy_quantile=cfg.get("top_entropy_quantile", 1.0),
        use_vllm="importance_sampling_ratio" in inputs,
        vllm_importance_sampling_correction="importance_sampling_ratio" in inputs,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN,
        accelerator=_Accelerator(),
        entropy_coef=cfg.get("entropy_coef", 0.0),
        _entropy_bonus_enabled=cfg.get("entropy_coef", 0.0) != 0.0,
        use_adaptive_entropy=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    stub.get_high_entropy_mask = MethodType(GRPOTrainer.get_high_entropy_mask, stub)
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logp, H, None)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


def _run_both(loss_type: str, cfg: dict, seed: int = 0):
    b = _batch(seed)
    inputs = {
        "prompt_ids": torch.zeros(B, P, dtype=torch.long),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": b.m,
        "advantages": b.A,
        "num_items_in_batch": b.m.sum(),
    }
    if not cfg.get("on_policy"):
        inputs["old_per_token_logps"] = b.old
    if cfg.get("beta"):
        inputs["ref_per_token_logps"] = b.ref
    if cfg.get("opsm") is not None:
        inputs["sampling_per_token_logps"] = b.sampling
    is_w = None
    if cfg.get("is_mode"):
        level, mode = cfg["is_mode"]
        is_w, _ = rollout_is_weights(b.old, b.sampling, b.m, level=level, mode=mode, is_low=0.5, is_high=2.0)
        # TRL's ratio is exp(0)=1 on padding (then masked by the loss); ours is 0 there: both are ignored
        inputs["importance_sampling_ratio"] = torch.where(b.m.bool(), is_w, 1.0)

    # TRL
    logp_t, H_t = b.logp.clone().requires_grad_(), b.H.clone().requires_grad_()
    loss_t, metrics_t = _trl(loss_type, logp_t, H_t, inputs, cfg)
    g_t = torch.autograd.grad(loss_t, [logp_t, H_t], allow_unused=True)

    # alignkit
    kind, agg = MAPPING[loss_type]
    mb = b.m.bool()
    lo, hi = ratio_bounds_from_eps(cfg.get("epsilon", 0.2), cfg.get("epsilon_high"))
    if kind == "cispo":
        lo, hi = None, cfg.get("epsilon_high") or cfg.get("epsilon", 0.2)
    logp_a, H_a = b.logp.clone().requires_grad_(), b.H.clone().requires_grad_()
    old = None if cfg.get("on_policy") else b.old
    emask = opsm = None
    if cfg.get("top_entropy_quantile", 1.0) < 1.0:
        thr = torch.quantile(b.H[mb], 1.0 - cfg["top_entropy_quantile"])
        emask = high_entropy_mask(H_a.detach(), mb, thr)
    if cfg.get("opsm") is not None:
        behaviour = b.sampling
        opsm, _ = off_policy_seq_mask(b.A, logp_a, behaviour, mb, threshold=cfg["opsm"])
    loss_a, metrics_a = pg_loss(
        logp_a,
        old,
        b.A,
        mb,
        kind=kind,
        level=cfg.get("level", "token"),
        agg=agg,
        normalizer=_normalizer(loss_type, b.m),
        ratio_low=lo,
        ratio_high=hi,
        dual_clip=cfg.get("delta"),
        ref_logp=b.ref if cfg.get("beta") else None,
        kl_coef=cfg.get("beta", 0.0),
        kl_is_weight=cfg.get("use_bias_correction_kl", True),
        is_weights=is_w,
        opsm_mask=opsm,
        entropy=H_a,
        entropy_mask=emask,
        entropy_coef=cfg.get("entropy_coef", 0.0),
        entropy_normalizer="local",
    )
    g_a = torch.autograd.grad(loss_a, [logp_a, H_a], allow_unused=True)
    return (loss_t, g_t, metrics_t), (loss_a, g_a, metrics_a)


CONFIGS = {
    "plain": {},
    "clip_higher": {"epsilon_high": 0.28},
    "kl": {"beta": 0.04},
    "kl_no_bias_correction": {"beta": 0.04, "use_bias_correction_kl": False},
    "sequence_level": {"level": "sequence", "beta": 0.04},
    "on_policy": {"on_policy": True, "beta": 0.1},
    "delta": {"delta": 1.3},
    "entropy": {"entropy_coef": 0.05, "top_entropy_quantile": 0.5},
    "opsm": {"opsm": 0.02},
    "is_token_truncate": {"is_mode": ("token", "truncate")},
    "is_token_mask": {"is_mode": ("token", "mask")},
    "is_sequence_mask": {"is_mode": ("sequence", "mask"), "beta": 0.04},
    "everything": {"beta": 0.04, "entropy_coef": 0.02, "top_entropy_quantile": 0.6, "opsm": 0.0, "delta": 1.5},
}

_ONLY_PPO = {"delta"}  # TRL applies delta to the clipped family only
_NOT_VESPO = {"is_sequence_mask"}  # TRL rejects sequence-level IS modes with vespo


def _cases():
    for loss_type in MAPPING:
        for name, cfg in CONFIGS.items():
            if name in _ONLY_PPO and MAPPING[loss_type][0] != "ppo_clip":
                continue
            if name in _NOT_VESPO and loss_type == "vespo":
                continue
            if loss_type == "cispo":
                cfg = {**cfg, "epsilon_high": 5.0 if name != "clip_higher" else 1.1}
            if name == "everything" and MAPPING[loss_type][0] != "ppo_clip":
                cfg = {k: v for k, v in cfg.items() if k != "delta"}
            yield pytest.param(loss_type, cfg, id=f"{loss_type}-{name}")


@pytest.mark.parametrize(("loss_type", "cfg"), list(_cases()))
def test_loss_and_grads_match_trl(loss_type, cfg):
    (loss_t, g_t, _), (loss_a, g_a, _) = _run_both(loss_type, cfg)
    assert torch.isfinite(loss_a)
    torch.testing.assert_close(loss_a, loss_t.detach(), atol=1e-5, rtol=1e-4)
    for a, t in zip(g_a, g_t):
        if t is None:  # no entropy bonus: TRL's loss does not depend on H
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(g_a[0]) > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_clip_metrics_match_trl(loss_type):
    cfg = {"beta": 0.04, "use_bias_correction_kl": False, "epsilon_high": 5.0 if loss_type == "cispo" else 0.28}
    (_, _, mt), (_, _, ma) = _run_both(loss_type, cfg)
    if loss_type == "cispo":
        assert ma["clip_ratio/high_mean"].tolist() == pytest.approx(mt["cispo_clip_ratio"][0], abs=1e-6)
    else:
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):  # TRL's names
            assert ma[name].tolist() == pytest.approx(mt[name][0], abs=1e-6)
        assert mt["clip_ratio/region_mean"][0] > 0  # the batch does exercise the clip
    assert ma["kl"].tolist() == pytest.approx(mt["kl"][0], rel=1e-4, abs=1e-6)
    assert ma["entropy"].tolist() == pytest.approx(mt["entropy"][0], rel=1e-4, abs=1e-6)


def test_off_policy_mask_matches_trl():
    b = _batch(3)
    for thr in (-0.05, 0.0, 0.05):
        sampling = b.sampling.clone()
        sampling[0, 1] = float("nan")
        theirs = GRPOTrainer.get_off_policy_mask(b.A.unsqueeze(1), b.logp, sampling, b.m.float(), thr)
        ours, _ = off_policy_seq_mask(b.A, b.logp, sampling, b.m, threshold=thr)
        assert torch.equal(ours[:, 0], theirs[:, 0].bool())


def test_high_entropy_mask_matches_trl():
    b = _batch(4)
    stub = SimpleNamespace(accelerator=_Accelerator())
    for q in (0.2, 0.5, 0.9):
        theirs = GRPOTrainer.get_high_entropy_mask(stub, b.H, b.m, 1.0 - q)
        ours = high_entropy_mask(b.H, b.m, torch.quantile(b.H[b.m.bool()], 1.0 - q))
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("trl_mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_rollout_is_weights_match_trl_formula(trl_mode, clip_min):
    """TRL computes these inline in ``_generate_and_score_completions``; its arithmetic, transcribed."""
    b = _batch(5)
    clip_max = 2.0
    sampling = b.sampling.clone()
    sampling[1, 0] = float("nan")
    mask = b.m
    diff = torch.nan_to_num((b.old - sampling) * mask, nan=0.0)
    level = trl_mode.split("_")[0]
    if level == "sequence":
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if trl_mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = -math.inf if clip_min is None else clip_min
        ratio = ratio.masked_fill((ratio < lo) | (ratio > clip_max), 0.0)
    theirs = ratio.expand(B, T) * mask
    mode = "truncate" if trl_mode.endswith("truncate") else "mask"
    ours, _ = rollout_is_weights(b.old, sampling, mask, level=level, mode=mode, is_low=clip_min, is_high=clip_max)
    torch.testing.assert_close(ours, theirs.float())
