"""Online DPO: preference pairs sampled from the current policy, ranked by rewards, trained with a DPO loss.

Per generation round (``prompts_per_step * steps_per_generation`` prompts, this rank's share of them):

1. the generator gets the trainer's weights (stale after every optimizer step) and samples ``num_generations``
   completions per prompt, each prompt's seed fixed by its place in the round (``loops.policy_gradient``'s rule,
   so the samples do not depend on the number of ranks);
2. reward functions (names or dotted paths, ``reward_funcs``) and/or a reward model (``reward_model``) score
   them; ``missing_eos_penalty`` is subtracted from completions that did not end on a stop token;
3. per prompt, chosen = the best completion and rejected = the worst; a prompt whose completions all score the
   same (a tie), or that has fewer than two scorable ones, makes no pair (dropped, and counted);
4. the reference log-probs of the pairs, precomputed once per round under no_grad: a frozen copy of the initial
   policy (or ``ref_model``), or the LoRA adapter switched off (``reference.default_rl_reference_kind``).

Then per optimizer step (its slice of the round's prompts): the policy's chosen / rejected sequence log-probs
(``scoring.completion_logps``, a pair's two completions scored with one pass over their shared prompt), any of
the ``DPO_LOSSES`` types (``losses.preference.dpo_loss``) with the step's global pair count as normaliser, the
optimizer step, metrics and checkpoints (``loops.common``). A checkpoint inside a round stores this rank's share
of it, so a resume replays it exactly.

    from alignkit.loops.online_dpo import OnlineDPOConfig, train_online_dpo
    train_online_dpo(OnlineDPOConfig(model="path", dataset="prompts.jsonl", rewards=["math_answer"]))

Log-probs are those of the policy itself (temperature 1), whatever the sampling ``temperature``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit import distributed, hardware
from alignkit.data.loading import load_rows
from alignkit.data.prompts import Prompt, load_prompts, round_prompts
from alignkit.loops import common
from alignkit.loops.config import DatasetBlock, LoRABlock, ModelBlock, OptimBlock, RunBlock, require
from alignkit.loops.dpo import DPOLossBlock, dpo_options
from alignkit.losses.preference import LOSS_TYPES, dpo_loss
from alignkit.metrics import StepMetrics
from alignkit.models import load_model_and_tokenizer, pad_token_id
from alignkit.reference import Reference, ReferenceInputs, build_reference, default_rl_reference_kind
from alignkit.reward_funcs import RewardSet, RewardState, reward_model_reward
from alignkit.rollout import Generator, make_generator, stop_token_ids
from alignkit.rollout.round import completion_length_metrics, generate_and_score
from alignkit.scoring import completion_logps, frozen_completion_logps

__all__ = ["OnlineDPOConfig", "PairRound", "PairPick", "pick_pairs", "penalized_scores", "train_online_dpo"]

RewardFn = Callable[..., list]


@dataclass
class OnlineDPOConfig(ModelBlock, DatasetBlock, OptimBlock, LoRABlock, RunBlock, DPOLossBlock):
    output_dir: str = "runs/online_dpo"  # run folder: metrics.jsonl, run.json, checkpoint-N/
    ref_model: str | None = None  # None: frozen copy of the initial policy (LoRA: the adapter switched off)
    dataset: str = ""  # rows with `prompt` (str or messages) or `messages`, plus columns for the rewards
    chat_format: str | None = None  # for conversational prompts; None = detect from the tokenizer
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens
    # ranking: reward functions (built-in names or dotted paths) and/or a reward model, weighted and summed
    rewards: list[str] = field(default_factory=list)  # reward names (reward_funcs.REWARDS) or dotted paths
    reward_model: str | None = None  # folder / hub id of a sequence-classification reward model (a reward too)
    reward_model_batch_size: int = 8  # sequences per reward-model forward
    # one weight per reward (the reward model last); None: all 1
    reward_weights: list[float] | None = None
    max_reward_failures: int = 3  # stop when a reward raises on every sample of this many rounds in a row (0: never)
    missing_eos_penalty: float | None = None  # subtracted from the score of completions without a stop token
    # generation
    backend: str = "hf"  # hf | vllm_colocate | vllm_server, or a dotted path to a factory (GENERATOR_BACKENDS)
    backend_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"base_url": "http://127.0.0.1:8000"}
    num_generations: int = 2  # completions per prompt (>= 2): the pair is the best and the worst of them
    prompts_per_step: int = 8  # prompts per optimizer step (each makes at most one pair)
    steps_per_generation: int = 1  # optimizer steps cut from one generation round
    max_new_tokens: int = 64  # completion length cap
    temperature: float = 0.9  # sampling temperature (log-probs are the policy's own, at temperature 1)
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = -1  # sample among the k most likely tokens (-1: all)
    stop_tokens: list[str] = field(default_factory=list)  # extra stop tokens besides the eos ids
    generation_batch_size: int | None = None  # sequences per generate call (hf backend)
    # optimisation
    max_steps: int = 100  # optimizer steps of the run
    micro_batch_size: int = 8  # pairs per forward/backward (two completions each)
    shared_prefix: bool = True  # score a pair's two completions with one pass over their shared prompt
    keep_logits_mb: float = 1024  # keep a micro-batch's LM-head logits up to this size for backward (0: recompute)
    token_chunk: int = 1024  # tokens per tile of the chunked LM-head log-prob computation
    log_completions_every: int = 10  # steps between sample pairs (completions.jsonl, trackers); 0: never
    log_completions_n: int = 8  # pairs per sample

    def check(self) -> None:
        require(self, self.num_generations >= 2, "num_generations",
                "an integer >= 2: a pair is the best and the worst of a prompt's completions")  # fmt: skip
        for key in ("prompts_per_step", "steps_per_generation", "micro_batch_size", "max_new_tokens", "max_steps",
                    "reward_model_batch_size", "log_completions_n"):  # fmt: skip
            require(self, getattr(self, key) >= 1, key, "an integer >= 1")
        require(self, self.temperature > 0, "temperature", "> 0: online DPO samples its pairs")
        require(self, 0 < self.top_p <= 1, "top_p", "a probability in (0, 1]")
        require(self, self.log_completions_every >= 0, "log_completions_every", "an integer >= 0 (0: never)")
        penalty = self.missing_eos_penalty
        require(self, penalty is None or (math.isfinite(penalty) and penalty >= 0), "missing_eos_penalty",
                "a number >= 0 (or none)")  # fmt: skip
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        require(self, not unknown, "loss_type", f"one or more of {list(LOSS_TYPES)} (unknown: {unknown})")
        world = distributed.env_world_size()  # each rank generates and trains on its share of every step's prompts
        require(self, self.prompts_per_step % world == 0, "prompts_per_step",
                f"a multiple of the WORLD_SIZE={world} ranks (each rank takes whole prompts)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# ranking completions into pairs
# ---------------------------------------------------------------------------------------------------------------


def penalized_scores(total: Tensor, finished: Tensor, missing_eos_penalty: float | None) -> Tensor:
    """``[N]`` scores: the summed rewards minus ``missing_eos_penalty`` where a completion did not end on a stop
    token (``finished`` False: cut at ``max_new_tokens``); NaN (unscorable) stays NaN."""
    total = total.float()
    if not missing_eos_penalty:
        return total
    return total - missing_eos_penalty * (~finished.bool()).float()


@dataclass
class PairPick:
    """Per prompt: the chosen (best) and rejected (worst) completion's index within its group, and why a prompt
    makes no pair (``tied``: every scorable completion scored the same; ``unscorable``: fewer than two scored)."""

    chosen: Tensor  # [P] long
    rejected: Tensor  # [P] long
    kept: Tensor  # [P] bool
    tied: Tensor  # [P] bool
    unscorable: Tensor  # [P] bool


def pick_pairs(scores: Tensor, num_generations: int) -> PairPick:
    """Best vs worst of each group of ``num_generations`` consecutive scores (NaN: left out). The first of equal
    best (worst) scores is taken, so a pick never depends on anything but the scores."""
    S = scores.float().reshape(-1, num_generations)
    present = ~torch.isnan(S)
    hi = torch.where(present, S, -math.inf)
    lo = torch.where(present, S, math.inf)
    chosen, rejected = hi.argmax(1), lo.argmin(1)
    unscorable = present.sum(1) < 2
    best, worst = hi.gather(1, chosen[:, None])[:, 0], lo.gather(1, rejected[:, None])[:, 0]
    tied = ~unscorable & (best == worst)
    return PairPick(chosen, rejected, ~unscorable & ~tied, tied, unscorable)


# ---------------------------------------------------------------------------------------------------------------
# a round of pairs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PairRound:
    """This rank's share of a generation round, as pairs (kept ones only), with everything its steps need.
    ``micro[k]``: step k's micro-batches of pair indices; an empty one is a filler (a forward on ``filler``
    weighted 0) that keeps the ranks' forward counts equal."""

    prompt_ids: list[list[int]]  # [P]
    chosen_ids: list[list[int]]  # [P]
    rejected_ids: list[list[int]]  # [P]
    chosen_score: Tensor  # [P]
    rejected_score: Tensor  # [P]
    ref_chosen: Tensor  # [P] summed reference log-probs
    ref_rejected: Tensor  # [P]
    micro: list[list[list[int]]]  # [steps_per_generation][micro-batches][pair indices]
    tied: list[int]  # per step: this rank's prompts whose completions tied
    unscorable: list[int]  # per step: this rank's prompts with fewer than two scorable completions
    filler: list[list[int]]  # [prompt, completion, completion] ids of a filler micro-batch
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)  # the first pairs, readable (completions.jsonl)


