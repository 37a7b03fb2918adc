"""One generation round of online RL, and reward evaluation of a model's samples.

``make_round``: prompts -> Generator (G completions each, sampler log-probs) -> rewards ``[N,K]`` (NaN = not
applicable) -> the no-grad passes the caller asks for (old policy, reference) -> KL folded into the reward
(optional) -> advantages -> trainer-vs-sampler IS weights (optional). Per-token tensors are completion-aligned
``[N, L_max]`` (mask ``cmask``), the layout ``alignkit.scoring.completion_logps`` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.data.prompts import Prompt, load_prompts
from alignkit.losses.policy import kl_penalized_rewards, rollout_is_weights
from alignkit.models import pad_token_id
from alignkit.reward_funcs import RewardSet
from alignkit.rollout.base import Generator, stop_token_ids
from alignkit.rollout.hf import HFGenerator
from alignkit.scoring import completion_mask

__all__ = [
    "RolloutBatch", "ScoredRollouts", "generate_and_score", "prepare_round", "make_round", "score_completions",
    "sample_rows", "completion_length_metrics", "evaluate_rewards", "environment_reward",
]  # fmt: skip

#: ``(prompt_ids, completion_ids, images) -> [N, L_max]`` no-grad log-probs (e.g. a partial of
#: ``frozen_completion_logps``); ``images``: each row's prompt images (None for a text round)
LogpsFn = Callable[[list[list[int]], list[list[int]], Any], Tensor]


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
    rewards: Tensor | None = None  # [R, K] each rollout's reward per function (NaN: not applicable), before any KL
    images: list[Any] | None = None  # [N] each row's prompt images (a vision-language round), else None
    # [N] the rollout of each row (tool rollouts: a fork gives a rollout several rows); None: row i is rollout i
    rollout_index: list[int] | None = None

    def rows_of(self, rollouts: range) -> list[int]:
        """The rows of the rollouts ``rollouts`` (a contiguous range: whole groups), in order."""
        if self.rollout_index is None:
            return list(rollouts)
        return [i for i, r in enumerate(self.rollout_index) if r in rollouts]


def sample_rows(batch: RolloutBatch, tokenizer: Any, reward_names: Sequence[str], n: int) -> list[dict[str, Any]]:
    """The first ``n`` completions of a round as readable rows (whole groups first): the prompt as the model saw
    it, the completion, each reward, the advantage and the length; for RUN_DIR/completions.jsonl and tables."""
    rows = []
    for i in range(min(n, len(batch.completion_ids))):
        # a tool rollout's completion shows the tool results between the model's turns, special tokens included
        tools = batch.rollout_index is not None
        row = {"prompt": tokenizer.decode(batch.prompt_ids[i]),
               "completion": tokenizer.decode(batch.completion_ids[i], skip_special_tokens=not tools)}  # fmt: skip
        if batch.rewards is not None:
            r = batch.rollout_index[i] if tools else i
            row.update({f"rewards/{name}": float(batch.rewards[r, k]) for k, name in enumerate(reward_names)})
        adv = batch.advantages[i]
        row.update(advantage=float(adv if adv.dim() == 0 else adv[batch.cmask[i]].mean()),
                   length=len(batch.completion_ids[i]))  # fmt: skip
        rows.append(row)
    return rows


def _num(v: Any) -> Any:
    return v.item() if isinstance(v, Tensor) and v.numel() == 1 else v


def score_completions(
    rewards: RewardSet,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    completion_ids: list[list[int]],
    n: int,
    stops: Sequence[int],
) -> tuple[Tensor, dict[str, Any]]:
    """Rewards ``[N,K]`` (and their metrics) of ``n`` completions per prompt, groups contiguous: each reward gets
    the prompts, the decoded texts (trailing stop token cut; TRL-style rewards get them as assistant messages when
    the prompt is conversational), the ids and the rows' other columns."""
    stop_set = set(stops)
    texts = tokenizer.batch_decode(
        [c[:-1] if c and c[-1] in stop_set else c for c in completion_ids], skip_special_tokens=True
    )
    rep = [p for p in prompts for _ in range(n)]
    columns = {k: [p.columns.get(k) for p in rep] for k in {k for p in prompts for k in p.columns}}
    return rewards([p.prompt for p in rep], texts, completion_ids, **columns)


