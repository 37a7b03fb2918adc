"""The online RL loop shared by GRPO and RLOO (they differ in the advantage estimator and the defaults).

One generation round, top to bottom:

    prompts -> Generator (G completions each, sampler log-probs) -> rewards [N,K] (NaN = not applicable)
    -> no-grad passes: old log-probs (trainer at generation time), reference log-probs (KL)
    -> advantages -> rollout IS weights (trainer vs sampler)
    -> the round is cut into `steps_per_generation` optimizer steps and replayed `num_iterations` times
       (PPO epochs) against the stored old log-probs; each step sums micro-batch `pg_loss`es that share the
       step's global normaliser -> AdamW -> metrics.jsonl + atomic checkpoints.

Per-token quantities of a round are stored completion-aligned (``[N, L_max]`` with mask ``cmask``), the layout
``completion_logps`` returns for every micro-batch. By default (``shared_prefix``) the completions of one prompt
are scored with one backbone pass over the prompt whose KV cache they all attend to, instead of G padded
``prompt + completion`` rows: the prompt's forward and backward are paid once per group.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from alignkit.data.collate import pad_collate
from alignkit.data.loading import load_rows
from alignkit.data.rows import RowError
from alignkit.data.tokenize import resolve_format, tokenizer_switches
from alignkit.logprobs import IGNORE_INDEX, model_token_logps, shared_prefix_token_logps
from alignkit.loops.common import end_step, optimizer_step, start_run, step_range
from alignkit.losses.policy import kl_penalized_rewards, pg_loss, rollout_is_weights
from alignkit.rewards import RewardSet
from alignkit.rollout import Generator, HFGenerator

RewardFn = Callable[..., list]


@dataclass
class RLConfig:
    """Keys shared by ``GRPOConfig`` and ``RLOOConfig`` (see those for the algorithm-specific defaults)."""

    model: str = ""  # HF id or local folder (ignored when a model object is passed)
    ref_model: str | None = None  # None: frozen copy of the initial policy (LoRA: the adapter switched off)
    dataset: str = ""  # rows with `prompt` (str or messages) or `messages`, plus columns for the rewards
    dataset_split: str = "train"
    output_dir: str = "runs/rl"
    chat_format: str | None = None  # for conversational prompts; None = detect from the tokenizer
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens
    # rewards: built-in names or dotted paths `pkg.module.fn`; weights default to 1
    rewards: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    # generation
    backend: str = "hf"  # hf | vllm_colocate | vllm_server, or a dotted path to a factory (GENERATOR_BACKENDS)
    backend_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"base_url": "http://127.0.0.1:8000"}
    group_size: int = 8  # completions per prompt (TRL num_generations)
    prompts_per_step: int = 8  # prompts per optimizer step (each step trains on prompts_per_step * group_size)
    steps_per_generation: int = 1  # optimizer steps cut from one generation round
    num_iterations: int = 1  # PPO epochs over a generation round
    max_new_tokens: int = 256
    temperature: float = 1.0  # sampling AND trainer log-prob temperature (they must agree)
    top_p: float = 1.0
    top_k: int = -1
    stop_tokens: list[str] = field(default_factory=list)  # extra stop tokens besides the eos ids
    generation_batch_size: int | None = None  # sequences per generate call (hf backend)
    # advantages
    scale_rewards: Literal["group", "batch", "none"] = "group"  # GRPO std scale (none = Dr.GRPO)
    multi_reward: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    normalize_advantages: bool = False  # RLOO: z-score the advantages over the round
    advantage_eps: float = 1e-4
    # KL to the reference
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_placement: Literal["loss", "reward"] = "loss"
    kl_is_weight: bool = True  # in-loss KL multiplied by the ratio (TRL use_bias_correction_kl)
    # policy loss (alignkit.losses.policy.pg_loss)
    loss: str = "ppo_clip"  # ppo_clip | cispo | sapo | gmpo | reinforce | vespo
    ratio_level: str = "token"  # token | sequence (GSPO) | sequence_sum
    ratio_low: float | None = None  # absolute bounds; None = the loss's defaults (ppo_clip: 0.8 / 1.2)
    ratio_high: float | None = None
    dual_clip: float | None = None
    max_log_ratio: float | None = None
    agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum | token_sum_constant
    entropy_coef: float = 0.0
    mask_truncated: bool = False  # completions cut at max_new_tokens add nothing to the loss
    # trainer-vs-sampler importance sampling (None = off)
    rollout_is: Literal["truncate", "mask", "seq_mask_token_truncate"] | None = None
    rollout_is_level: Literal["token", "sequence"] = "sequence"
    is_low: float | None = None
    is_high: float | None = 3.0
    # optimisation
    max_steps: int = 100
    micro_batch_size: int = 8  # completions per forward/backward
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    seed: int = 0
    log_every: int = 1
    save_every: int | None = None  # the final state is always saved
    keep_last: int = 2
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True
    token_chunk: int = 1024
    shared_prefix: bool = True  # score a group's completions with one pass over their shared prompt
    keep_logits_mb: float = 1024  # keep a micro-batch's LM-head logits up to this size for backward (0: recompute)
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


# (rewards [N,K] with NaN, reward weights [K] or None, cfg) -> (advantages [N], metrics)
AdvantageFn = Callable[[Tensor, Tensor | None, RLConfig], tuple[Tensor, dict[str, Tensor]]]


# ---------------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    prompt: Any  # as given in the row (str or messages): what reward functions receive
    ids: list[int]
    columns: dict[str, Any]  # the row's other fields (e.g. `answer`), passed to reward functions


def load_prompts(rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: RLConfig) -> list[Prompt]:
    """Rows -> token ids. Message prompts go through the chat format with the generation prompt appended;
    plain string prompts are used as they are. A `messages` row loses its trailing assistant turns."""
    fmt = None
    texts, prompts, columns = [], [], []
    for i, row in enumerate(rows):
        if "prompt" in row:
            prompt = row["prompt"]
        elif "messages" in row:
            prompt = list(row["messages"])
            while prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
                prompt.pop()
        else:
            raise RowError(i, "prompt", "a `prompt` (string or list of messages) or a `messages` list", row)
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            fmt = fmt or resolve_format(tokenizer, cfg.chat_format)
            text = fmt.render(prompt, add_generation_prompt=True, **tokenizer_switches(tokenizer, fmt)).text
        else:
            raise RowError(i, "prompt", "a non-empty string or list of {role, content} messages", prompt)
        texts.append(text)
        prompts.append(prompt)
        columns.append({k: v for k, v in row.items() if k not in ("prompt", "messages", "completion")})
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, ids, cols) in enumerate(zip(prompts, enc, columns)):
        if not ids:
            raise RowError(i, "prompt", "a prompt that tokenizes to at least one token", p)
        if cfg.max_prompt_length is not None:
            ids = ids[-cfg.max_prompt_length :]
        out.append(Prompt(p, list(ids), cols))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def round_prompts(n_rows: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """Prompt indices of a round: the rows in shuffled epochs, fixed by the seed (resume = recompute)."""
    start = round_idx * per_round
    return [_epoch_order(n_rows, seed, p // n_rows)[p % n_rows] for p in range(start, start + per_round)]


def _num(v: Any) -> Any:
    return v.item() if isinstance(v, Tensor) and v.numel() == 1 else v


# ---------------------------------------------------------------------------------------------------------------
# log-prob passes
# ---------------------------------------------------------------------------------------------------------------


def completion_mask(lengths: Sequence[int]) -> Tensor:
    """``[N, L_max]`` bool, True on each row's first ``length`` slots."""
    L = max(lengths, default=0)
    return torch.arange(L).unsqueeze(0) < torch.tensor(list(lengths)).unsqueeze(1)


