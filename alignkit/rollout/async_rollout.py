"""Async rollouts: generation and reward scoring in worker processes; the trainer takes rounds from a bounded queue.

Each worker is a spawned process with its own copy of the policy (HF backend), pinned to its own CPU cores with its
own thread count; it generates a round's completions, scores them with the reward functions and sends back a
:class:`~alignkit.rollout.round.ScoredRollouts` tagged with the policy **version** (optimizer steps) whose weights
sampled it. Weights travel through shared memory: the trainer copies its parameters into one shared buffer per
tensor (``publish``, every ``sync_every`` steps) and bumps the version; a worker copies them into its own model
before its next request (never during one, so a sample has one version).

Staleness: a round consumed at trainer version ``v`` generated at version ``g`` is ``v - g`` versions stale; above
``max_staleness`` it is dropped (counted) and asked for again. At most ``queue_size`` rounds (default
``max_staleness + 1``) are requested ahead of the one being consumed, so with ``sync_every=1`` the limit holds
without drops; a larger queue or a slower weight sync trades drops for less waiting. ``max_staleness=0`` is the
synchronous algorithm run in another process: every round is generated with the weights of the step before it.

Requests go to the worker with the fewest outstanding; the trainer's wait, each worker's idle time, the queue depth
and the time a result waited are measured per round. The depth asked for ahead adapts within ``[1, queue_size]``:
one fewer round after a drop, or when a result waited longer than a whole round of training (the workers are that
far ahead, so the samples can be fresher at no wait); one more when the trainer had to wait. A worker that dies is
restarted (its requests sent again) up to ``max_restarts`` times, then the run stops naming it;
:meth:`AsyncRollouts.close` (also at interpreter exit) stops every worker, and a worker whose parent has gone
exits on its own.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import os
import pickle
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.data.prompts import Prompt
from alignkit.errors import AlignkitError, RewardFailedError
from alignkit.reward_funcs import RewardSet, RewardState
from alignkit.rollout.hf import HFGenerator
from alignkit.rollout.round import ScoredRollouts, generate_and_score

__all__ = ["AsyncRollouts", "RoundRequest", "WorkerSpec", "RolloutWorkerError", "split_cores"]


class RolloutWorkerError(AlignkitError):
    """A rollout worker died more often than allowed, or did not answer in time."""


@dataclass
class RoundRequest:
    id: int
    round: int
    indices: list[int]  # prompts of the round
    seeds: list[int]  # one per prompt (fixed by its place in the round)
    step: int  # trainer steps done when asked (the reward functions' trainer_state.global_step)


@dataclass
class WorkerSpec:
    """What every worker needs, sent once when it starts."""

    tokenizer: Any
    prompts: list[Prompt]
    reward_funcs: list[Any]  # names, dotted paths or picklable (module-level) callables
    reward_weights: list[float] | None
    max_reward_failures: int
    group_size: int
    sampling: dict[str, Any]
    stops: list[int]
    pad_id: int
    max_batch_size: int | None
    max_steps: int
    threads: int
    cores: list[int] = field(default_factory=list)
    # multi-turn tool rollouts: generate_and_score's tool_use / chat_format / switches (picklable: module-level
    # tools and environment classes), {} for single-turn rounds
    tool_round: dict[str, Any] = field(default_factory=dict)


def split_cores(n_workers: int, threads: int | None = None) -> tuple[list[int], list[list[int]], int]:
    """CPU cores for the trainer and each worker (the trainer first), and each worker's thread count: an equal
    share of the cores this process may use (``threads`` overrides the share's size)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // (n_workers + 1))
    trainer = cores[:share] if len(cores) > n_workers else cores
    workers = [cores[share * (i + 1) : share * (i + 2)] or cores for i in range(n_workers)]
    return trainer, workers, threads or share


def _serve(index: int, generator: Any, spec: WorkerSpec, requests: Any, results: Any, take_weights: Callable[[], int],
           gone: Callable[[], bool]) -> None:  # fmt: skip
    """A worker's loop: take a request, bring the weights up to date (``take_weights`` -> the version it holds),
    generate and score the round, send it. ``gone()``: the trainer is no more (stop)."""
    tool_columns = {"trajectory", "environment_reward"} if spec.tool_round else set()
    rewards = RewardSet(spec.reward_funcs, spec.reward_weights, max_failed_steps=spec.max_reward_failures,
                        columns={k for p in spec.prompts for k in p.columns} | tool_columns)  # fmt: skip
    idle_from = time.perf_counter()
    while True:
        try:
            req = requests.get(timeout=0.5)
        except queue.Empty:
            if gone():
                return
            continue
        if req is None:
            return
        started = time.perf_counter()
        try:
            version = take_weights()
            rewards.trainer_state = RewardState(global_step=req.step, max_steps=spec.max_steps)
            scored = generate_and_score(generator=generator, tokenizer=spec.tokenizer,
                                        prompts=[spec.prompts[i] for i in req.indices], rewards=rewards,
                                        group_size=spec.group_size, sampling=spec.sampling, stops=spec.stops,
                                        seed=req.seeds, **spec.tool_round)  # fmt: skip
            scored.version = version
            # plain lists, not tensors: a tensor would travel as a file descriptor fetched from this process,
            # which fails if it dies before the trainer reads the message
            scored.rewards = scored.rewards.tolist()
            if scored.turn_rewards is not None:
                scored.turn_rewards = scored.turn_rewards.tolist()
            results.put(("ok", index, req.id, scored, started - idle_from, time.perf_counter()))
        except BaseException as e:  # noqa: BLE001 - the trainer raises it, naming this worker
            results.put(("error", index, req.id, type(e).__name__, traceback.format_exc()))
        idle_from = time.perf_counter()


def _process_worker(index: int, spec: WorkerSpec, shared: torch.nn.Module, version: Any, lock: Any, requests: Any,
                    results: Any, parent: int) -> None:  # fmt: skip
    """A rollout worker process: its own copy of the policy, refreshed from the shared buffers."""
    if spec.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cores)
    torch.set_num_threads(spec.threads)
    model = copy.deepcopy(shared).eval()  # private: the shared buffers change under it only through a copy
    held = [-1]

    def take_weights() -> int:
        if version.value != held[0]:
            with lock:
                for dst, src in zip(model.state_dict().values(), shared.state_dict().values()):
                    dst.copy_(src)
                held[0] = version.value
        return held[0]

    def gone() -> bool:
        if os.getppid() != parent:  # the trainer was killed: do not outlive it
            results.cancel_join_thread()  # nobody reads the results any more: exit without flushing them
            return True
        return False

    generator = HFGenerator(model, spec.pad_id, max_batch_size=spec.max_batch_size)
    _serve(index, generator, spec, requests, results, take_weights, gone)