@dataclass
class ScoredRollouts:
    """A generated round with its rewards, before any trainer-side pass: what ``generate_and_score`` returns
    and an async rollout worker sends. ``version``: the policy version (optimizer steps) that sampled it."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logps: list[list[float]]  # per completion token, at the sampling temperature
    finished: list[bool]  # ended on a stop token
    rewards: Tensor  # [N, K] float32, NaN = not applicable
    metrics: dict[str, Any]  # the RewardSet's metrics, gen_time_s, reward_time_s
    version: int = 0
    images: list[Any] | None = None  # [N] each row's prompt images (a vision-language round), else None
    # tool rollouts (alignkit.rollout.multi_turn): rows are training rows, rewards are per rollout
    trained: list[list[bool]] | None = None  # per completion token: the model's own (False: tool results, glue)
    rollout_index: list[int] | None = None  # [N] each row's rollout
    turn: list[list[int]] | None = None  # per completion token: the model turn it belongs to (-1: glue)
    turn_rewards: Tensor | None = None  # [R, T] per-turn environment rewards (NaN: no such turn), or None


def _turn_reward_table(rewards: Sequence[Any]) -> Tensor | None:
    """[R, T] from the environments' rewards when at least one scored each turn (a list); else None."""
    lists = [r for r in rewards if isinstance(r, (list, tuple))]
    if not lists:
        return None
    width = max(len(r) for r in lists)
    table = torch.full((len(rewards), max(width, 1)), float("nan"))
    for i, r in enumerate(rewards):
        if isinstance(r, (list, tuple)):
            table[i, : len(r)] = torch.tensor([float("nan") if v is None else float(v) for v in r])
    return table


def environment_reward(*, environment_reward: list[Any], **kwargs: Any) -> list[float | None]:
    """The reward an environment gave its rollout (``reward()``): a float, or the sum of its per-turn rewards
    (whose turn-level part enters through ``turn_advantages``); None when the environment has no reward."""
    out = []
    for r in environment_reward:
        if isinstance(r, (list, tuple)):
            r = sum(float(v) for v in r if v is not None)
        out.append(None if r is None else float(r))
    return out


def _tool_round(generator: Generator, tokenizer: Any, prompts: list[Prompt], rewards: RewardSet, group_size: int,
                sampling: Mapping[str, Any], stops: list[int], seed: int | Sequence[int], tool_use: Any,
                chat_format: Any, switches: Mapping[str, Any]) -> ScoredRollouts:  # fmt: skip
    from alignkit.rollout.base import prompt_seeds
    from alignkit.rollout.multi_turn import tool_rollouts

    G = group_size
    t0 = time.perf_counter()
    seeds = prompt_seeds(seed, len(prompts), G)
    ro = tool_rollouts(generator, tokenizer, chat_format, prompts, tool_use, n=G, sampling=sampling, stops=stops,
                       seeds=seeds if seeds is not None else [0] * len(prompts), switches=switches)  # fmt: skip
    t_gen = time.perf_counter() - t0
    t1 = time.perf_counter()
    rep = [p for p in prompts for _ in range(G)]
    columns = {k: [p.columns.get(k) for p in rep] for k in {k for p in prompts for k in p.columns}}
    columns.update(trajectory=ro.trajectories, environment_reward=ro.environment_rewards)
    R, reward_metrics = rewards([p.prompt for p in rep], ro.texts, ro.last_ids, **columns)
    metrics = {k: _num(v) for k, v in reward_metrics.items()}
    metrics.update(ro.metrics, gen_time_s=t_gen, reward_time_s=time.perf_counter() - t1)
    finished = [ro.finished[r] for r in ro.rollout_index]
    return ScoredRollouts(ro.prompt_ids, ro.completion_ids, ro.sampler_logps, finished,
                          R.detach().float().reshape(len(rep), -1).cpu(), metrics, trained=ro.trained,
                          rollout_index=ro.rollout_index, turn=ro.turn,
                          turn_rewards=_turn_reward_table(ro.environment_rewards))  # fmt: skip