def _interleave(rnd: PairRound, mb: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Rows ``[c0, r0, c1, r1, ...]`` of the pairs ``mb`` (the filler pair for an empty one): a pair's two rows
    share their prompt, which ``completion_logps`` then runs once."""
    if not mb:
        p, c, r = rnd.filler
        return [p, p], [c, r]
    prompts = [rnd.prompt_ids[i] for i in mb for _ in (0, 1)]
    comps = [x for i in mb for x in (rnd.chosen_ids[i], rnd.rejected_ids[i])]
    return prompts, comps


def _equal_counts(counts: list[int]) -> list[int]:
    """Per step, the largest micro-batch count of any rank (FSDP2 / a LoRA reference: every rank runs as many
    forwards; DDP: every rank runs a backward)."""
    if distributed.world_size() == 1:
        return counts
    every = distributed.all_gather_objects(counts)
    return [max(c[k] for c in every) for k in range(len(counts))]


def make_pair_round(
    *,
    cfg: OnlineDPOConfig,
    model: torch.nn.Module,
    generator: Generator,
    tokenizer: Any,
    prompts: list[Prompt],
    rewards: RewardSet,
    reference: Reference,
    stops: list[int],
    seeds: list[int],
    pad_id: int,
) -> PairRound:
    """Generate, score, pair and reference-score this rank's prompts of one round (see the module docstring)."""
    G, spg = cfg.num_generations, cfg.steps_per_generation
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    scored = generate_and_score(generator=generator, tokenizer=tokenizer, prompts=prompts, rewards=rewards,
                                group_size=G, sampling=sampling, stops=stops, seed=seeds)  # fmt: skip
    finished = torch.tensor(scored.finished, dtype=torch.bool)
    scores = penalized_scores(rewards.weighted_sum(scored.rewards), finished, cfg.missing_eos_penalty)
    pick = pick_pairs(scores, G)
    per_step = len(prompts) // spg  # this rank's prompts per step
    comp = scored.completion_ids
    kept = [j for j in range(len(prompts)) if pick.kept[j]]
    first = [j * G + int(pick.chosen[j]) for j in kept]
    last = [j * G + int(pick.rejected[j]) for j in kept]
    steps_of = [j // per_step for j in kept]
    mbs = cfg.micro_batch_size
    micro: list[list[list[int]]] = []
    for k in range(spg):
        mine = [i for i, s in enumerate(steps_of) if s == k]
        micro.append([mine[i : i + mbs] for i in range(0, len(mine), mbs)])
    for k, n in enumerate(_equal_counts([len(m) for m in micro])):
        micro[k] += [[] for _ in range(n - len(micro[k]))]

    rnd = PairRound(
        prompt_ids=[list(prompts[j].ids) for j in kept],
        chosen_ids=[comp[i] for i in first],
        rejected_ids=[comp[i] for i in last],
        chosen_score=scores[first].clone(),
        rejected_score=scores[last].clone(),
        ref_chosen=torch.zeros(len(kept)),
        ref_rejected=torch.zeros(len(kept)),
        micro=micro,
        tied=[int(pick.tied[k * per_step : (k + 1) * per_step].sum()) for k in range(spg)],
        unscorable=[int(pick.unscorable[k * per_step : (k + 1) * per_step].sum()) for k in range(spg)],
        filler=[list(prompts[0].ids), comp[0], comp[1]],
        metrics={},
    )
    t0 = time.perf_counter()
    for plan in micro:  # the reference, once per round (no grad), in the steps' micro-batches
        for mb in plan:
            p, c = _interleave(rnd, mb)
            lp = reference.logps(model, (p, c, None))
            seq = lp.float().sum(1).cpu()  # masked slots hold 0
            if mb:
                rnd.ref_chosen[mb], rnd.ref_rejected[mb] = seq[0::2], seq[1::2]
    metrics = {k: float(v) for k, v in scored.metrics.items()}
    ok = ~torch.isnan(scores)
    metrics["objective/scores"] = float(scores[ok].mean()) if ok.any() else math.nan
    lens = torch.tensor([len(c) for c in comp], dtype=torch.float32)
    metrics.update(completion_length_metrics(lens, finished), ref_time_s=time.perf_counter() - t0)
    rnd.metrics = metrics
    n = min(cfg.log_completions_n, len(kept))
    rnd.samples = [
        {"prompt": tokenizer.decode(rnd.prompt_ids[i]),
         "chosen": tokenizer.decode(rnd.chosen_ids[i], skip_special_tokens=True),
         "rejected": tokenizer.decode(rnd.rejected_ids[i], skip_special_tokens=True),
         "chosen_score": float(rnd.chosen_score[i]), "rejected_score": float(rnd.rejected_score[i])}
        for i in range(n)
    ]  # fmt: skip
    return rnd


# ---------------------------------------------------------------------------------------------------------------
# the loss of a micro-batch
# ---------------------------------------------------------------------------------------------------------------


def pair_loss(
    model: torch.nn.Module, rnd: PairRound, mb: Sequence[int], cfg: OnlineDPOConfig, n_pairs: float,
    n_chosen_tokens: float, pad_id: int,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """``dpo_loss`` of the pairs ``mb`` of the round, divided by the step's global pair count (an empty ``mb``:
    the filler pair, weighted 0, so the graph reaches every parameter and nothing is learnt from it)."""
    prompts, comps = _interleave(rnd, mb)
    res = completion_logps(model, prompts, comps, temperature=1.0, shared_prefix=cfg.shared_prefix, pad_id=pad_id,
                           token_chunk=cfg.token_chunk, keep_logits_mb=cfg.keep_logits_mb)  # fmt: skip
    mask = res["mask"]
    seq = torch.where(mask, res["logps"], 0.0).float().sum(1)
    n_tok = mask.sum(1).float()
    take = len(mb)  # 0 for the filler
    pc, pr = seq[0::2][:take], seq[1::2][:take]
    dev = seq.device
    idx = torch.tensor(list(mb), dtype=torch.long)
    rc, rr = rnd.ref_chosen[idx].to(dev), rnd.ref_rejected[idx].to(dev)
    loss, metrics = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        **dpo_options(cfg),
        chosen_lengths=n_tok[0::2][:take],
        rejected_lengths=n_tok[1::2][:take],
        sft_logps=pc,
        sft_normalizer=n_chosen_tokens,
        normalizer=n_pairs,
    )
    if not take:
        loss = loss + 0.0 * seq.sum()
    return loss, metrics


# summed over micro-batches (already divided by the step's pair count, or counts); the rest are pair-weighted
STEP_WEIGHTS = {"loss": None, "n_pairs": None, **{f"loss/{t}": None for t in LOSS_TYPES}}


def _global_sum(x: float) -> float:
    return float(distributed.all_reduce_sum(torch.tensor(float(x), dtype=torch.float64)))


def train_online_dpo(
    cfg: OnlineDPOConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    ref_model: torch.nn.Module | None = None,
    train_data: Any = None,
    reward_funcs: Sequence[RewardFn | str] = (),
    generator: Generator | None = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Run online DPO. Pass objects (model, tokenizer, a reference model, prompt rows, reward functions, a
    ``Generator``) or let ``cfg`` name them. Returns ``{"steps", "last": last metrics record, "run_dir"}``."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    common.prepare_run_dir(cfg)  # before anything is loaded: a bad output_dir fails fast
    model, tokenizer = common.load_policy(cfg, model, tokenizer)
    if common.vision_processor(model, tokenizer, cfg) is not None:
        raise ValueError("online DPO trains text models for now (this one has a vision encoder)")
    model = common.maybe_add_lora(model, cfg)
    pad_id = pad_token_id(tokenizer)
    funcs: list[RewardFn | str] = list(reward_funcs) or list(cfg.rewards)
    if cfg.reward_model:
        from alignkit.reward_model import load_reward_model

        rm, rm_tokenizer = load_reward_model(cfg.reward_model, dtype=cfg.dtype)
        rm = rm.to(hardware.resolve_device(cfg.device))
        funcs.append(reward_model_reward(rm, rm_tokenizer, batch_size=cfg.reward_model_batch_size))
    if not funcs:
        raise ValueError(
            "no reward functions: set cfg.rewards (names or dotted paths) or cfg.reward_model, or pass reward_funcs"
        )
    rows = list(load_rows(train_data or cfg.train_source(), cfg.dataset_split))
    prompts = load_prompts(rows, tokenizer, chat_format=cfg.chat_format, max_prompt_length=cfg.max_prompt_length,
                           name="online_dpo")  # fmt: skip
    rewards = RewardSet(funcs, cfg.reward_weights, max_failed_steps=cfg.max_reward_failures,
                        columns={k for p in prompts for k in p.columns})  # fmt: skip
    per_round = cfg.prompts_per_step * cfg.steps_per_generation
    spg = cfg.steps_per_generation
    stops = stop_token_ids(model, tokenizer, cfg.stop_tokens)

    # the reference, fixed before any update (a resume loads the trained weights only in start_run)
    frozen = functools.partial(frozen_completion_logps, micro_batch_size=2 * cfg.micro_batch_size, temperature=1.0,
                               shared_prefix=cfg.shared_prefix, pad_id=pad_id, token_chunk=cfg.token_chunk)  # fmt: skip
    if ref_model is None and cfg.ref_model:
        ref_model = load_model_and_tokenizer(cfg.ref_model, dtype=cfg.dtype)[0]
    kind = default_rl_reference_kind(model, ref_model is not None)
    reference = build_reference(kind, model, ReferenceInputs(scorer=lambda m, b: frozen(m, *b), ref_model=ref_model))
    reference = common.parallelize_reference(reference, cfg)

    own_generator = generator is None
    generator = generator or make_generator(
        cfg.backend, model, tokenizer, pad_id=pad_id, seed=cfg.seed, max_batch_size=cfg.generation_batch_size,
        model_dir=cfg.model, backend_kwargs=cfg.backend_kwargs,
    )  # fmt: skip

    run = common.start_run(model, cfg, cfg.max_steps, "online_dpo")
    saved = run.state.get("per_rank", {}).get("round")  # the in-flight round of a resumed run (this rank's share)
    if saved is not None and run.state.get("world_size", 1) != distributed.world_size():
        raise ValueError(
            f"the checkpoint was saved inside a generation round by {run.state.get('world_size', 1)} ranks; resume "
            f"it on as many (now {distributed.world_size()}), or from a checkpoint at a round boundary"
        )
    rnd = PairRound(**saved) if saved is not None else None
    stale = True  # the generator's weights lag the trainer's (after a resume too)
    model.train()
    steps: Any = common.step_range(run, "online_dpo")

    def saved_state(step: int) -> dict[str, Any]:  # a checkpoint inside a round carries it: resume replays it
        return {"per_rank": {"round": asdict(rnd) if step % spg != 0 else None}}

    record: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        r, k = divmod(step, spg)
        sync_s = 0.0
        if k == 0 or rnd is None:
            if stale:
                t_sync = time.perf_counter()
                generator.update_weights(model)
                sync_s, stale = time.perf_counter() - t_sync, False
            # this rank's share of the round's prompts; each prompt's seed is fixed by its place in the round
            places = distributed.shard(range(per_round))
            order = round_prompts(len(prompts), per_round, cfg.seed, r)
            first_stream = cfg.seed * 1_000_003 + r * per_round * cfg.num_generations  # rounds never share one
            rewards.trainer_state = RewardState(global_step=step, max_steps=cfg.max_steps)
            with common.precision(cfg, model):
                rnd = make_pair_round(
                    cfg=cfg, model=model, generator=generator, tokenizer=tokenizer,
                    prompts=[prompts[order[p]] for p in places], rewards=rewards, reference=reference, stops=stops,
                    seeds=[first_stream + p * cfg.num_generations for p in places], pad_id=pad_id,
                )  # fmt: skip
        plan = rnd.micro[k]
        mine = [i for mb in plan for i in mb]
        n_pairs = _global_sum(len(mine))  # the step's pairs over all ranks: the loss's normaliser
        n_chosen_tok = max(_global_sum(sum(len(rnd.chosen_ids[i]) for i in mine)), 1.0)
        acc = StepMetrics(STEP_WEIGHTS, "n_pairs")
        for j, mb in enumerate(plan):
            with distributed.grad_sync(model, last=j == len(plan) - 1):
                with common.precision(cfg, model):
                    loss, metrics = pair_loss(model, rnd, mb, cfg, max(n_pairs, 1.0), n_chosen_tok, pad_id)
                distributed.backward(loss)
            acc.add({"loss": loss.detach(), **metrics})
        if n_pairs == 0:  # no pair anywhere (every prompt tied): no update at all, not a momentum-only one
            model.zero_grad(set_to_none=True)
        stats = acc.result(over_ranks=True) if plan else {"loss": 0.0}
        stats.pop("n_pairs", None)
        grad_norm, lr = common.optimizer_step(run, model, loss=acc.total("loss"))
        stale = True

        done = step + 1
        idx = torch.tensor(mine, dtype=torch.long)
        cs, rs = _global_sum(rnd.chosen_score[idx].sum()), _global_sum(rnd.rejected_score[idx].sum())
        tokens = sum(len(rnd.prompt_ids[i]) * 2 + len(rnd.chosen_ids[i]) + len(rnd.rejected_ids[i]) for i in mine)
        counts = {
            "pairs/kept": int(n_pairs),
            "pairs/tied": int(_global_sum(rnd.tied[k])),
            "pairs/unscorable": int(_global_sum(rnd.unscorable[k])),
            "pairs/chosen_score": cs / n_pairs if n_pairs else math.nan,
            "pairs/rejected_score": rs / n_pairs if n_pairs else math.nan,
            "pairs/score_gap": (cs - rs) / n_pairs if n_pairs else math.nan,
            "num_tokens": int(_global_sum(tokens)),
        }
        record = common.step_record(done, stats, lr, grad_norm, t0, **counts)
        record.update(distributed.mean_over_ranks(rnd.metrics), round=r, beta=cfg.beta, weight_sync_s=sync_s)
        record["step_time_s"] = time.perf_counter() - t0
        if cfg.progress:
            steps.set_postfix(reward=f"{record.get('reward', math.nan):.3f}", pairs=int(n_pairs))
        every = cfg.log_completions_every
        if every and (done % every == 0 or done == 1):  # rank 0's pairs of the round in effect
            run.log.log_samples(done, rnd.samples)
        common.end_step(run, record, model=model, tokenizer=tokenizer, callbacks=callbacks, extra_state=saved_state)
    run.log.close()
    if own_generator:
        generator.close()
    return {"steps": cfg.max_steps, "last": record, "run_dir": str(run_dir)}
