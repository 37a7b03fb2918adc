"""The online RL loop shared by GRPO and RLOO (they differ in the advantage estimator and the defaults).

Composes: prompts (`data.prompts`) -> a round (`rollout.make_round`: generation by a `rollout` backend, rewards
from `reward_funcs`, old-policy / reference log-probs from `scoring`, advantages from `losses.ADVANTAGES`) ->
`pg_loss` per micro-batch with the aggregation's step normaliser -> `loops.common` -> metrics + checkpoints.

The round is cut into `steps_per_generation` optimizer steps and replayed `num_iterations` times (PPO epochs)
against the stored old log-probs. By default (`shared_prefix`) the completions of one prompt are scored with one
backbone pass over the prompt whose KV cache they all attend to: the prompt's forward and backward are paid once.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from alignkit import distributed
from alignkit.config import import_object
from alignkit.data.loading import load_rows
from alignkit.data.prompts import load_prompts, round_prompts
from alignkit.data.tokenize import resolve_format, tokenizer_switches
from alignkit.loops import common
from alignkit.loops.config import DatasetBlock, LoRABlock, ModelBlock, OptimBlock, RunBlock, require
from alignkit.losses.advantages import ADVANTAGES
from alignkit.losses.aggregation import AGGREGATIONS, step_count
from alignkit.losses.policy import pg_loss
from alignkit.metrics import StepMetrics
from alignkit.models import load_model_and_tokenizer, pad_token_id
from alignkit.reference import ReferenceInputs, build_reference, default_rl_reference_kind
from alignkit.reward_funcs import RewardSet, RewardState
from alignkit.rollout import Generator, make_generator, stop_token_ids
from alignkit.rollout.async_rollout import AsyncRollouts, WorkerSpec, split_cores
from alignkit.rollout.multi_turn import ToolUse
from alignkit.rollout.round import RolloutBatch, environment_reward, make_round, prepare_round, sample_rows
from alignkit.scoring import completion_logps, frozen_completion_logps

RewardFn = Callable[..., list]


@dataclass
class RLConfig(ModelBlock, DatasetBlock, OptimBlock, LoRABlock, RunBlock):
    """Keys shared by ``GRPOConfig`` and ``RLOOConfig`` (see those for the algorithm-specific defaults)."""

    output_dir: str = "runs/rl"
    ref_model: str | None = None  # None: frozen copy of the initial policy (LoRA: the adapter switched off)
    dataset: str = ""  # rows with `prompt` (str or messages) or `messages`, plus columns for the rewards
    chat_format: str | None = None  # for conversational prompts; None = detect from the tokenizer
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens
    # rewards: built-in names or dotted paths `pkg.module.fn`; weights default to 1
    rewards: list[str] = field(default_factory=list)  # reward names (reward_funcs.REWARDS) or dotted paths
    reward_weights: list[float] | None = None  # one weight per reward (None: all 1)
    max_reward_failures: int = 3  # stop when a reward raises on every sample of this many rounds in a row (0: never)
    # generation
    backend: str = "hf"  # hf | vllm_colocate | vllm_server, or a dotted path to a factory (GENERATOR_BACKENDS)
    backend_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"base_url": "http://127.0.0.1:8000"}
    group_size: int = 8  # completions per prompt (TRL num_generations)
    prompts_per_step: int = 8  # prompts per optimizer step (each step trains on prompts_per_step * group_size)
    steps_per_generation: int = 1  # optimizer steps cut from one generation round
    num_iterations: int = 1  # PPO epochs over a generation round
    max_new_tokens: int = 256  # completion length cap
    temperature: float = 1.0  # sampling AND trainer log-prob temperature (they must agree)
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = -1  # sample among the k most likely tokens (-1: all)
    stop_tokens: list[str] = field(default_factory=list)  # extra stop tokens besides the eos ids
    generation_batch_size: int | None = None  # sequences per generate call (hf backend)
    # multi-turn tool use (alignkit.rollout.multi_turn): tools as dotted paths `pkg.module:function`, environments
    # as dotted paths to classes (one, or {name: path} routed by the row's `environment_column`)
    tools: list[str] = field(default_factory=list)  # standalone tool functions (schemas from their type hints)
    environment: str | dict[str, str] | None = None  # environment class(es): reset(row), tools as methods, reward()
    environment_column: str = "environment"  # the row field naming its environment (several environments)
    max_tool_calls: int = 8  # tool calls per rollout (the next turn's calls over it end the rollout)
    max_completion_length: int = 1024  # tokens of a tool rollout after its prompt: model turns, results and glue
    tool_timeout_s: float = 30.0  # per tool call; a call over it returns a timeout error to the model
    tool_max_output_chars: int = 4096  # a tool result is cut to this many characters
    tool_schemas_in_prompt: bool = True  # show the tools' schemas in the prompt (false: a model SFT'd on the tools)
    turn_advantage_coef: float = 1.0  # weight of turn-level advantages (environments whose reward() scores each turn)
    # advantages (alignkit.losses.advantages.ADVANTAGES; an estimator takes the options it knows)
    advantage: str = "grpo"  # advantage estimator by name (losses.advantages.ADVANTAGES)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # GRPO std scale (none = Dr.GRPO)
    # several rewards: normalise their weighted sum, or each first
    multi_reward: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    normalize_advantages: bool = False  # RLOO: z-score the advantages over the round
    advantage_eps: float = 1e-4  # added to the std that scales advantages
    # KL to the reference
    kl_coef: float = 0.0  # weight of the KL to the reference (0: no reference pass)
    kl_kind: str = "k3"  # KL estimator: k1 | k2 | k3 | abs | low_var (losses.policy.KL_ESTIMATORS)
    kl_placement: Literal["loss", "reward"] = "loss"  # KL as a loss term, or subtracted from the reward
    kl_is_weight: bool = True  # in-loss KL multiplied by the ratio (TRL use_bias_correction_kl)
    # policy loss (alignkit.losses.policy.pg_loss)
    loss: str = "ppo_clip"  # ppo_clip | cispo | sapo | gmpo | reinforce | vespo
    ratio_level: str = "token"  # token | sequence (GSPO) | sequence_sum
    ratio_low: float | None = None  # absolute bounds; None = the loss's defaults (ppo_clip: 0.8 / 1.2)
    ratio_high: float | None = None  # upper bound of the importance ratio (see ratio_low)
    dual_clip: float | None = None  # dual-clip constant c > 1 bounding negative-advantage losses (None: off)
    max_log_ratio: float | None = None  # clamp of the log importance ratio before exp (None: none)
    agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum | token_sum_constant
    entropy_coef: float = 0.0  # entropy bonus coefficient (token mean)
    log_completions_every: int = 10  # steps between sample completions (completions.jsonl, trackers); 0: never
    log_completions_n: int = 8  # completions per sample (the round's first, whole groups first)
    mask_truncated: bool = False  # completions cut at max_new_tokens add nothing to the loss
    # trainer-vs-sampler importance sampling (None = off)
    rollout_is: Literal["truncate", "mask", "seq_mask_token_truncate"] | None = None
    # trainer-vs-sampler IS weights per token or per sequence
    rollout_is_level: Literal["token", "sequence"] = "sequence"
    is_low: float | None = None  # lower bound of the rollout IS weights (mask modes)
    is_high: float | None = 3.0  # upper bound of the rollout IS weights (truncated or masked above)
    # async rollouts (alignkit.rollout.async_rollout): generation and rewards in worker processes
    async_rollout: bool = False  # generate in rollout worker processes while the trainer steps
    max_staleness: int = 1  # drop rounds sampled more than this many optimizer steps ago (0: synchronous)
    queue_size: int | None = None  # rounds asked for ahead of the one training (None: max_staleness + 1)
    rollout_workers: int = 1  # generation worker processes (each pinned to its share of the cores)
    worker_threads: int | None = None  # threads per worker and for the trainer (None: an equal share of the cores)
    sync_every: int = 1  # optimizer steps between weight publications to the workers
    # the old policy of a stale round: the sampler's log-probs (bypass), or recomputed at the round's start
    # (decoupled PPO: the ratio against that proximal policy; add rollout_is for the behaviour correction)
    off_policy: Literal["bypass", "decoupled"] = "bypass"
    max_worker_restarts: int = 2  # restarts of dead rollout workers before the run stops
    worker_timeout_s: float = 600.0  # longest wait for one round from the workers
    # optimisation
    max_steps: int = 100  # optimizer steps of the run
    micro_batch_size: int = 8  # completions per forward/backward
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    token_chunk: int = 1024
    shared_prefix: bool = True  # score a group's completions with one pass over their shared prompt
    keep_logits_mb: float = 1024  # keep a micro-batch's LM-head logits up to this size for backward (0: recompute)

    def check(self) -> None:
        for key in ("group_size", "prompts_per_step", "steps_per_generation", "num_iterations", "micro_batch_size",
                    "max_new_tokens", "max_steps"):  # fmt: skip
            require(self, getattr(self, key) >= 1, key, "an integer >= 1")
        require(
            self, self.temperature > 0, "temperature", "> 0: RL samples, and the trainer scores at that temperature"
        )
        require(self, self.advantage in ADVANTAGES, "advantage", f"one of {sorted(ADVANTAGES)}")
        require(self, self.agg in AGGREGATIONS, "agg", f"one of {sorted(AGGREGATIONS)}")
        require(self, self.kl_coef >= 0, "kl_coef", "a number >= 0")
        require(self, self.log_completions_every >= 0, "log_completions_every", "an integer >= 0 (0: never)")
        if self.async_rollout:
            require(self, self.max_staleness >= 0, "max_staleness", "an integer >= 0")
            require(self, self.queue_size is None or self.queue_size >= 1, "queue_size", "an integer >= 1 (or none)")
            require(self, self.rollout_workers >= 1, "rollout_workers", "an integer >= 1")
            require(self, self.sync_every >= 1, "sync_every", "an integer >= 1")
            require(
                self,
                self.backend in ("hf", "vllm_server"),
                "backend",
                "hf (worker processes) or vllm_server (a worker thread per server) with async_rollout=true",
            )
            require(self, self.lora_r == 0, "lora_r", "0 with async_rollout=true (workers copy full weights)")
            require(self, self.nproc == 1, "nproc", "1 with async_rollout=true (one trainer process)")
        require(self, self.log_completions_n >= 1, "log_completions_n", "an integer >= 1")
        require(self, 0 < self.top_p <= 1, "top_p", "a probability in (0, 1]")
        world = (
            distributed.env_world_size()
        )  # several ranks: each generates and trains on its share of every step's prompts
        require(self, self.prompts_per_step % world == 0, "prompts_per_step",
                f"a multiple of the WORLD_SIZE={world} ranks (each rank takes whole groups)")  # fmt: skip
        require(self, world == 1 or (self.scale_rewards != "batch" and not self.normalize_advantages),
                "scale_rewards", "group or none (and normalize_advantages=false) under several ranks: batch-level "
                "advantage statistics are not gathered across ranks yet")  # fmt: skip
        if self.tools or self.environment:
            require(self, self.max_tool_calls >= 0, "max_tool_calls", "an integer >= 0")
            require(self, self.max_completion_length >= 1, "max_completion_length", "an integer >= 1")
            require(self, self.tool_timeout_s > 0, "tool_timeout_s", "a number of seconds > 0")
            require(self, world == 1 and self.nproc == 1, "nproc", "1 with tools (several ranks: not yet)")
        folded = self.kl_placement == "reward" and self.kl_coef > 0
        require(self, not (folded and self.multi_reward == "normalize_then_sum"), "multi_reward",
                "sum_then_normalize when kl_placement='reward' folds the KL into one summed reward")  # fmt: skip


def advantage_fn(cfg: RLConfig) -> Callable[[Tensor, Tensor | None], tuple[Tensor, dict[str, Tensor]]]:
    """``ADVANTAGES[cfg.advantage]`` with the group size and the config options it takes."""
    try:
        estimator = ADVANTAGES[cfg.advantage]
    except KeyError:
        raise ValueError(f"unknown advantage {cfg.advantage!r}; expected one of {sorted(ADVANTAGES)}") from None
    options = {"scale": cfg.scale_rewards, "multi_reward": cfg.multi_reward, "normalize": cfg.normalize_advantages,
               "eps": cfg.advantage_eps}  # fmt: skip
    known = inspect.signature(estimator).parameters
    options = {k: v for k, v in options.items() if k in known}
    return lambda R, weights: estimator(R, group_size=cfg.group_size, reward_weights=weights, **options)


def _scoring_kwargs(cfg: RLConfig, pad_id: int, vision: Any = None) -> dict[str, Any]:
    return dict(temperature=cfg.temperature, shared_prefix=cfg.shared_prefix, pad_id=pad_id,
                token_chunk=cfg.token_chunk, keep_logits_mb=cfg.keep_logits_mb, vision=vision)  # fmt: skip


def tool_use_from(
    cfg: RLConfig, tools: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]] = (),
    environment_factory: Callable[[], Any] | Mapping[str, Callable[[], Any]] | None = None,
) -> ToolUse | None:  # fmt: skip
    """The run's :class:`ToolUse` from ``cfg.tools`` / ``cfg.environment`` (dotted paths) and the objects passed
    to the loop (callables; a mapping names them), or None when the run uses no tools."""
    named = dict(tools) if isinstance(tools, Mapping) else {fn.__name__: fn for fn in tools}
    for path in cfg.tools:
        fn = import_object(path, "tool")
        named[getattr(fn, "__name__", path.rpartition(".")[2])] = fn
    envs: dict[str | None, Callable[[], Any]] = {}
    if environment_factory is not None:
        envs = dict(environment_factory) if isinstance(environment_factory, Mapping) else {None: environment_factory}
    elif isinstance(cfg.environment, str):
        envs = {None: import_object(cfg.environment, "environment")}
    elif cfg.environment:
        envs = {name: import_object(path, "environment") for name, path in cfg.environment.items()}
    if not named and not envs:
        return None
    return ToolUse(named, envs, environment_column=cfg.environment_column, max_tool_calls=cfg.max_tool_calls,
                   max_completion_length=cfg.max_completion_length, timeout_s=cfg.tool_timeout_s,
                   max_output_chars=cfg.tool_max_output_chars,
                   schemas_in_prompt=cfg.tool_schemas_in_prompt)  # fmt: skip


def _environment_rewards(tool_use: ToolUse | None) -> list[RewardFn]:
    """``environment_reward`` when an environment scores its rollouts (has ``reward`` or ``get_reward``)."""
    if tool_use is None or not any(
        hasattr(f, h) for f in tool_use.environments.values() for h in ("reward", "get_reward")
    ):
        return []
    return [environment_reward]


def micro_loss(
    model: torch.nn.Module, batch: RolloutBatch, rows: list[int], cfg: RLConfig, normalizer: float, n_tokens: float,
    vision: Any = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """``pg_loss`` of the completions ``rows`` of the round, scaled by the step's normaliser."""
    entropy = cfg.entropy_coef != 0
    res = completion_logps(
        model,
        [batch.prompt_ids[i] for i in rows],
        [batch.completion_ids[i] for i in rows],
        extras=("entropy",),  # logged always (TRL does); in the loss only with entropy_coef
        images=None if batch.images is None else [batch.images[i] for i in rows],
        **_scoring_kwargs(cfg, 0, vision),
    )
    logp, mask = res["logps"], res["mask"]  # [b, L]: completion-aligned like the round's stored tensors
    width = logp.shape[1]

    def full(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[rows][:, :width].to(logp.device)

    # the round's mask: tool results and template glue between turns are not trained (tool rollouts)
    m = mask & full(batch.cmask) & batch.keep[rows].to(mask.device).unsqueeze(1)
    A = batch.advantages[rows]
    return pg_loss(
        logp,
        full(batch.old_logps),
        (A if A.dim() == 1 else A[:, :width]).to(logp.device),
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


def round_normalizer(batch: RolloutBatch, rows: Sequence[int], cfg: RLConfig) -> float:
    """The aggregation's D over ALL micro-batches of the step made of the round's ``rows`` (masked truncated
    completions do not count), summed over the ranks' shares before it is clamped to >= 1."""
    counted = batch.cmask[rows] & batch.keep[rows].unsqueeze(1)
    tool_run = batch.rollout_index is not None
    local = step_count(cfg.agg, counted, cfg.max_completion_length if tool_run else cfg.max_new_tokens)
    return max(float(distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64))), 1.0)


