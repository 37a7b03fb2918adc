"""Reward functions: the contract, a weighted set that calls them safely, and lookup by name or dotted path.

A reward is a callable in one of two calling conventions, told apart by its signature (see ``RewardSet``):

alignkit's, positional::

    reward(prompts, completions: list[str], completion_ids: list[list[int]], **columns) -> list[float | None]

TRL's (``GRPOTrainer`` 1.x), keywords only, e.g. ``def reward(completions, **kwargs)``::

    reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=...,
           **columns) -> list[float | None]

with ``completions`` as ``[{"role": "assistant", "content": text}]`` for conversational prompts (lists of
messages), as TRL gives them. Either may be ``async def`` (awaitables run concurrently). One value per
completion. Extra dataset columns (``answer``, ...) arrive as keyword lists aligned with the completions; a
function without ``**kwargs`` gets only the columns it names. ``None`` means "not applicable to this sample" and
becomes NaN; the advantage functions leave NaN out of their statistics.

``RewardSet`` calls K rewards on one batch and returns a ``[N,K]`` float32 tensor. A reward that raises on the
batch is called again sample by sample: only the samples that still raise are NaN (left out), counted in
``reward_errors/<name>``, the first traceback logged. A reward that raises on every sample of
``max_failed_steps`` calls in a row stops the run with :class:`~alignkit.errors.RewardFailedError` and its last
traceback: a broken reward must not train on zero gradients to the end and exit 0. Bugs raise at once, naming
the reward: a signature that fits neither convention (when the set is built), a column it requires missing from
the batch, a wrong number of values, non-numeric values, and ``inf`` / ``-inf`` (``ValueError``: one infinite
reward makes its whole group's advantages inf / NaN).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import math
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from alignkit.config import import_object
from alignkit.errors import RewardFailedError

__all__ = [
    "REWARDS",
    "RewardFunc",
    "RewardSet",
    "RewardState",
    "TRL_KEYWORDS",
    "combine_rewards",
    "get_reward",
    "register_reward",
    "reward_name",
    "weighted_reward_sum",
]

logger = logging.getLogger(__name__)

RewardValues = Sequence[float | None]
RewardFunc = Callable[..., RewardValues | Awaitable[RewardValues]]

#: name -> factory. ``get_reward(name, **kwargs)`` returns ``REWARDS[name](**kwargs)``, a reward function.
REWARDS: dict[str, Callable[..., RewardFunc]] = {}


def completion_text(completion: Any) -> str:
    """A completion as text: a string as it is; conversational completions (a list of messages): the last
    message's content (what the model wrote); anything else through ``str``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def register_reward(name: str) -> Callable[[Callable[..., RewardFunc]], Callable[..., RewardFunc]]:
    """Decorator: register a reward *factory* under ``name`` (a plain reward is registered via a lambda)."""

    def deco(factory: Callable[..., RewardFunc]) -> Callable[..., RewardFunc]:
        if name in REWARDS:
            raise ValueError(f"a reward called {name!r} is already registered")
        REWARDS[name] = factory
        return factory

    return deco


def get_reward(spec: str | RewardFunc, **kwargs: Any) -> RewardFunc:
    """A reward function by built-in name (``"math_answer"``, ``"format"``, ``"overlong"``, ...), by dotted path
    (``"package.module:function"`` or ``"package.module.function"``), or a callable passed through.

    ``kwargs`` configure a built-in's factory (``get_reward("overlong", max_len=512, buffer=128)``); with a dotted
    path they mean the target is a factory and it is called with them.
    """
    if callable(spec):
        return spec(**kwargs) if kwargs else spec
    if not isinstance(spec, str):
        raise TypeError(f"a reward is a name, a dotted path or a callable, got {type(spec).__name__}")
    if spec in REWARDS:
        return REWARDS[spec](**kwargs)
    if "." not in spec and ":" not in spec:
        raise KeyError(f"unknown reward {spec!r}: built-ins are {sorted(REWARDS)}; or pass 'package.module:function'")
    obj = import_object(spec, "reward")
    if kwargs:
        obj = obj(**kwargs)
    if not callable(obj):
        raise TypeError(f"reward {spec!r} resolves to a non-callable {type(obj).__name__}")
    return obj