def generate_and_score(
    *,
    generator: Generator,
    tokenizer: Any,
    prompts: list[Prompt],
    rewards: RewardSet,
    group_size: int,
    sampling: Mapping[str, Any],
    stops: list[int],
    seed: int | Sequence[int],
    tool_use: Any = None,
    chat_format: Any = None,
    switches: Mapping[str, Any] | None = None,
) -> ScoredRollouts:
    """Sample ``group_size`` completions per prompt (``sampling``: ``max_new_tokens, temperature, top_p,
    top_k``) and score them with the reward functions.

    With ``tool_use`` (an :class:`alignkit.rollout.multi_turn.ToolUse`), each completion is a multi-turn tool
    rollout rendered by ``chat_format`` (with the format's ``switches``); rewards then also get the ``trajectory``
    column (the whole conversation) and ``environment_reward`` (what each rollout's environment scored)."""
    if tool_use is not None:
        return _tool_round(generator, tokenizer, prompts, rewards, group_size, sampling, stops, seed, tool_use,
                           chat_format, switches or {})  # fmt: skip
    G = group_size
    t0 = time.perf_counter()
    images = [p.images for p in prompts] if any(p.images for p in prompts) else None
    extra = {"images": images} if images is not None else {}  # only vision-language engines take images
    ro = generator.generate([p.ids for p in prompts], n=G, stop_token_ids=stops, seed=seed, **sampling, **extra)
    if len(ro.completion_ids) != len(prompts) * G:
        raise RuntimeError(f"generator returned {len(ro.completion_ids)} completions, expected {len(prompts) * G}")
    t_gen = time.perf_counter() - t0
    comp = [list(c) for c in ro.completion_ids]
    if min(len(c) for c in comp) == 0:
        raise RuntimeError("generator returned an empty completion; it must at least hold the stop token")
    t1 = time.perf_counter()
    R, reward_metrics = score_completions(rewards, tokenizer, prompts, comp, G, stops)
    metrics = {k: _num(v) for k, v in reward_metrics.items()}
    metrics.update(gen_time_s=t_gen, reward_time_s=time.perf_counter() - t1)
    per_function = R.detach().float().reshape(len(comp), -1).cpu()
    rows_images = None if images is None else [im for im in images for _ in range(G)]
    return ScoredRollouts(list(map(list, ro.prompt_ids)), comp, [list(x) for x in ro.logprobs], list(ro.finished),
                          per_function, metrics, images=rows_images)  # fmt: skip


