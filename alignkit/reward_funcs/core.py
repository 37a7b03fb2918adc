"""Reward functions: the contract, a weighted set that calls them safely, and lookup by name or dotted path.

A reward is any callable

    reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns)
        -> list[float | None]            (or an awaitable of it: ``async def`` rewards run concurrently)

with one value per completion. Extra dataset columns (``answer``, ...) arrive as keyword lists aligned with the
completions; a reward should accept ``**kwargs`` for the columns it does not use. ``None`` means "not
applicable to this sample" and becomes NaN; the advantage functions leave NaN out of their statistics.

``RewardSet`` calls K rewards on one batch and returns a ``[N,K]`` float32 tensor. A reward that raises is
not fatal: its column is NaN for that batch, the error is counted (``reward_errors/<name>``) and logged with
its traceback the first time. A reward that returns the wrong number of values is a bug and raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import inspect
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "REWARDS",
    "RewardFunc",
    "RewardSet",
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


def _import_object(path: str) -> Any:
    """``pkg.mod:attr.sub`` or ``pkg.mod.attr`` -> the object."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a dotted path like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"reward {path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


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
    obj = _import_object(spec)
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


def _to_column(name: str, values: Any, n: int) -> list[float]:
    """A reward's return value -> ``n`` floats (None -> NaN). Wrong length or type is a bug: raise, naming it."""
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    elif isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"reward {name!r} must return a list of float | None, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward {name!r} returned a non-numeric value {v!r}") from e
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


class RewardSet:
    """K reward functions with weights, called together on a batch.

    ``rs(prompts, completions, completion_ids, **columns)`` returns ``(R [N,K] float32, metrics)`` with NaN where
    a reward returned None or raised. Feed ``R`` and ``rs.weights`` to the advantage functions
    (``grpo_advantages(R, reward_weights=rs.weights, ...)``), or ``rs.weighted_sum(R) [N]`` for one column.

    Metrics (detached float32 scalars): ``rewards/<name>/mean`` and ``/std`` (over the present values, NaN
    when none), ``rewards/<name>/frac_none``, ``reward_errors/<name>`` (1 if that reward raised on this batch),
    and ``reward`` (mean weighted sum over scorable rows). ``error_counts`` keeps the totals since creation.
    """

    def __init__(
        self,
        funcs: Sequence[RewardFunc | str],
        weights: Sequence[float] | Tensor | None = None,
        names: Sequence[str] | None = None,
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
        self.error_counts: Counter[str] = Counter()
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self.funcs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}×{w:g}" for n, w in zip(self.names, self.weights.tolist()))
        return f"RewardSet({parts})"

    def _failed(self, name: str, err: BaseException) -> None:
        self.error_counts[name] += 1
        if name not in self._logged:
            self._logged.add(name)
            logger.warning(
                "reward %r raised; its values are NaN for this batch and training goes on "
                "(later errors of this reward are counted in reward_errors/%s, logged at DEBUG)",
                name,
                name,
                exc_info=(type(err), err, err.__traceback__),
            )
        else:
            logger.debug("reward %r raised again: %r", name, err)

    def _start(self, args: tuple, columns: dict[str, Any]) -> tuple[list[Any], dict[int, Awaitable[Any]], list[bool]]:
        """Call every reward; sync results are ready, async ones come back as awaitables (not yet running)."""
        results: list[Any] = [None] * len(self.funcs)
        pending: dict[int, Awaitable[Any]] = {}
        errors = [False] * len(self.funcs)
        for k, f in enumerate(self.funcs):
            try:
                out = f(*args, **columns)
            except Exception as e:  # noqa: BLE001 -- a faulty reward must not stop training
                self._failed(self.names[k], e)
                errors[k] = True
                continue
            if inspect.isawaitable(out):
                pending[k] = out
            else:
                results[k] = out
        return results, pending, errors

    def _finish(self, results: list[Any], errors: list[bool], n: int) -> tuple[Tensor, dict[str, Tensor]]:
        cols = [[math.nan] * n if errors[k] else _to_column(self.names[k], results[k], n) for k in range(len(results))]
        R = torch.tensor(cols, dtype=torch.float32).T.reshape(n, len(self.funcs))
        return R, self._metrics(R, errors)

    def _resolve(self, results: list[Any], pending: dict[int, Awaitable[Any]], errors: list[bool], got: list[Any]):
        for k, out in zip(pending, got):
            if isinstance(out, Exception):
                self._failed(self.names[k], out)
                errors[k] = True
            elif isinstance(out, BaseException):  # KeyboardInterrupt / CancelledError: not ours to swallow
                raise out
            else:
                results[k] = out

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **columns
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Score a batch. ``R [N,K]`` float32 (NaN = None or failed) and metrics. Async rewards run concurrently
        on an event loop (a fresh one, or a helper thread's when this thread already runs a loop: use
        ``await rs.acall(...)`` inside async code)."""
        n = _check_batch(prompts, completions, completion_ids, columns)
        results, pending, errors = self._start((list(prompts), list(completions), list(completion_ids)), columns)
        if pending:
            self._resolve(results, pending, errors, _run_coroutine(_gather(list(pending.values()))))
        return self._finish(results, errors, n)

    async def acall(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **columns
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``__call__`` for callers already inside an event loop."""
        n = _check_batch(prompts, completions, completion_ids, columns)
        results, pending, errors = self._start((list(prompts), list(completions), list(completion_ids)), columns)
        if pending:
            self._resolve(results, pending, errors, await _gather(list(pending.values())))
        return self._finish(results, errors, n)

    def weighted_sum(self, R: Tensor) -> Tensor:
        """``[N,K] -> [N]``: ``Σ_k w_k R_k`` over the present (non-NaN) rewards; NaN where all K are NaN.

        Same combination as the advantage functions' ``sum_then_normalize`` with ``reward_weights=self.weights``.
        """
        if R.dim() != 2 or R.shape[1] != len(self.funcs):
            raise ValueError(f"expected rewards [N,{len(self.funcs)}], got {tuple(R.shape)}")
        return weighted_reward_sum(R, self.weights)

    def _metrics(self, R: Tensor, errors: list[bool]) -> dict[str, Tensor]:
        present = ~torch.isnan(R)
        metrics: dict[str, Tensor] = {}
        for k, name in enumerate(self.names):
            x = R[present[:, k], k]
            metrics[f"rewards/{name}/mean"] = x.mean() if x.numel() else torch.tensor(math.nan)
            metrics[f"rewards/{name}/std"] = x.std() if x.numel() > 1 else torch.tensor(math.nan)
            metrics[f"rewards/{name}/frac_none"] = (~present[:, k]).float().mean()
            metrics[f"reward_errors/{name}"] = torch.tensor(float(errors[k]))
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