def _collate(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int) -> dict[str, Tensor]:
    rows = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in zip(prompt_ids, completion_ids)]
    b = pad_collate(rows, pad_token_id=pad_id)
    return {k: b[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")}


def _checkpointing(model: torch.nn.Module) -> bool:
    # transformers >= 5.2x renamed is_gradient_checkpointing (now deprecated) to is_activation_checkpointing
    new, old = "is_activation_checkpointing", "is_gradient_checkpointing"
    return bool(getattr(model, new if hasattr(model, new) else old, False))


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    cfg: RLConfig,
    pad_id: int = 0,
    extras: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """Trainer log-probs (and ``extras``) of ``n`` completions at ``cfg.temperature``, completion-aligned.

    With ``cfg.shared_prefix``, each run of consecutive rows with the same prompt (a GRPO group, or the part of
    one in this micro-batch) runs its prompt once (:func:`shared_prefix_token_logps`); otherwise rows are
    padded prompt + completion sequences (:func:`model_token_logps`). Returns ``{"logps": [n, L], ...,
    "mask": [n, L]}`` with ``L`` the longest completion; slot t is completion token t.
    """
    cm = completion_mask([len(c) for c in completion_ids])
    dev = next(model.parameters()).device
    # keep_logits_mb only acts where a backward follows (chunked_token_logps checks grad mode itself)
    kw = {"temperature": cfg.temperature, "extras": extras, "token_chunk": cfg.token_chunk}
    kw["keep_logits_mb"] = cfg.keep_logits_mb
    if not cfg.shared_prefix or _checkpointing(model):
        b = {k: v.to(dev) for k, v in _collate(prompt_ids, completion_ids, pad_id).items()}
        res = model_token_logps(model, labels=b.pop("labels"), **b, **kw)
        cm = cm.to(dev)
        out = {k: torch.zeros(cm.shape, dtype=v.dtype, device=dev).masked_scatter(cm, v[res["mask"]])
               for k, v in res.items() if k != "mask"}  # fmt: skip
        return {**out, "mask": cm}
    parts: list[dict[str, Tensor]] = []
    i, n, L = 0, len(prompt_ids), cm.shape[1]
    while i < n:
        j = i + 1
        while j < n and prompt_ids[j] == prompt_ids[i]:
            j += 1
        width = max(len(c) for c in completion_ids[i:j])
        comp = torch.tensor([list(c) + [pad_id] * (width - len(c)) for c in completion_ids[i:j]])
        res = shared_prefix_token_logps(model, torch.tensor(prompt_ids[i]), comp, cm[i:j, :width], **kw)
        parts.append({k: torch.nn.functional.pad(v, (0, L - width)) for k, v in res.items()})
        i = j
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def score_logps(
    model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], cfg: RLConfig, pad_id: int
) -> Tensor:
    """Trainer log-probs of the completions at the sampling temperature, completion-aligned ``[N, L_max]``."""
    was_training = model.training
    model.eval()
    cm = completion_mask([len(c) for c in completion_ids])
    out = torch.zeros(cm.shape)
    for i in range(0, len(completion_ids), cfg.micro_batch_size):
        sl = slice(i, i + cfg.micro_batch_size)
        lp = completion_logps(model, prompt_ids[sl], completion_ids[sl], cfg, pad_id)["logps"]
        out[sl, : lp.shape[1]] = lp.float().cpu()
    model.train(was_training)
    return out


class Reference:
    """No-grad reference log-probs: a frozen copy of the initial policy, a separate model, or (LoRA) the
    policy with its adapter switched off."""

    def __init__(self, model: torch.nn.Module, cfg: RLConfig) -> None:
        self.adapter_off = cfg.ref_model is None and hasattr(model, "disable_adapter")
        if self.adapter_off:
            self.model = model
        elif cfg.ref_model is not None:
            from alignkit.models import load_model_and_tokenizer

            self.model = load_model_and_tokenizer(cfg.ref_model, dtype=cfg.dtype)[0]
        else:
            self.model = copy.deepcopy(model)
        if not self.adapter_off:
            self.model.eval().requires_grad_(False)
            self.model.to(next(model.parameters()).device)

    def logps(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], cfg: RLConfig, pad_id: int):
        ctx = self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()
        with ctx:
            return score_logps(self.model, prompt_ids, completion_ids, cfg, pad_id)