# summed over micro-batches (already divided by the step's normaliser, or counts); the rest are token-weighted
STEP_WEIGHTS = {"loss": None, "policy_loss": None, "n_tokens": None, "n_seqs": None}


def train_policy_gradient(
    cfg: RLConfig,
    *,
    name: str,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    reward_funcs: Sequence[RewardFn | str] = (),
    generator: Generator | None = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    tools: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]] = (),
    environment_factory: Callable[[], Any] | Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Run GRPO / RLOO (``name`` labels logs). See the module docstring for the order of operations.

    ``tools`` / ``environment_factory`` (or ``cfg.tools`` / ``cfg.environment``) make every completion a multi-turn
    tool rollout (``alignkit.rollout.multi_turn``)."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    common.prepare_run_dir(cfg)  # before anything is loaded: a bad output_dir fails fast
    model, tokenizer = common.load_policy(cfg, model, tokenizer)
    vision = common.vision_processor(model, tokenizer, cfg)  # None for a text model
    if vision is not None and (cfg.async_rollout or (generator is None and cfg.backend != "hf")):
        raise ValueError(
            "vision-language models generate with the hf backend, synchronously, for now (set backend: hf, "
            "async_rollout: false); vLLM and async rollouts with images are not supported yet"
        )
    tool_use = tool_use_from(cfg, tools, environment_factory)
    if tool_use is not None and (vision is not None or distributed.world_size() > 1):
        raise ValueError("tool rollouts run with a text model in one trainer process for now (several ranks and "
                         "vision-language tool rollouts are not supported yet)")  # fmt: skip
    model = common.maybe_add_lora(model, cfg)
    pad_id = pad_token_id(tokenizer)
    env_rewards = _environment_rewards(tool_use)
    if not (reward_funcs or cfg.rewards or env_rewards):
        raise ValueError("no reward functions: set cfg.rewards (names or dotted paths) or pass reward_funcs")
    rows = list(load_rows(train_data or cfg.train_source(), cfg.dataset_split))
    # a tool run's prompts are checked (and cut) as shown with every tool; each rollout renders its own
    tool_switches = {"tools": tool_use.schemas()} if tool_use is not None and tool_use.schemas_in_prompt else None
    prompts = load_prompts(
        rows, tokenizer, chat_format=cfg.chat_format, max_prompt_length=cfg.max_prompt_length, name=name,
        vision=vision, switches=tool_switches,
    )  # fmt: skip
    if tool_use is not None and prompts.truncated_rows:
        raise ValueError(f"tool rollouts render whole prompts and do not cut them: {prompts.report()}; raise "
                         "max_prompt_length (or set it to null) or shorten those prompts")  # fmt: skip
    # built knowing the columns: a reward needing a parameter nobody passes is refused before any generation
    tool_columns = {"trajectory", "environment_reward"} if tool_use is not None else set()
    rewards = RewardSet(
        [*(list(reward_funcs) or cfg.rewards), *env_rewards],
        None if cfg.reward_weights is None else [*cfg.reward_weights, *[1.0] * len(env_rewards)],
        max_failed_steps=cfg.max_reward_failures, columns={k for p in prompts for k in p.columns} | tool_columns,
    )  # fmt: skip
    tool_round = {}
    if tool_use is not None:  # the chat format renders the tool results and the next generation prompt
        fmt = resolve_format(tokenizer, cfg.chat_format)
        tool_round = dict(tool_use=tool_use, chat_format=fmt, switches=tokenizer_switches(tokenizer, fmt),
                          turn_advantage_coef=cfg.turn_advantage_coef)  # fmt: skip
    per_round = cfg.prompts_per_step * cfg.steps_per_generation
    steps_per_round = cfg.steps_per_generation * cfg.num_iterations
    stops = stop_token_ids(model, tokenizer, cfg.stop_tokens)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)

    # no-grad passes of a round: the old policy (once it moves within the round, for IS, for KL in the reward)
    # and the reference (for any KL)
    frozen = functools.partial(frozen_completion_logps, micro_batch_size=cfg.micro_batch_size,
                               **_scoring_kwargs(cfg, pad_id, vision))  # fmt: skip
    kl_reward = cfg.kl_coef > 0 and cfg.kl_placement == "reward"
    need_old = cfg.num_iterations > 1 or cfg.steps_per_generation > 1 or cfg.rollout_is is not None or kl_reward
    reference = None
    if cfg.kl_coef > 0:
        ref_model = None
        if cfg.ref_model is not None:
            ref_model = load_model_and_tokenizer(cfg.ref_model, dtype=cfg.dtype)[0]
        kind = default_rl_reference_kind(model, ref_model is not None)
        reference = build_reference(
            kind, model, ReferenceInputs(scorer=lambda m, b: frozen(m, *b), ref_model=ref_model)
        )
        reference = common.parallelize_reference(reference, cfg)
    rollout_is = None
    if cfg.rollout_is is not None:
        rollout_is = dict(level=cfg.rollout_is_level, mode=cfg.rollout_is, is_low=cfg.is_low, is_high=cfg.is_high)
    source = None
    if cfg.async_rollout:  # rounds from worker processes; the trainer makes no generator of its own
        if distributed.world_size() > 1:
            raise ValueError("async_rollout=true runs one trainer process (several ranks are not supported yet)")
        trainer_cores, worker_cores, threads = split_cores(cfg.rollout_workers, cfg.worker_threads)
        if cfg.backend != "hf" or generator is not None:  # engine threads share this process: nothing to pin
            trainer_cores, worker_cores, threads = [], [], None
        spec = WorkerSpec(
            tokenizer=tokenizer, prompts=list(prompts),
            reward_funcs=[*(list(reward_funcs) or cfg.rewards), *env_rewards], reward_weights=rewards.weights.tolist(),
            max_reward_failures=cfg.max_reward_failures, group_size=cfg.group_size,
            sampling=sampling, stops=stops, pad_id=pad_id, max_batch_size=cfg.generation_batch_size,
            max_steps=cfg.max_steps, threads=threads,
            tool_round={k: v for k, v in tool_round.items() if k != "turn_advantage_coef"},
        )  # fmt: skip

        def plan(rnd: int) -> tuple[list[int], list[int]]:  # the round the synchronous loop would make
            first_stream = cfg.seed * 1_000_003 + rnd * per_round * cfg.group_size
            return round_prompts(len(prompts), per_round, cfg.seed, rnd), [
                first_stream + p * cfg.group_size for p in range(per_round)
            ]

    engines: list[Generator] = []
    if cfg.async_rollout and (generator is not None or cfg.backend != "hf"):  # remote engines: worker threads
        if generator is not None:
            engines = [generator]
        else:  # backend_kwargs base_url: one server, or a list of them (one worker thread each)
            urls = cfg.backend_kwargs.get("base_url")
            kwargs = [{**cfg.backend_kwargs, "base_url": u} for u in urls] if isinstance(urls, list) else [
                cfg.backend_kwargs]  # fmt: skip
            engines = [make_generator(cfg.backend, model, tokenizer, pad_id=pad_id, seed=cfg.seed, model_dir=cfg.model,
                                      backend_kwargs=kw) for kw in kwargs]  # fmt: skip
    own_engines = generator is None  # engines this loop made are closed at its end; a passed one is the caller's
    own_generator = generator is None and not cfg.async_rollout
    backend_kwargs = {**cfg.backend_kwargs, **({"vision": vision} if vision is not None else {})}
    generator = None if cfg.async_rollout else generator or make_generator(
        cfg.backend, model, tokenizer, pad_id=pad_id, seed=cfg.seed, max_batch_size=cfg.generation_batch_size,
        model_dir=cfg.model, backend_kwargs=backend_kwargs,
    )  # fmt: skip

    run = common.start_run(model, cfg, cfg.max_steps, name)
    # the in-flight round of a resumed run (this rank's share); stale: the engine may not hold the trainer's weights
    saved_round = run.state.get("per_rank", {}).get("round")
    if saved_round is not None and run.state.get("world_size", 1) != distributed.world_size():
        raise ValueError(
            f"the checkpoint was saved inside a generation round by {run.state.get('world_size', 1)} ranks; resume "
            f"it on as many (now {distributed.world_size()}), or from a checkpoint at a round boundary"
        )
    batch = RolloutBatch(**saved_round) if saved_round is not None else None
    if cfg.async_rollout:  # workers start from the weights the run starts (or resumes) from; the queue is new
        source = AsyncRollouts(
            model, spec, plan, workers=cfg.rollout_workers, max_staleness=cfg.max_staleness,
            queue_size=cfg.queue_size, max_restarts=cfg.max_worker_restarts, timeout_s=cfg.worker_timeout_s,
            worker_cores=worker_cores, trainer_cores=trainer_cores, threads=threads, version=run.start,
            engines=engines,
        )  # fmt: skip
        if engines:  # the engines start from the weights the run starts (or resumes) from
            source.publish(model, run.start)
    stale = True
    model.train()
    steps: Any = common.step_range(run, name)

    def saved_state(step: int) -> dict[str, Any]:  # a checkpoint inside a round carries it: resume replays it
        return {"per_rank": {"round": asdict(batch) if step % steps_per_round != 0 else None}}

    record: dict[str, Any] = {}
    async_stats: dict[str, float] = {}
    reference_logps = (lambda p, c, im=None: reference.logps(model, (p, c, im))) if reference is not None else None
    try:  # the rollout workers stop however the loop ends
        for step in steps:
            t0 = time.perf_counter()
            rnd, k = divmod(step, steps_per_round)
            sync_s = 0.0
            if (k == 0 or batch is None) and source is not None:
                scored, async_stats = source.next_round(rnd, version=step, step=step)
                # a round the current weights sampled is on-policy, as in the synchronous loop; an older one takes
                # the sampler's log-probs as the old policy (bypass) or the current policy's (decoupled)
                behind = scored.version < step
                recompute = (need_old and not behind) or (behind and cfg.off_policy == "decoupled")
                with common.precision(cfg, model):
                    batch = prepare_round(
                        scored, rewards=rewards, advantage_fn=advantage_fn(cfg),
                        old_logps_fn=functools.partial(frozen, model) if recompute else None,
                        reference_logps_fn=reference_logps,
                        kl_in_reward=(cfg.kl_coef, cfg.kl_kind) if kl_reward else None, rollout_is=rollout_is,
                        mask_truncated=cfg.mask_truncated, sampler_as_old=behind and cfg.off_policy == "bypass",
                        turn_advantage=(cfg.group_size, cfg.turn_advantage_coef) if tool_use is not None else None,
                    )  # fmt: skip
            elif k == 0 or batch is None:
                if stale:
                    t_sync = time.perf_counter()
                    generator.update_weights(model)
                    sync_s, stale = time.perf_counter() - t_sync, False
                # this rank's share of the round's prompts (whole groups: a group's advantages need no other rank); each
                # prompt's seed is fixed by its place in the round, so the samples do not depend on the number of ranks
                places = distributed.shard(range(per_round))
                round_idx = round_prompts(len(prompts), per_round, cfg.seed, rnd)
                idx = [round_idx[p] for p in places]
                first_stream = cfg.seed * 1_000_003 + rnd * per_round * cfg.group_size  # rounds never share a stream
                rewards.trainer_state = RewardState(global_step=step, max_steps=cfg.max_steps)  # TRL-style rewards
                with common.precision(cfg, model):
                    batch = make_round(
                        generator=generator,
                        tokenizer=tokenizer,
                        prompts=[prompts[i] for i in idx],
                        rewards=rewards,
                        group_size=cfg.group_size,
                        sampling=sampling,
                        stops=stops,
                        seed=[first_stream + p * cfg.group_size for p in places],
                        advantage_fn=advantage_fn(cfg),
                        old_logps_fn=functools.partial(frozen, model) if need_old else None,
                        reference_logps_fn=reference_logps,
                        kl_in_reward=(cfg.kl_coef, cfg.kl_kind) if kl_reward else None,
                        rollout_is=rollout_is,
                        mask_truncated=cfg.mask_truncated,
                        **tool_round,
                    )
            # this step's slice of the round: whole groups, so each step sees complete groups
            chunk = k % cfg.steps_per_generation
            n = cfg.prompts_per_step // distributed.world_size() * cfg.group_size
            rows = batch.rows_of(range(chunk * n, (chunk + 1) * n))
            # the normalisers count the whole step: every rank's rows
            normalizer = round_normalizer(batch, rows, cfg)
            counted = float((batch.cmask[rows] & batch.keep[rows].unsqueeze(1)).sum())
            n_tokens = max(float(distributed.all_reduce_sum(torch.tensor(counted, dtype=torch.float64))), 1.0)
            acc = StepMetrics(STEP_WEIGHTS, "n_tokens")
            micro = [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
            for j, mb in enumerate(micro):
                with distributed.grad_sync(model, last=j == len(micro) - 1):
                    with common.precision(cfg, model):
                        loss, metrics = micro_loss(model, batch, mb, cfg, normalizer, n_tokens, vision)
                    distributed.backward(loss)
                acc.add(metrics)
            grad_norm, lr = common.optimizer_step(run, model, loss=acc.total("loss"))
            stale = True
            if source is not None and ((step + 1) % cfg.sync_every == 0 or step + 1 == cfg.max_steps):
                t_sync = time.perf_counter()
                source.publish(model, step + 1)  # version = optimizer steps done
                sync_s = time.perf_counter() - t_sync

            done = step + 1
            round_metrics = distributed.mean_over_ranks(batch.metrics)  # ranks' rounds are equal in size
            record = {"step": done, **acc.result(over_ranks=True), "lr": lr, "grad_norm": grad_norm, **round_metrics}
            record.update(round=rnd, iteration=k // cfg.steps_per_generation, weight_sync_s=sync_s, **async_stats)
            num_tokens = sum(len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in rows)
            record["num_tokens"] = int(distributed.all_reduce_sum(torch.tensor(num_tokens)))
            record["step_time_s"] = time.perf_counter() - t0
            if cfg.progress:
                steps.set_postfix(reward=f"{record.get('reward', float('nan')):.3f}")
            every = cfg.log_completions_every
            if every and (done % every == 0 or done == 1):  # rank 0's share of the round in effect
                run.log.log_samples(done, sample_rows(batch, tokenizer, rewards.names, cfg.log_completions_n))
            common.end_step(run, record, model=model, tokenizer=vision or tokenizer, callbacks=callbacks,
                            extra_state=saved_state)  # fmt: skip
    finally:
        if source is not None:
            source.close()
        for engine in engines if own_engines else []:
            engine.close()
    run.log.close()
    if own_generator:
        generator.close()
    out = {"steps": cfg.max_steps, "last": record, "run_dir": str(run_dir)}
    if source is not None:  # each consumed or dropped round's versions
        out["async_rounds"] = source.events
    return out