def prepare_round(
    scored: ScoredRollouts,
    *,
    rewards: RewardSet,
    advantage_fn: Callable[[Tensor, Tensor | None], tuple[Tensor, dict[str, Tensor]]],
    old_logps_fn: LogpsFn | None = None,
    reference_logps_fn: LogpsFn | None = None,
    kl_in_reward: tuple[float, str] | None = None,
    rollout_is: Mapping[str, Any] | None = None,
    mask_truncated: bool = False,
    sampler_as_old: bool = False,
    turn_advantage: tuple[int, float] | None = None,
) -> RolloutBatch:
    """The trainer-side passes of a scored round: old-policy and reference log-probs, KL folded into the reward
    (optional), advantages, trainer-vs-sampler IS weights (optional).

    Args:
        old_logps_fn: the trainer's log-probs at the round's start (needed once the policy moves within the round,
            for rollout IS and for KL in the reward); None = on-policy.
        sampler_as_old: the sampler's log-probs are the old policy (async "bypass": the samples may be a few
            versions old, the PPO ratio is then against the policy that sampled them).
        turn_advantage: ``(group_size, coef)``: tool rollouts whose environments scored each turn add
            ``coef · turn_advantages`` to the outcome advantage of each turn's tokens (``A`` becomes ``[N, L]``).
        Others as in :func:`make_round`.
    """
    comp = scored.completion_ids
    lengths = [len(c) for c in comp]
    filled = completion_mask(lengths)
    sampler = torch.zeros(filled.shape)
    sampler[filled] = torch.tensor([x for lp in scored.sampler_logps for x in lp], dtype=torch.float32)
    cm = filled.clone()
    if scored.trained is not None:  # tool results and the template's glue: never trained, in no ratio or count
        cm[filled] = torch.tensor([t for row in scored.trained for t in row], dtype=torch.bool)
    R, metrics = scored.rewards, dict(scored.metrics)

    old = old_logps_fn(scored.prompt_ids, comp, scored.images) if old_logps_fn is not None else None
    if sampler_as_old:
        old = sampler.clone()
    ref = reference_logps_fn(scored.prompt_ids, comp, scored.images) if reference_logps_fn is not None else None
    if kl_in_reward is not None:
        if old is None or ref is None:
            raise ValueError("KL in the reward needs both the old-policy and the reference log-probs")
        # one summed reward minus kl_coef · Σ_t k(old, ref): the KL of the policy that sampled the sequence
        kl_coef, kind = kl_in_reward
        summed = rewards.weighted_sum(R)
        if scored.rollout_index is not None:  # a tool rollout's KL: the sum over its rows' model tokens
            row_penalty, klm = kl_penalized_rewards(torch.zeros(len(comp)), old, ref, cm, kl_coef=kl_coef, kind=kind)
            idx = torch.tensor(scored.rollout_index, dtype=torch.long)
            total = summed + torch.zeros_like(summed).index_add(0, idx, row_penalty.to(summed.dtype))
        else:
            total, klm = kl_penalized_rewards(summed, old, ref, cm, kl_coef=kl_coef, kind=kind)
        R, weights = total.unsqueeze(1), None
        metrics.update({f"kl_reward/{k}": float(v) for k, v in klm.items()})
    else:
        weights = rewards.weights
    A, adv_metrics = advantage_fn(R, weights)
    if scored.rollout_index is not None:  # per rollout -> per row (and per token with turn-level rewards)
        A = A[torch.tensor(scored.rollout_index, dtype=torch.long)]
        if scored.turn_rewards is not None and turn_advantage is not None:
            A = _with_turn_advantages(A, scored, cm, *turn_advantage, adv_metrics)
    # one name per quantity: the mean of the summed rewards is the RewardSet's `reward`, unless KL was folded in
    reward_mean = adv_metrics.pop("reward_mean", None)
    if kl_in_reward is not None and reward_mean is not None:
        metrics["kl_reward/reward_mean"] = float(reward_mean)
    metrics.update({k: float(v) for k, v in adv_metrics.items()})

    is_w = None
    if rollout_is is not None:
        if old is None:
            raise ValueError("rollout IS weights need the old-policy log-probs")
        is_w, ism = rollout_is_weights(old, sampler, cm, **rollout_is)
        metrics.update({k: float(v) for k, v in ism.items()})
    elif old is not None and not sampler_as_old:  # report the mismatch even when not correcting it
        metrics["is/mismatch_k1"] = float((old - sampler)[cm].neg().mean())

    finished = torch.tensor(scored.finished)
    keep = finished | (not mask_truncated)
    lens = torch.tensor(lengths, dtype=torch.float32)
    metrics.update(
        {
            "advantage_mean": float(A.mean()),
            "advantage_std": float(A.std()) if A.numel() > 1 else 0.0,
            **completion_length_metrics(lens, finished),
        }
    )
    ref_in_loss = ref if kl_in_reward is None else None
    return RolloutBatch(scored.prompt_ids, comp, cm, A.float(), keep, old, ref_in_loss, is_w, metrics, scored.rewards,
                        images=scored.images, rollout_index=scored.rollout_index)  # fmt: skip


def _with_turn_advantages(
    A: Tensor, scored: ScoredRollouts, cm: Tensor, group_size: int, coef: float, metrics: dict[str, Tensor]
) -> Tensor:
    """``A [N]`` per row -> ``[N, L]``: each trained token of turn t also gets ``coef · A_turn[rollout, t]``."""
    from alignkit.losses.advantages import turn_advantages

    A_turn, turn_metrics = turn_advantages(scored.turn_rewards, group_size=group_size)
    metrics.update(turn_metrics)
    turn = torch.full(cm.shape, -1, dtype=torch.long)
    filled = completion_mask([len(t) for t in scored.turn])
    turn[filled] = torch.tensor([t for row in scored.turn for t in row], dtype=torch.long)
    rollout = torch.tensor(scored.rollout_index, dtype=torch.long).unsqueeze(1).expand_as(turn)
    width = A_turn.shape[1]
    per_token = A_turn[rollout, turn.clamp(0, width - 1)]
    per_token = torch.where((turn >= 0) & (turn < width) & cm, per_token, 0.0)
    return A.unsqueeze(1) + coef * per_token