# ---------------------------------------------------------------------------------------------------------------
# one generation round
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """A scored generation round; per-token tensors are completion-aligned ``[N, L_max]`` (mask ``cmask``)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    cmask: Tensor  # [N, L] bool
    advantages: Tensor  # [N]
    keep: Tensor  # [N] bool: rows that count in the loss (False: truncated, with mask_truncated)
    old_logps: Tensor | None  # [N, L]; None = on-policy (ρ ≡ 1 with the REINFORCE gradient)
    ref_logps: Tensor | None  # [N, L], for the in-loss KL
    is_weights: Tensor | None  # [N, L] rollout IS weights
    metrics: dict[str, float]


def score_completions(
    rewards: RewardSet,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    completion_ids: list[list[int]],
    n: int,
    stops: Sequence[int],
) -> tuple[Tensor, dict[str, Any]]:
    """Rewards ``[N,K]`` (and their metrics) of ``n`` completions per prompt, groups contiguous: each reward gets
    the prompts, the decoded texts (trailing stop token cut), the ids and the rows' other columns."""
    stop_set = set(stops)
    texts = tokenizer.batch_decode(
        [c[:-1] if c and c[-1] in stop_set else c for c in completion_ids], skip_special_tokens=True
    )
    rep = [p for p in prompts for _ in range(n)]
    columns = {k: [p.columns.get(k) for p in rep] for k in {k for p in prompts for k in p.columns}}
    return rewards([p.prompt for p in rep], texts, completion_ids, **columns)


