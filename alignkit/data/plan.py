"""The whole run's data order, fixed by the seed: optimizer steps -> micro-batches -> example indices.

A pure function of the seed, so resuming a run means skipping to a step (the checkpoint stores no data position
beyond the step)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from alignkit.data.collate import pack_best_fit_decreasing

__all__ = ["PACK_WINDOW", "LazyBatches", "plan_batches", "examples_in_plan"]


class LazyBatches:
    """The batches ``collate(items[i : i + size])`` of consecutive chunks, each chunk giving ``per_chunk``
    batches; built only when iterated, and sized, so a progress bar over them has a total and an ETA."""

    def __init__(self, items: Sequence[Any], size: int, collate: Callable[[Sequence[Any]], list[Any]],
                 per_chunk: int = 1) -> None:  # fmt: skip
        self.items, self.size, self.collate, self.per_chunk = items, size, collate, per_chunk

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.size) * self.per_chunk

    def __iter__(self) -> Iterator[Any]:
        for i in range(0, len(self.items), self.size):
            yield from self.collate(self.items[i : i + self.size])


def examples_in_plan(plan: Sequence[Sequence[Sequence[int]]], steps: int) -> list[int]:
    """The example indices the first ``steps`` optimizer steps of ``plan`` read, ascending."""
    return sorted({i for step in plan[:steps] for micro in step for i in micro})


def plan_batches(
    lengths: Sequence[int],
    *,
    seed: int,
    epochs: float,
    grad_accum: int,
    batch_size: int | None = None,
    pack_tokens: int | None = None,
) -> list[list[list[int]]]:
    """The whole run's data order, fixed by the seed: steps -> micro-batches -> example indices.

    Unpacked: each micro-batch is `batch_size` shuffled examples. Packed: each epoch's shuffled examples are
    placed by best-fit-decreasing, window by window, into bins of at most `pack_tokens` tokens; bin order is
    shuffled; a bin is one micro-batch. The plan is a pure function of the seed, so the data position is
    just the step.
    """
    rng = random.Random(seed)
    micro: list[list[int]] = []
    n_epochs = max(1, math.ceil(epochs))
    for e in range(n_epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if e == n_epochs - 1 and epochs != n_epochs:  # fractional last epoch
            order = order[: max(1, int(round((epochs - e) * len(order))))]
        if pack_tokens is not None:
            # Best-fit-decreasing over the whole epoch would sort by length, making every micro-batch one
            # length class (on short, uniform tasks, one problem type): pack within shuffled windows of
            # about `PACK_WINDOW` bins instead, which keeps batches mixed and bins nearly as full.
            bins = []
            for window in _token_windows(order, lengths, PACK_WINDOW * pack_tokens):
                packed = pack_best_fit_decreasing([lengths[i] for i in window], pack_tokens)
                bins.extend([window[j] for j in b] for b in packed)
            rng.shuffle(bins)
            micro.extend(bins)
        else:
            assert batch_size is not None
            micro.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return [micro[i : i + grad_accum] for i in range(0, len(micro) - grad_accum + 1, grad_accum)]


PACK_WINDOW = 8


def _token_windows(order: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive slices of `order` holding about `budget` tokens each."""
    windows, cur, n = [], [], 0
    for i in order:
        cur.append(i)
        n += lengths[i]
        if n >= budget:
            windows.append(cur)
            cur, n = [], 0
    if cur:
        windows.append(cur)
    return windows