class _EngineWorker:
    """A rollout worker thread over a remote engine (a vLLM server): generation runs in the server, this thread
    waits on it and scores the rewards. The trainer pushes weights into the engine itself (``publish``), holding
    ``lock``, so a push happens between two of this worker's rounds."""

    def __init__(self, index: int, engine: Any, spec: WorkerSpec, results: Any, version: int) -> None:
        self.engine, self.lock, self.version = engine, threading.Lock(), version
        self.requests: queue.Queue = queue.Queue()
        self.stopped = False

        def take_weights() -> int:
            return self.version

        def serve() -> None:
            with_lock = _Locked(engine, self.lock)
            _serve(index, with_lock, spec, self.requests, results, take_weights, lambda: self.stopped)

        self.thread = threading.Thread(target=serve, name=f"alignkit-rollout-{index}", daemon=True)
        self.thread.start()

    @property
    def pid(self) -> str:
        return f"thread {self.thread.name} over {getattr(self.engine, 'base_url', type(self.engine).__name__)}"

    exitcode = None

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def terminate(self) -> None:  # a thread cannot be killed: it ends at its next look at `stopped`
        self.stopped = True

    kill = terminate


class _Locked:
    """An engine whose ``generate`` holds a lock (the trainer's weight push takes it between rounds)."""

    def __init__(self, engine: Any, lock: threading.Lock) -> None:
        self.engine, self.lock = engine, lock

    def generate(self, *a: Any, **kw: Any) -> Any:
        with self.lock:
            return self.engine.generate(*a, **kw)