def make_round(
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    generator: Generator,
    prompts: list[Prompt],
    rewards: RewardSet,
    advantage_fn: AdvantageFn,
    reference: Reference | None,
    cfg: RLConfig,
    stops: list[int],
    pad_id: int,
    seed: int,
) -> RolloutBatch:
    """Generate, score and prepare one round (everything the optimizer steps of the round need)."""
    G = cfg.group_size
    t0 = time.perf_counter()
    ro = generator.generate(
        [p.ids for p in prompts],
        n=G,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop_token_ids=stops,
        seed=seed,
    )
    if len(ro.completion_ids) != len(prompts) * G:
        raise RuntimeError(f"generator returned {len(ro.completion_ids)} completions, expected {len(prompts) * G}")
    t_gen = time.perf_counter() - t0
    comp = [list(c) for c in ro.completion_ids]
    lengths = [len(c) for c in comp]
    if min(lengths) == 0:
        raise RuntimeError("generator returned an empty completion; it must at least hold the stop token")
    cm = completion_mask(lengths)
    sampler = torch.zeros(cm.shape)
    sampler[cm] = torch.tensor([x for lp in ro.logprobs for x in lp], dtype=torch.float32)

    # rewards
    t1 = time.perf_counter()
    R, reward_metrics = score_completions(rewards, tokenizer, prompts, comp, G, stops)
    metrics = {k: _num(v) for k, v in reward_metrics.items()}
    t_reward = time.perf_counter() - t1

    # no-grad passes: old log-probs are needed once the policy moves within the round, for IS, for KL-in-reward
    off_policy = cfg.num_iterations > 1 or cfg.steps_per_generation > 1
    kl_reward = cfg.kl_coef > 0 and cfg.kl_placement == "reward"
    old = score_logps(model, ro.prompt_ids, comp, cfg, pad_id) if off_policy or cfg.rollout_is or kl_reward else None
    ref = reference.logps(ro.prompt_ids, comp, cfg, pad_id) if reference is not None else None

    if kl_reward:
        # one summed reward minus kl_coef · Σ_t k(old, ref): the KL of the policy that sampled the sequence
        total, klm = kl_penalized_rewards(rewards.weighted_sum(R), old, ref, cm, kl_coef=cfg.kl_coef, kind=cfg.kl_kind)
        R, weights = total.unsqueeze(1), None
        metrics.update({f"kl_reward/{k}": float(v) for k, v in klm.items()})
    else:
        weights = rewards.weights
    A, adv_metrics = advantage_fn(R, weights, cfg)
    metrics.update({k: float(v) for k, v in adv_metrics.items()})

    is_w = None
    if cfg.rollout_is:
        is_w, ism = rollout_is_weights(
            old,
            sampler,
            cm,
            level=cfg.rollout_is_level,
            mode=cfg.rollout_is,
            is_low=cfg.is_low,
            is_high=cfg.is_high,
        )
        metrics.update({k: float(v) for k, v in ism.items()})
    elif old is not None:  # report the mismatch even when not correcting it
        metrics["is/mismatch_k1"] = float((old - sampler)[cm].neg().mean())

    finished = torch.tensor(ro.finished)
    keep = finished | (not cfg.mask_truncated)
    lens = torch.tensor(lengths, dtype=torch.float32)
    metrics.update(
        {
            "advantage_mean": float(A.mean()),
            "advantage_std": float(A.std()) if A.numel() > 1 else 0.0,
            "completion_length": float(lens.mean()),
            "completion_length_max": float(lens.max()),
            "frac_truncated": float((~finished).float().mean()),
            "gen_time_s": t_gen,
            "reward_time_s": t_reward,
        }
    )
    return RolloutBatch(ro.prompt_ids, comp, cm, A.float(), keep, old, ref if not kl_reward else None, is_w, metrics)


