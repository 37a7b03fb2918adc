"""Metrics of a run: one accumulator that folds micro-batch metrics into a step's values, and the metrics log.

Every loop folds the ``(loss, metrics)`` of its micro-batches with :class:`StepMetrics` (values stay on the
device until the step's one host sync in :meth:`StepMetrics.result`) and writes one record per logged step with
:class:`MetricsLog` (``RUN_DIR/metrics.jsonl``, and the trackers of ``report_to``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.checkpoint import write_atomic
from alignkit.trackers import Tracker, tracker_tag

__all__ = ["StepMetrics", "MetricsLog", "NullLog", "read_metrics", "step_line"]


class StepMetrics:
    """Folds per-micro-batch metrics into one value per step.

    A loss reports local means with their counts; ``weights`` maps a metric name to the count it is a mean over
    (``None``: a term already divided by the global normaliser, or a count, so micro-batch values add up;
    ``"last"``: a batch-global input such as KTO's z0). Unlisted names default to ``default_weight``. Values are
    accumulated as detached fp64 tensors on their device; :meth:`result` is the step's single host sync.
    """

    def __init__(self, weights: Mapping[str, str | None] | None = None, default_weight: str | None = None) -> None:
        self.weights, self.default = dict(weights or {}), default_weight
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.last: dict[str, Tensor] = {}
        self._reduced = False  # result(over_ranks=True) reduces once

    def add(self, metrics: Mapping[str, Tensor | float]) -> None:
        vals = {k: torch.as_tensor(v).detach().double() for k, v in metrics.items()}
        for k, v in vals.items():
            w = self.weights.get(k, self.default)
            if w == "last":
                self.last[k] = v
            elif w is None or w == k:
                self.sums[k] = self.sums[k] + v if k in self.sums else v
            else:
                self.sums[k] = self.sums[k] + v * vals[w] if k in self.sums else v * vals[w]
                self.counts[k] = self.counts[k] + vals[w] if k in self.counts else vals[w]

    def total(self, key: str) -> Tensor | None:
        """The summed value of ``key`` so far, on its device (no host sync); None if never added."""
        return self.sums.get(key)

    def result(self, over_ranks: bool = False) -> dict[str, float]:
        """The folded values. ``over_ranks``: the sums and counts of all ranks of a distributed run, in one
        all-reduce (a training step, whose micro-batches the ranks share; every rank must have added the same
        metric names). Without it, this rank's own values (an evaluation every rank runs whole)."""
        if over_ranks:
            self._reduce_over_ranks()
        out: dict[str, float] = {}
        for k, v in self.sums.items():
            if k in self.counts:
                c = float(self.counts[k])
                out[k] = float(v) / c if c else 0.0
            else:
                out[k] = float(v)
        return {**out, **{k: float(v) for k, v in self.last.items()}}

    def _reduce_over_ranks(self) -> None:
        # one all-reduce of every sum and count (ranks add the same names: every loss emits a fixed set per config)
        from alignkit import distributed

        if distributed.world_size() == 1 or self._reduced:
            return
        self._reduced = True
        keys = [("s", k) for k in sorted(self.sums)] + [("c", k) for k in sorted(self.counts)]
        keys += [("l", k) for k in sorted(self.last)]
        where = {"s": self.sums, "c": self.counts, "l": self.last}
        values = [where[t][k].reshape(()) for t, k in keys]
        dev = values[0].device  # counts added as floats sit on the CPU beside device losses: one device
        flat = distributed.all_reduce_sum(torch.stack([v.to(dev) for v in values]))
        for (t, k), v in zip(keys, flat):
            where[t][k] = v / distributed.world_size() if t == "l" else v  # a batch-global input: its mean


class MetricsLog:
    """Appends one JSON line per logged step to RUN_DIR/metrics.jsonl (flushed at once) and mirrors its scalars
    to the run's trackers (:mod:`alignkit.trackers`, grouped names). :meth:`log_samples` appends sample rows (an
    RL run's completions) to RUN_DIR/completions.jsonl and the trackers' tables. On resume, lines after the
    resumed step are dropped from both files so the logs stay exact."""

    def __init__(
        self, run_dir: str | Path, *, resume_step: int | None = None, trackers: Sequence[Tracker] = ()
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "completions.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.samples_path):
            if resume_step is not None and path.exists():
                # keep the records up to the resumed step; a partial last line (a kill mid-write) is dropped, and
                # the file is replaced atomically so a second crash cannot lose the kept records
                kept = [r for r in _parse_lines(path) if r.get("step", 0) <= resume_step]
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
            elif resume_step is None and path.exists():
                path.unlink()
        self._f = open(self.path, "a")
        self.trackers = list(trackers)

    def log(self, record: dict[str, Any]) -> None:
        rec = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        # strict JSON: a non-finite value (a skipped step's loss) is null, never a bare NaN other parsers refuse
        rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._f.flush()
        scalars = {tracker_tag(k): v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}
        for t in self.trackers:
            t.scalars(scalars, rec["step"])

    def log_samples(self, step: int, rows: list[dict[str, Any]], name: str = "completions") -> None:
        """Sample rows of step ``step`` (same keys each): RUN_DIR/completions.jsonl and a table per tracker."""
        if not rows:
            return
        clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        with open(self.samples_path, "a") as f:
            f.write("".join(json.dumps({"step": step, **r}, allow_nan=False) + "\n" for r in clean))
        for t in self.trackers:
            t.table(name, clean, step)

    def close(self) -> None:
        self._f.close()
        for t in self.trackers:
            t.close()


def step_line(record: dict[str, Any], total_steps: int) -> str:
    """One line of a logged step's key metrics (printed when the progress bar is off)."""
    keys = ("loss", "eval_loss", "reward", "rewards/accuracies", "accuracy", "lr", "grad_norm", "tokens_per_s")
    parts = [f"step {record['step']}/{total_steps}"]
    for k in keys:
        v = record.get(k)
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
    return "[alignkit] " + " ".join(parts)


class NullLog:
    """The metrics log of ranks other than 0: they compute every record, rank 0 writes it."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict[str, Any]], name: str = "completions") -> None:
        pass

    def close(self) -> None:
        pass


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    records = []
    lines = path.read_text().splitlines()
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}: not a JSON record") from None
            print(f"[alignkit] {path}: dropping a partial last line (a run stopped mid-write)", file=sys.stderr)
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` (a partial last line, from a run killed mid-write, is dropped)."""
    return _parse_lines(Path(run_dir) / "metrics.jsonl")