class AsyncRollouts:
    """Rounds from rollout worker processes (see the module docstring).

    Args:
        model: the policy (an unwrapped HF causal LM); its weights at construction are version ``version``.
        spec: the workers' settings (tokenizer, prompts, rewards, sampling).
        plan: ``round -> (prompt indices, seeds)``: the same rounds the synchronous loop would make.
        workers, max_staleness, queue_size, max_restarts, timeout_s: as in the module docstring;
            ``timeout_s`` bounds one wait for a round.
        worker_cores: per worker, the cores to pin it to (``split_cores``); [] leaves it unpinned.
        trainer_cores, threads: this process is pinned to ``trainer_cores`` with ``threads`` torch threads until
            :meth:`close`, which restores what it had.
        engines: remote generators (vLLM servers), one worker thread each, instead of worker processes: the
            trainer pushes its weights into each (``update_weights``) between two of its rounds.
    """

    def __init__(self, model: torch.nn.Module, spec: WorkerSpec, plan: Callable[[int], tuple[list[int], list[int]]],
                 *, workers: int = 1, max_staleness: int = 1, queue_size: int | None = None, max_restarts: int = 2,
                 timeout_s: float = 600.0, worker_cores: Sequence[Sequence[int]] = (),
                 trainer_cores: Sequence[int] = (), threads: int | None = None, version: int = 0,
                 engines: Sequence[Any] = ()) -> None:  # fmt: skip
        ctx = torch.multiprocessing.get_context("spawn")
        self.engines = list(engines)
        workers = len(self.engines) or workers
        self.ctx, self.spec, self.plan = ctx, spec, plan
        self.max_staleness, self.queue_size = max_staleness, queue_size or max_staleness + 1
        self.depth = self.queue_size  # rounds asked for, the consumed one included (adapted in next_round)
        self.last_round_at: float | None = None
        self.max_restarts, self.timeout_s = max_restarts, timeout_s
        self.worker_cores = [list(c) for c in worker_cores] or [[] for _ in range(workers)]
        self.start_version = version
        if not self.engines:  # the weights the worker processes copy from
            self.shared = copy.deepcopy(model).eval().requires_grad_(False)
            self.shared.share_memory()
        self.version = ctx.Value("q", version)
        self.lock = ctx.Lock()
        self.results = ctx.Queue()
        self.requests: list[Any] = [ctx.Queue() for _ in range(workers)]
        self.procs: list[Any] = [None] * workers
        self.restarts = 0
        self.ids = itertools.count()
        self.outstanding: dict[int, tuple[int, RoundRequest, float]] = {}  # id -> (worker, request, sent at)
        self.asked: dict[int, int] = {}  # round -> request id (the live request for it)
        self.ready: dict[int, tuple[ScoredRollouts, float]] = {}  # round -> (result, arrived at)
        self.idle = [0.0] * workers
        self._restore: tuple[Any, int] | None = None
        self.dropped_rounds = self.dropped_samples = 0
        self.events: list[dict[str, Any]] = []  # per consumed or dropped round: its versions (tests, summaries)
        for i in range(workers):
            self._start(i)
        atexit.register(self.close)
        # the trainer on its own cores, so generation and training do not compete for them
        self._restore = (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None, torch.get_num_threads())
        if trainer_cores and self._restore[0] is not None:
            os.sched_setaffinity(0, list(trainer_cores))
        if threads:
            torch.set_num_threads(threads)

    def _start(self, i: int) -> None:
        if self.engines:
            worker = _EngineWorker(i, self.engines[i], self.spec, self.results, self.version.value)
            self.requests[i], self.procs[i] = worker.requests, worker
            return
        spec = copy.copy(self.spec)
        spec.cores = self.worker_cores[i]
        p = self.ctx.Process(target=_process_worker, name=f"alignkit-rollout-{i}", daemon=True,
                             args=(i, spec, self.shared, self.version, self.lock, self.requests[i], self.results,
                                   os.getpid()))  # fmt: skip
        try:
            p.start()
        except (AttributeError, TypeError, pickle.PicklingError) as e:  # a lambda or a local function
            raise ValueError(
                f"async_rollout: the rollout worker cannot receive its settings ({e}); reward functions must be "
                "names, dotted paths or module-level functions"
            ) from e
        self.procs[i] = p

    def publish(self, model: torch.nn.Module, version: int) -> None:
        """Worker processes: copy the trainer's weights into the shared buffers (each takes them before its next
        round). Engines: push them into each engine once its round in progress is done."""
        for w in self.procs:
            if isinstance(w, _EngineWorker):
                with w.lock:
                    w.engine.update_weights(model)
                    w.version = version
        if self.engines:
            self.version.value = version
            return
        with torch.no_grad(), self.lock:
            for dst, src in zip(self.shared.state_dict().values(), model.state_dict().values()):
                dst.copy_(src.detach().to(dst.device, dst.dtype))
            self.version.value = version

    def _ask(self, rnd: int, step: int) -> None:
        indices, seeds = self.plan(rnd)
        req = RoundRequest(next(self.ids), rnd, list(indices), list(seeds), step)
        load = [sum(1 for w, _, _ in self.outstanding.values() if w == i) for i in range(len(self.procs))]
        worker = min(range(len(load)), key=load.__getitem__)  # the least-loaded worker
        self.outstanding[req.id] = (worker, req, time.perf_counter())
        self.asked[rnd] = req.id
        self.requests[worker].put(req)

    def _receive(self, timeout: float) -> bool:
        """Take one message from the workers (False on a timeout); restart a dead worker."""
        try:
            msg = self.results.get(timeout=timeout)
        except queue.Empty:
            self._check_workers()
            return False
        except (EOFError, OSError):  # a message cut off by a worker dying mid-send: that worker is restarted
            self._check_workers()
            return False
        kind, worker, req_id = msg[:3]
        entry = self.outstanding.pop(req_id, None)
        if kind == "error":
            name, tb = msg[3], msg[4]
            cls = RewardFailedError if name == "RewardFailedError" else RolloutWorkerError
            raise cls(f"rollout worker {worker} (pid {self.procs[worker].pid}) failed on a round: {tb}")
        scored, idle, finished_at = msg[3], msg[4], msg[5]
        scored.rewards = torch.tensor(scored.rewards, dtype=torch.float32)
        if scored.turn_rewards is not None:
            scored.turn_rewards = torch.tensor(scored.turn_rewards, dtype=torch.float32)
        self.idle[worker] += idle
        if entry is not None and self.asked.get(entry[1].round) == req_id:  # not superseded by a re-request
            self.ready[entry[1].round] = (scored, finished_at)  # perf_counter is system-wide (CLOCK_MONOTONIC)
        return True

    def _check_workers(self) -> None:
        for i, p in enumerate(self.procs):
            if p.is_alive():
                continue
            if self.restarts >= self.max_restarts:
                raise RolloutWorkerError(
                    f"rollout worker {i} (pid {p.pid}) exited with code {p.exitcode}; restarted {self.restarts} "
                    f"times already (max_worker_restarts={self.max_restarts})"
                )
            self.restarts += 1
            print(f"[alignkit async] rollout worker {i} (pid {p.pid}) exited with code {p.exitcode}: restarting "
                  f"({self.restarts}/{self.max_restarts})", flush=True)  # fmt: skip
            self.requests[i] = self.ctx.Queue()  # a fresh queue: the dead worker's is in an unknown state
            self._start(i)
            for rid, (w, req, _) in list(self.outstanding.items()):
                if w == i:
                    self.outstanding[rid] = (i, req, time.perf_counter())
                    self.requests[i].put(req)

    def next_round(self, rnd: int, version: int, step: int) -> tuple[ScoredRollouts, dict[str, float]]:
        """Round ``rnd`` for the trainer at ``version``, generated at most ``max_staleness`` versions before it
        (staler results are dropped and asked for again); then rounds up to ``rnd + depth - 1`` are asked for
        ahead. Returns the round and its ``async/*`` metrics."""
        t0 = time.perf_counter()
        waited_since = t0
        dropped_before = self.dropped_rounds
        while True:
            if rnd not in self.asked:
                self._ask(rnd, step)
            while rnd not in self.ready:
                if not self._receive(timeout=1.0) and time.perf_counter() - waited_since > self.timeout_s:
                    raise RolloutWorkerError(f"no round from the rollout workers in {self.timeout_s:g} s "
                                             f"(worker_timeout_s)")  # fmt: skip
            scored, arrived = self.ready.pop(rnd)
            del self.asked[rnd]
            stale = version - scored.version
            self.events.append({"round": rnd, "generated": scored.version, "consumed": version,
                                "dropped": stale > self.max_staleness})  # fmt: skip
            if stale <= self.max_staleness:
                break
            self.dropped_rounds += 1
            self.dropped_samples += len(scored.completion_ids)
            waited_since = time.perf_counter()
        wait = time.perf_counter() - t0
        while self._receive(timeout=0.0):  # take what has arrived, so the queue depth is current
            pass
        in_queue = max(0.0, t0 - arrived)  # done before the trainer asked: waited this long
        if self.last_round_at is not None:  # adapt the depth to the last round's training time
            round_time = t0 - self.last_round_at
            if self.dropped_rounds > dropped_before or (in_queue > round_time and self.depth > 1):
                self.depth = max(1, self.depth - 1)  # asked too far ahead: stale, or fresher at no wait
            elif wait > 0.05 * round_time and self.depth < self.queue_size:
                self.depth += 1
        self.last_round_at = time.perf_counter()
        for ahead in range(rnd + 1, rnd + self.depth):
            if ahead not in self.asked and ahead not in self.ready:
                self._ask(ahead, step)
        stats = {
            "async/staleness": float(stale),
            "async/version_generated": float(scored.version),
            "async/dropped_rounds": float(self.dropped_rounds),
            "async/dropped_samples": float(self.dropped_samples),
            "async/queue_depth": float(len(self.ready)),
            "async/in_flight": float(len(self.outstanding)),
            "async/trainer_wait_s": wait,
            "async/time_in_queue_s": in_queue,
            "async/depth": float(self.depth),
            "async/worker_idle_s": sum(self.idle),
            "async/worker_restarts": float(self.restarts),
        }
        self.idle = [0.0] * len(self.idle)
        return scored, stats

    def close(self) -> None:
        """Stop every worker (asked, then terminated, then killed); safe to call twice."""
        for p in self.procs:
            if isinstance(p, _EngineWorker):
                p.stopped = True
        for q, p in zip(self.requests, self.procs):
            if p is not None and p.is_alive():
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            if p is None:
                continue
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = [None] * len(self.procs)
        atexit.unregister(self.close)
        if self._restore is not None:
            cores, threads = self._restore
            if cores is not None:
                os.sched_setaffinity(0, cores)
            torch.set_num_threads(threads)
            self._restore = None