def reward_name(func: Any) -> str:
    """A readable name for metrics: ``__name__``, through partials, else the class name."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", None) or type(func).__name__


def _to_column(name: str, values: Any, n: int, offset: int = 0) -> list[float]:
    """A reward's return value -> ``n`` floats (None -> NaN). Wrong length or type, or an infinite value, is a bug:
    raise, naming the reward (``offset``: index of the first value in the batch, for the message)."""
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    elif isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"reward {name!r} must return a list of float | None, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out = []
    for j, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        try:
            x = float(v)
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward {name!r} returned a non-numeric value {v!r}") from e
        if math.isinf(x):
            # not turned into NaN: an infinite score is a bug in the reward, and it would make every advantage of
            # its group inf or NaN
            raise ValueError(
                f"reward {name!r} returned {x} for completion {offset + j}: rewards must be finite "
                "(return None for 'not applicable')"
            )
        out.append(x)
    return out


def _run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion from sync code: ``asyncio.run`` when no loop is running in this thread, else
    on a fresh loop in a helper thread (e.g. called from a notebook, whose loop we must not block re-entrantly)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _gather(awaitables: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*awaitables, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------------------
# calling conventions
# ---------------------------------------------------------------------------------------------------------------

Convention = Literal["alignkit", "trl"]

#: the keywords a TRL-style reward gets besides the dataset columns: what TRL 1.x ``GRPOTrainer._calculate_rewards``
#: passes (it adds ``environments`` only with environments, which alignkit does not have)
TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
_P = inspect.Parameter


@dataclass
class RewardState:
    """What TRL-style rewards receive as ``trainer_state``: the ``transformers.TrainerState`` fields a reward
    schedule reads. The RL loop sets ``RewardSet.trainer_state`` before scoring each round."""

    global_step: int = 0  # optimizer steps done when the round was generated
    max_steps: int = 0


@dataclass(frozen=True)
class _Plan:
    """How one reward is called: its convention, the keywords it takes (None: any, it has ``**kwargs`` or no
    readable signature) and the keywords it cannot do without."""

    convention: Convention
    accepts: frozenset[str] | None
    needs: frozenset[str]


def _fit(params: list[inspect.Parameter], convention: Convention) -> tuple[_Plan | None, str]:
    """``params`` called our way (3 positional arguments, then keywords) or TRL's (keywords only): the plan, or
    None and why it cannot be called like that."""
    slots = 3 if convention == "alignkit" else 0
    filled, accepts, needs, unreachable, star_kw = 0, set(), set(), [], False
    for p in params:
        if p.kind is _P.VAR_KEYWORD:
            star_kw = True
        elif p.kind is _P.VAR_POSITIONAL:
            filled = slots  # *args takes the remaining positional arguments
        elif p.kind is not _P.KEYWORD_ONLY and filled < slots:
            filled += 1
        elif p.kind is _P.POSITIONAL_ONLY:
            if p.default is p.empty:
                unreachable.append(p.name)
        else:
            accepts.add(p.name)
            if p.default is p.empty:
                needs.add(p.name)
    if filled < slots:
        return None, f"it takes {filled} positional argument(s), not 3"
    if unreachable:
        return None, f"it needs {_listed(unreachable)} positionally"
    return _Plan(convention, None if star_kw else frozenset(accepts), frozenset(needs)), ""


def _listed(names: Collection[str]) -> str:
    return ", ".join(f"'{n}'" for n in sorted(names))


def _plan(func: Any, name: str, columns: Collection[str] | None) -> _Plan:
    """Detect ``func``'s calling convention from its signature and check that alignkit can call it.

    alignkit's when the first parameter is ``prompts`` (or ``*args``) and it takes three positional arguments;
    TRL's when it names a TRL keyword otherwise (``def f(completions, **kwargs)``, ``def f(prompts, completions,
    **kwargs)``) or has no positional parameter (``def f(**kwargs)``). A function with three positional parameters
    and none of those names (``def f(p, c, ids, **kw)``) keeps the positional call it always had. A
    ``reward_convention`` attribute (``"alignkit"`` / ``"trl"``) overrides the detection, e.g. for the ambiguous
    ``def f(prompts, completions, completion_ids, **kw)`` written for TRL (detected as ours: texts, not messages).
    Refused (TypeError naming the function and the parameters): a signature the chosen convention cannot call,
    and, when ``columns`` is given, a required parameter that is neither an argument we pass nor a column.
    """
    target = func
    while isinstance(target, functools.partial):
        target = target.func
    forced = getattr(target, "reward_convention", None)
    if forced not in (None, "alignkit", "trl"):
        raise ValueError(f"reward {name!r}: reward_convention must be 'alignkit' or 'trl', got {forced!r}")
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # no readable signature (some builtins): call it our way, unchecked
        return _Plan(forced or "alignkit", None, frozenset())
    params = list(sig.parameters.values())
    ours, ours_why = _fit(params, "alignkit")
    if forced is not None:
        convention = forced
    elif params and (params[0].kind is _P.VAR_POSITIONAL or (params[0].name == "prompts" and ours is not None)):
        convention = "alignkit"
    elif ours is not None and not {p.name for p in params} & set(TRL_KEYWORDS):
        convention = "alignkit"
    else:
        convention = "trl"
    plan, why = (ours, ours_why) if convention == "alignkit" else _fit(params, "trl")
    if plan is not None and columns is not None:
        missing = plan.needs - _passed(plan, columns)
        if missing:
            plan, why = None, f"it needs {_listed(missing)}, which is never passed (dataset columns: {_cols(columns)})"
    if plan is None:
        raise TypeError(
            f"reward {name!r} {name}{sig} cannot be called ({convention} convention): {why}. alignkit calls a "
            "reward as f(prompts, completions, completion_ids, **columns), or TRL-style (first parameter not "
            "'prompts') as f(" + ", ".join(f"{k}=..." for k in TRL_KEYWORDS) + ", **columns)"
        )
    return plan


def _passed(plan: _Plan, columns: Collection[str]) -> set[str]:
    """The keyword names a reward of ``plan`` gets when the batch has ``columns``."""
    return set(columns) | (set(TRL_KEYWORDS) if plan.convention == "trl" else set())


def _cols(columns: Collection[str]) -> str:
    return ", ".join(sorted(columns)) or "none"


def _conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


@dataclass
class _Batch:
    """One call's inputs, and what TRL-style rewards log through ``log_metric`` / ``log_extra``."""

    prompts: list[Any]
    completions: list[Any]
    completion_ids: list[Any]
    columns: dict[str, Any]
    n: int
    logged: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)
    _messages: list[Any] | None = None

    def trl_completions(self) -> list[Any]:
        """Completions as TRL passes them: one assistant message for a conversational prompt, else the text."""
        if self._messages is None:
            self._messages = [
                [{"role": "assistant", "content": c}] if isinstance(c, str) and _conversational(p) else c
                for p, c in zip(self.prompts, self.completions)
            ]
        return self._messages

    def column(self, key: str, i: int | None) -> Any:
        """Column ``key`` for the whole batch (``i`` None) or sample ``i``; unaligned values (scalars) as they are."""
        col = self.columns[key]
        aligned = hasattr(col, "__len__") and not isinstance(col, (str, bytes)) and len(col) == self.n
        return col[i : i + 1] if i is not None and aligned else col

    def log_metric(self, name: str, value: float) -> None:
        """TRL's ``log_metric``: averaged over the call and reported with the set's metrics."""
        self.logged.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        """TRL's ``log_extra`` (a column of its completions table): kept in ``RewardSet.extra_columns``."""
        self.extra.setdefault(column, []).extend(values)