# ---------------------------------------------------------------------------------------------------------------
# one optimizer step
# ---------------------------------------------------------------------------------------------------------------


def step_normalizer(batch: RolloutBatch, rows: Sequence[int], cfg: RLConfig) -> float:
    """The aggregation's D over ALL micro-batches of the step (single process, so W = 1)."""
    if cfg.agg == "token_mean":
        tokens = (batch.cmask[rows] & batch.keep[rows].unsqueeze(1)).sum()
        return float(max(int(tokens), 1))
    if cfg.agg in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return float(len(rows))  # every row counts, empty (masked) ones too (TRL)
    if cfg.agg == "token_sum_constant":
        return float(len(rows) * cfg.max_new_tokens)  # Dr.GRPO: n_seqs · L_max
    raise ValueError(f"unknown agg {cfg.agg!r}")


def micro_loss(
    model: torch.nn.Module, batch: RolloutBatch, rows: list[int], cfg: RLConfig, normalizer: float, n_tokens: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """``pg_loss`` of the completions ``rows`` of the round, scaled by the step's normaliser."""
    entropy = cfg.entropy_coef != 0
    res = completion_logps(
        model,
        [batch.prompt_ids[i] for i in rows],
        [batch.completion_ids[i] for i in rows],
        cfg,
        extras=("entropy",) if entropy else (),
    )
    logp, mask = res["logps"], res["mask"]  # [b, L]: completion-aligned like the round's stored tensors
    width = logp.shape[1]

    def full(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[rows][:, :width].to(logp.device)

    m = mask & batch.keep[rows].to(mask.device).unsqueeze(1)
    return pg_loss(
        logp,
        full(batch.old_logps),
        batch.advantages[rows].to(logp.device),
        m,
        normalizer=normalizer,
        kind=cfg.loss,
        level=cfg.ratio_level,
        agg=cfg.agg,
        ratio_low=cfg.ratio_low,
        ratio_high=cfg.ratio_high,
        dual_clip=cfg.dual_clip,
        max_log_ratio=cfg.max_log_ratio,
        ref_logp=full(batch.ref_logps),
        kl_coef=cfg.kl_coef if batch.ref_logps is not None else 0.0,
        kl_kind=cfg.kl_kind,
        kl_is_weight=cfg.kl_is_weight,
        is_weights=full(batch.is_weights),
        entropy=res.get("entropy"),
        entropy_coef=cfg.entropy_coef,
        entropy_normalizer=n_tokens if entropy else None,
    )


_SUMMED = ("loss", "policy_loss", "n_tokens", "n_seqs")


def _merge(acc: dict[str, float], metrics: dict[str, Tensor]) -> None:
    """Sum the additive metrics; token-weight the means (their micro-batch sizes differ)."""
    w = float(metrics["n_tokens"])
    for k, v in metrics.items():
        acc[k] = acc.get(k, 0.0) + (float(v) if k in _SUMMED else float(v) * w)
    acc["_w"] = acc.get("_w", 0.0) + w


def _finish(acc: dict[str, float]) -> dict[str, float]:
    w = max(acc.pop("_w", 0.0), 1.0)
    return {k: (v if k in _SUMMED else v / w) for k, v in acc.items()}


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------


def _stop_ids(model: torch.nn.Module, tokenizer: Any, cfg: RLConfig) -> list[int]:
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if x is not None and x not in ids:
            ids.append(int(x))
    for tok in cfg.stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"stop token {tok!r} is not a single token of the tokenizer")
        ids.append(int(tid))
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos_token and cfg.stop_tokens is empty")
    return ids


def _hf_backend(model: torch.nn.Module, tokenizer: Any, cfg: RLConfig, pad_id: int) -> Generator:
    return HFGenerator(model, pad_id, max_batch_size=cfg.generation_batch_size, **cfg.backend_kwargs)


def _vllm_colocate(model: torch.nn.Module, tokenizer: Any, cfg: RLConfig, pad_id: int) -> Generator:
    from alignkit.rollout.vllm_colocate import VLLMColocateGenerator

    return VLLMColocateGenerator(model, seed=cfg.seed, **cfg.backend_kwargs)


def _vllm_server(model: torch.nn.Module, tokenizer: Any, cfg: RLConfig, pad_id: int) -> Generator:
    from alignkit.rollout.vllm_server import VLLMServerGenerator

    kw = dict(cfg.backend_kwargs)
    if "base_url" not in kw:  # no running server named: launch one on loopback serving cfg.model
        kw.update(launch=True, model_dir=kw.get("model_dir", cfg.model))
    return VLLMServerGenerator(**kw)


#: backend name -> factory ``(model, tokenizer, cfg, pad_id) -> Generator``; ``cfg.backend_kwargs`` go to it.
GENERATOR_BACKENDS: dict[str, Callable[..., Generator]] = {
    "hf": _hf_backend,
    "vllm_colocate": _vllm_colocate,
    "vllm_server": _vllm_server,
}


def make_generator(cfg: RLConfig, model: torch.nn.Module, tokenizer: Any, pad_id: int) -> Generator:
    """A registered backend by name, or a dotted path to a factory ``(model, tokenizer, cfg, pad_id)``."""
    factory = GENERATOR_BACKENDS.get(cfg.backend)
    if factory is None:
        module, _, name = cfg.backend.rpartition(".")
        if not module:
            raise ValueError(f"unknown backend {cfg.backend!r}: use {sorted(GENERATOR_BACKENDS)} or a dotted path")
        factory = getattr(importlib.import_module(module), name)
    return factory(model, tokenizer, cfg, pad_id)


@torch.no_grad()
def evaluate_rewards(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    reward_funcs: Sequence[RewardFn | str],
    *,
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    chat_format: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Mean rewards of ``n`` sampled (``temperature=0``: greedy) completions per prompt row, with the HF backend.

    Returns the ``RewardSet`` metrics (``reward``, ``rewards/<name>/mean``, ...) as floats.
    """
    cfg = RLConfig(chat_format=chat_format, max_new_tokens=max_new_tokens, max_prompt_length=None)
    prompts = load_prompts(rows, tokenizer, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = _stop_ids(model, tokenizer, cfg)
    ro = HFGenerator(model, pad_id, max_batch_size=batch_size).generate(
        [p.ids for p in prompts],
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_token_ids=stops,
        seed=seed,
    )
    _, metrics = score_completions(RewardSet(list(reward_funcs)), tokenizer, prompts, ro.completion_ids, n, stops)
    return {k: float(v) for k, v in metrics.items()}


def _check(cfg: RLConfig) -> None:
    if cfg.group_size < 1 or cfg.prompts_per_step < 1 or cfg.steps_per_generation < 1 or cfg.num_iterations < 1:
        raise ValueError("group_size, prompts_per_step, steps_per_generation and num_iterations must be >= 1")
    if cfg.temperature <= 0:
        raise ValueError("temperature must be > 0: RL samples, and the trainer scores at the same temperature")
    if cfg.kl_placement == "reward" and cfg.multi_reward == "normalize_then_sum" and cfg.kl_coef > 0:
        raise ValueError("kl_placement='reward' folds the KL into one summed reward; use sum_then_normalize")


def train_policy_gradient(
    cfg: RLConfig,
    advantage_fn: AdvantageFn,
    *,
    name: str,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    reward_funcs: Sequence[RewardFn | str] = (),
    generator: Generator | None = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Run GRPO / RLOO (``name`` labels logs). See the module docstring for the order of operations."""
    _check(cfg)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if model is None:
        from alignkit.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )
    if cfg.lora_r > 0:
        from alignkit.loops.sft import _add_lora

        model = _add_lora(model, cfg)  # type: ignore[arg-type]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not (reward_funcs or cfg.rewards):
        raise ValueError("no reward functions: set cfg.rewards (names or dotted paths) or pass reward_funcs")
    rewards = RewardSet(list(reward_funcs) or cfg.rewards, cfg.reward_weights)
    prompts = load_prompts(list(load_rows(train_data or cfg.dataset, cfg.dataset_split)), tokenizer, cfg)
    per_round = cfg.prompts_per_step * cfg.steps_per_generation
    steps_per_round = cfg.steps_per_generation * cfg.num_iterations
    stops = _stop_ids(model, tokenizer, cfg)
    reference = Reference(model, cfg) if cfg.kl_coef > 0 else None
    own_generator = generator is None
    generator = generator or make_generator(cfg, model, tokenizer, pad_id)

    run = start_run(model, cfg, cfg.max_steps, name)
    # the in-flight round of a resumed run; stale: the engine may not hold the trainer's weights
    batch = RolloutBatch(**run.state["round"]) if run.state.get("round") is not None else None
    stale = True
    model.train()
    steps: Any = step_range(run, name)

    def saved_state(step: int) -> dict[str, Any]:  # a checkpoint inside a round carries it: resume replays it
        return {"round": asdict(batch) if step % steps_per_round != 0 else None}

    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        rnd, k = divmod(step, steps_per_round)
        sync_s = 0.0
        if k == 0 or batch is None:
            if stale:
                t_sync = time.perf_counter()
                generator.update_weights(model)
                sync_s, stale = time.perf_counter() - t_sync, False
            idx = round_prompts(len(prompts), per_round, cfg.seed, rnd)
            batch = make_round(
                model=model,
                tokenizer=tokenizer,
                generator=generator,
                prompts=[prompts[i] for i in idx],
                rewards=rewards,
                advantage_fn=advantage_fn,
                reference=reference,
                cfg=cfg,
                stops=stops,
                pad_id=pad_id,
                seed=cfg.seed * 7919 + rnd,
            )
        # this step's slice of the round: whole groups, so each step sees complete groups
        chunk = k % cfg.steps_per_generation
        n = cfg.prompts_per_step * cfg.group_size
        rows = list(range(chunk * n, (chunk + 1) * n))
        normalizer = step_normalizer(batch, rows, cfg)
        n_tokens = float(max(int((batch.cmask[rows] & batch.keep[rows].unsqueeze(1)).sum()), 1))
        acc: dict[str, float] = {}
        for i in range(0, len(rows), cfg.micro_batch_size):
            loss, metrics = micro_loss(model, batch, rows[i : i + cfg.micro_batch_size], cfg, normalizer, n_tokens)
            loss.backward()
            _merge(acc, metrics)
        grad_norm, lr = optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm)
        stale = True

        done = step + 1
        record = {"step": done, **_finish(acc), "lr": lr, "grad_norm": grad_norm, **batch.metrics}
        record.update(round=rnd, iteration=k // cfg.steps_per_generation, weight_sync_s=sync_s)
        record["step_time_s"] = time.perf_counter() - t0
        if cfg.progress:
            steps.set_postfix(reward=f"{record.get('reward_mean', float('nan')):.3f}")
        end_step(run, record, model=model, tokenizer=tokenizer, callbacks=callbacks, extra_state=saved_state)
    run.log.close()
    if own_generator:
        generator.close()
    return {"steps": cfg.max_steps, "last": record, "run_dir": str(run_dir)}