def make_round(
    *,
    generator: Generator,
    tokenizer: Any,
    prompts: list[Prompt],
    rewards: RewardSet,
    group_size: int,
    sampling: Mapping[str, Any],
    stops: list[int],
    seed: int | Sequence[int],
    advantage_fn: Callable[[Tensor, Tensor | None], tuple[Tensor, dict[str, Tensor]]],
    old_logps_fn: LogpsFn | None = None,
    reference_logps_fn: LogpsFn | None = None,
    kl_in_reward: tuple[float, str] | None = None,
    rollout_is: Mapping[str, Any] | None = None,
    mask_truncated: bool = False,
    tool_use: Any = None,
    chat_format: Any = None,
    switches: Mapping[str, Any] | None = None,
    turn_advantage_coef: float = 1.0,
) -> RolloutBatch:
    """Generate, score and prepare one round (everything the optimizer steps of the round need):
    :func:`generate_and_score`, then :func:`prepare_round`.

    Args:
        sampling: ``max_new_tokens, temperature, top_p, top_k`` for ``generator.generate``.
        advantage_fn: ``(rewards [N,K], reward weights [K] or None) -> (advantages [N], metrics)``.
        old_logps_fn: the trainer's log-probs at generation time (needed once the policy moves within the round,
            for rollout IS and for KL in the reward); None = on-policy.
        reference_logps_fn: the reference's log-probs (KL); None = no KL.
        kl_in_reward: ``(kl_coef, kind)``: fold ``kl_coef·Σ_t k(old, ref)`` into one summed reward.
        rollout_is: keyword arguments of ``losses.policy.rollout_is_weights`` (``mode`` included); None = off.
        mask_truncated: completions cut at ``max_new_tokens`` add nothing to the loss.
        tool_use, chat_format, switches: multi-turn tool rollouts (see :func:`generate_and_score`).
        turn_advantage_coef: weight of the turn-level advantages when environments score each turn.
    """
    scored = generate_and_score(generator=generator, tokenizer=tokenizer, prompts=prompts, rewards=rewards,
                                group_size=group_size, sampling=sampling, stops=stops, seed=seed, tool_use=tool_use,
                                chat_format=chat_format, switches=switches)  # fmt: skip
    turns = (group_size, turn_advantage_coef) if tool_use is not None else None
    return prepare_round(scored, rewards=rewards, advantage_fn=advantage_fn, old_logps_fn=old_logps_fn,
                         reference_logps_fn=reference_logps_fn, kl_in_reward=kl_in_reward, rollout_is=rollout_is,
                         mask_truncated=mask_truncated, turn_advantage=turns)  # fmt: skip


def completion_length_metrics(lengths: Tensor, finished: Tensor) -> dict[str, float]:
    """TRL's ``completions/*`` metrics of a round: lengths ``[N]`` in tokens (stop token included) and whether
    each completion ended on a stop token ``[N]`` bool (the rest hit ``max_new_tokens``: ``clipped_ratio``)."""
    done = lengths[finished]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float((~finished).float().mean()),
        "completions/mean_terminated_length": float(done.mean()) if len(done) else 0.0,
        "completions/min_terminated_length": float(done.min()) if len(done) else 0.0,
        "completions/max_terminated_length": float(done.max()) if len(done) else 0.0,
    }


@torch.no_grad()
def evaluate_rewards(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    reward_funcs: Sequence[Callable[..., list] | str],
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
    prompts = load_prompts(rows, tokenizer, chat_format=chat_format)
    stops = stop_token_ids(model, tokenizer)
    ro = HFGenerator(model, pad_token_id(tokenizer), max_batch_size=batch_size).generate(
        [p.ids for p in prompts], n=n, max_new_tokens=max_new_tokens, temperature=temperature,
        stop_token_ids=stops, seed=seed,
    )  # fmt: skip
    rewards = RewardSet(list(reward_funcs), columns={k for p in prompts for k in p.columns})
    _, metrics = score_completions(rewards, tokenizer, prompts, ro.completion_ids, n, stops)
    return {k: float(v) for k, v in metrics.items()}