# ---------------------------------------------------------------------------------------------------------------
# RewardSet
# ---------------------------------------------------------------------------------------------------------------

_Key = tuple[int, int | None]  # (reward, sample); sample None = the whole batch


class RewardSet:
    """K reward functions with weights, called together on a batch.

    ``rs(prompts, completions, completion_ids, **columns)`` returns ``(R [N,K] float32, metrics)`` with NaN where
    a reward returned None or raised. Feed ``R`` and ``rs.weights`` to the advantage functions
    (``grpo_advantages(R, reward_weights=rs.weights, ...)``), or ``rs.weighted_sum(R) [N]`` for one column.

    Each function's calling convention is detected from its signature when the set is built (``rs.conventions``;
    see the module docstring and ``_plan``): alignkit's positional ``(prompts, completions, completion_ids,
    **columns)``, or TRL's keywords, which also carry ``trainer_state`` (``rs.trainer_state``, a ``RewardState``
    the RL loop keeps current), ``log_metric(name, value)`` (averaged into the metrics) and ``log_extra(column,
    values)`` (kept in ``rs.extra_columns`` for the last call), and message completions for conversational prompts.
    ``columns`` (the dataset's column names, when known) lets a function that needs a parameter nobody passes be
    refused here rather than at the first call.

    Failures: a reward that raises on the batch is called sample by sample (async ones concurrently); the samples
    that still raise are NaN. ``max_failed_steps`` (None or 0: never) calls in a row on which a reward raised on
    every sample raise :class:`~alignkit.errors.RewardFailedError` with its last traceback.

    Metrics (detached float32 scalars): ``rewards/<name>/mean`` and ``/std`` (over the present values, NaN
    when none), ``rewards/<name>/frac_none``, ``reward_errors/<name>`` (samples on which that reward raised in
    this batch), ``reward`` (mean weighted sum over scorable rows), plus what TRL-style rewards ``log_metric``.
    ``error_counts`` keeps the failed samples since creation.
    """

    def __init__(
        self,
        funcs: Sequence[RewardFunc | str],
        weights: Sequence[float] | Tensor | None = None,
        names: Sequence[str] | None = None,
        *,
        max_failed_steps: int | None = 3,
        columns: Collection[str] | None = None,
    ) -> None:
        if isinstance(funcs, (str, bytes)) or callable(funcs):
            funcs = [funcs]
        if len(funcs) == 0:
            raise ValueError("RewardSet needs at least one reward function")
        self.funcs: list[RewardFunc] = [get_reward(f) for f in funcs]
        if names is None:
            names = [f.rpartition(":")[2].rpartition(".")[2] if isinstance(f, str) else reward_name(f) for f in funcs]
        if len(names) != len(self.funcs):
            raise ValueError(f"{len(names)} names for {len(self.funcs)} reward functions")
        self.names = _unique(list(names))
        w = torch.ones(len(self.funcs)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (len(self.funcs),):
            raise ValueError(f"weights must have one value per reward ({len(self.funcs)}), got shape {tuple(w.shape)}")
        self.weights: Tensor = w.float().cpu()
        if max_failed_steps is not None and max_failed_steps < 0:
            raise ValueError(f"max_failed_steps must be >= 0 (0 or None: never stop), got {max_failed_steps}")
        self.max_failed_steps = max_failed_steps or None
        self._plans = [_plan(f, name, columns) for f, name in zip(self.funcs, self.names)]
        self.conventions: list[Convention] = [p.convention for p in self._plans]
        self.trainer_state = RewardState()
        self.extra_columns: dict[str, list[Any]] = {}
        self.error_counts: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._streak = [0] * len(self.funcs)  # calls in a row on which the reward raised on every sample
        self._last_error: list[BaseException | None] = [None] * len(self.funcs)

    def __len__(self) -> int:
        return len(self.funcs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}×{w:g}" for n, w in zip(self.names, self.weights.tolist()))
        return f"RewardSet({parts})"

    def _batch(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any], columns: dict
    ) -> _Batch:
        n = _check_batch(prompts, completions, completion_ids, columns)
        for k, plan in enumerate(self._plans):
            # a missing required column is a data/reward mismatch, the same on every call: raise, don't NaN it
            missing = plan.needs - _passed(plan, columns)
            if missing:
                raise TypeError(
                    f"reward {self.names[k]!r} needs {_listed(missing)}, which this batch does not have "
                    f"(its columns: {_cols(columns)})"
                )
        return _Batch(list(prompts), list(completions), list(completion_ids), columns, n)

    def _invoke(self, k: int, b: _Batch, i: int | None) -> Any:
        """Call reward ``k`` on the batch (``i`` None) or on sample ``i`` alone, in its convention."""
        plan, sl = self._plans[k], slice(None) if i is None else slice(i, i + 1)
        kwargs = {key: b.column(key, i) for key in b.columns}
        args: tuple = ()
        if plan.convention == "trl":
            kwargs.update(
                prompts=b.prompts[sl], completions=b.trl_completions()[sl], completion_ids=b.completion_ids[sl],
                trainer_state=self.trainer_state, log_extra=b.log_extra, log_metric=b.log_metric,
            )  # fmt: skip
        else:
            args = (b.prompts[sl], b.completions[sl], b.completion_ids[sl])
        if plan.accepts is not None:  # no **kwargs: only what it names (TRL would pass it everything and fail)
            kwargs = {key: v for key, v in kwargs.items() if key in plan.accepts}
        return self.funcs[k](*args, **kwargs)

    def _start(self, keys: list[_Key], b: _Batch) -> tuple[dict[_Key, Any], dict[_Key, Awaitable[Any]]]:
        """Make the calls ``keys``: results (a value, or the exception raised) and awaitables not yet run."""
        done: dict[_Key, Any] = {}
        pending: dict[_Key, Awaitable[Any]] = {}
        for key in keys:
            try:
                out = self._invoke(key[0], b, key[1])
            except Exception as e:  # noqa: BLE001 -- a faulty reward must not stop training: rescored per sample
                done[key] = e
                continue
            if inspect.isawaitable(out):
                pending[key] = out
            else:
                done[key] = out
        return done, pending

    @staticmethod
    def _settle(done: dict[_Key, Any], pending: dict[_Key, Awaitable[Any]], got: list[Any]) -> dict[_Key, Any]:
        for key, out in zip(pending, got):
            if isinstance(out, BaseException) and not isinstance(out, Exception):
                raise out  # KeyboardInterrupt / CancelledError: not ours to swallow
            done[key] = out
        return done

    def _sync_calls(self, keys: list[_Key], b: _Batch) -> dict[_Key, Any]:
        done, pending = self._start(keys, b)
        if pending:
            self._settle(done, pending, _run_coroutine(_gather(list(pending.values()))))
        return done

    async def _async_calls(self, keys: list[_Key], b: _Batch) -> dict[_Key, Any]:
        done, pending = self._start(keys, b)
        if pending:
            self._settle(done, pending, await _gather(list(pending.values())))
        return done

    @staticmethod
    def _retries(done: dict[_Key, Any], n: int) -> list[_Key]:
        """Per-sample calls of the rewards whose batch call raised: one bad sample must not blank the batch."""
        return [(k, i) for (k, j), out in done.items() if j is None and isinstance(out, Exception) for i in range(n)]

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **columns
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Score a batch. ``R [N,K]`` float32 (NaN = None or failed) and metrics. Async rewards run concurrently
        on an event loop (a fresh one, or a helper thread's when this thread already runs a loop: use
        ``await rs.acall(...)`` inside async code)."""
        b = self._batch(prompts, completions, completion_ids, columns)
        done = self._sync_calls([(k, None) for k in range(len(self.funcs))], b)
        done.update(self._sync_calls(self._retries(done, b.n), b))
        return self._finish(b, done)

    async def acall(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **columns
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``__call__`` for callers already inside an event loop."""
        b = self._batch(prompts, completions, completion_ids, columns)
        done = await self._async_calls([(k, None) for k in range(len(self.funcs))], b)
        done.update(await self._async_calls(self._retries(done, b.n), b))
        return self._finish(b, done)

    def _finish(self, b: _Batch, done: dict[_Key, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        cols, failed = [], []
        for k, name in enumerate(self.names):
            out, errors = done[(k, None)], []
            if not isinstance(out, Exception):
                col = _to_column(name, out, b.n)
            else:
                logger.debug("reward %r raised on the batch (%r); scored its %d samples one by one", name, out, b.n)
                col = []
                for i in range(b.n):
                    v = done[(k, i)]
                    if isinstance(v, Exception):
                        errors.append(v)
                        col.append(math.nan)
                    else:
                        col.append(_to_column(name, v, 1, offset=i)[0])
            self._record(k, errors, b.n)
            cols.append(col)
            failed.append(len(errors))
        R = torch.tensor(cols, dtype=torch.float32).T.reshape(b.n, len(self.funcs))
        metrics = self._metrics(R, failed)
        for key, values in b.logged.items():  # TRL log_metric; our own keys win a clash
            metrics.setdefault(key, torch.tensor(sum(values) / len(values)))
        self.extra_columns = b.extra
        self._stop_if_broken()
        return R, metrics

    def _record(self, k: int, errors: list[Exception], n: int) -> None:
        """Count and log reward ``k``'s failed samples of one call, and track its all-failed streak."""
        name = self.names[k]
        if errors:
            self.error_counts[name] += len(errors)
            if name not in self._logged:
                self._logged.add(name)
                err = errors[0]
                logger.warning(
                    "reward %r raised on %d of %d samples; those samples are NaN (left out of the advantages). "
                    "Later errors are counted in reward_errors/%s and logged at DEBUG; raising on every sample of "
                    "%s calls in a row stops the run",
                    name, len(errors), n, name, self.max_failed_steps or "(never: max_failed_steps is off)",
                    exc_info=(type(err), err, err.__traceback__),
                )  # fmt: skip
            else:
                logger.debug("reward %r raised again on %d of %d samples: %r", name, len(errors), n, errors[-1])
        if n and len(errors) == n:
            self._streak[k] += 1
            self._last_error[k] = errors[-1]
        else:
            self._streak[k] = 0

    def _stop_if_broken(self) -> None:
        """A reward that raised on every sample of ``max_failed_steps`` calls in a row gives no signal at all:
        training on would take zero-gradient steps to the end and look like success. Stop, with its traceback."""
        if self.max_failed_steps is None:
            return
        for k, streak in enumerate(self._streak):
            err = self._last_error[k]
            if streak >= self.max_failed_steps and err is not None:
                tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
                raise RewardFailedError(
                    f"reward {self.names[k]!r} raised on every sample of {streak} scoring calls in a row "
                    f"(max_failed_steps={self.max_failed_steps}); its last error:\n{tb.rstrip()}"
                ) from err

    def weighted_sum(self, R: Tensor) -> Tensor:
        """``[N,K] -> [N]``: ``Σ_k w_k R_k`` over the present (non-NaN) rewards; NaN where all K are NaN.

        Same combination as the advantage functions' ``sum_then_normalize`` with ``reward_weights=self.weights``.
        """
        if R.dim() != 2 or R.shape[1] != len(self.funcs):
            raise ValueError(f"expected rewards [N,{len(self.funcs)}], got {tuple(R.shape)}")
        return weighted_reward_sum(R, self.weights)

    def _metrics(self, R: Tensor, failed: list[int]) -> dict[str, Tensor]:
        present = ~torch.isnan(R)
        metrics: dict[str, Tensor] = {}
        for k, name in enumerate(self.names):
            x = R[present[:, k], k]
            metrics[f"rewards/{name}/mean"] = x.mean() if x.numel() else torch.tensor(math.nan)
            metrics[f"rewards/{name}/std"] = x.std() if x.numel() > 1 else torch.tensor(math.nan)
            metrics[f"rewards/{name}/frac_none"] = (~present[:, k]).float().mean()
            metrics[f"reward_errors/{name}"] = torch.tensor(float(failed[k]))
        total = weighted_reward_sum(R, self.weights)
        ok = ~torch.isnan(total)
        metrics["reward"] = total[ok].mean() if ok.any() else torch.tensor(math.nan)
        return metrics


def weighted_reward_sum(R: Tensor, weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """``[N,K] -> [N]`` weighted nansum; rows whose K rewards are all NaN stay NaN (unscorable)."""
    w = torch.ones(R.shape[1]) if weights is None else torch.as_tensor(weights)
    w = w.to(device=R.device, dtype=R.dtype)
    nan = torch.isnan(R)
    total = torch.where(nan, 0.0, R * w).sum(1)
    return torch.where(nan.all(1), math.nan, total)


def combine_rewards(
    funcs: Sequence[RewardFunc | str], weights: Sequence[float] | Tensor | None = None, **kw: Any
) -> RewardSet:
    """``RewardSet(funcs, weights)``."""
    return RewardSet(funcs, weights, **kw)


def _check_batch(prompts: Sequence, completions: Sequence, completion_ids: Sequence, columns: dict[str, Any]) -> int:
    n = len(completions)
    if len(prompts) != n or len(completion_ids) != n:
        raise ValueError(f"{len(prompts)} prompts, {n} completions, {len(completion_ids)} completion_ids: must match")
    for key, col in columns.items():
        if hasattr(col, "__len__") and not isinstance(col, (str, bytes)) and len(col) != n:
            raise ValueError(f"column {key!r} has {len(col)} values for {n} completions")
    return n


def _unique(names: list[str]) -> list[str]:
    seen: Counter[str] = Counter(names)
    count: Counter[str] = Counter()
    out = []
    for name in names:
        if seen[name] > 1:
            count[name] += 1
            name = f"{name}_{count[name]}"
        out.append(name)
    return out
