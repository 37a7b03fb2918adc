"""Small helpers shared by the benchmark scripts: find ../shared, load its conversations, time, print tables."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shared_dir(*needed: str) -> Path:
    """The shared fixtures folder ($ALIGNKIT_SHARED, else ../shared next to the repo); exits if it (or a
    `needed` subfolder) is missing, since every benchmark here runs on real shared data."""
    root = Path(os.environ.get("ALIGNKIT_SHARED", REPO.parent / "shared")).resolve()
    missing = [n for n in needed if not (root / n).exists()]
    if not root.is_dir() or missing:
        what = f"{root}" + (f" (missing: {', '.join(missing)})" if root.is_dir() else "")
        sys.exit(f"shared fixtures not found at {what}; set ALIGNKIT_SHARED to the shared/ folder")
    return root


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# (dataset folder, how a row becomes a conversation). Preference rows become prompt + chosen.
_SFT_SOURCES: tuple[tuple[str, str], ...] = (
    ("alpaca_cleaned_1000", "messages"),
    ("dolly_subset", "messages"),
    ("fastchat_dummy_conversation", "messages"),
    ("hh_rlhf_harmless", "prompt+chosen"),
)


def load_conversations(shared: Path, n: int = 2000) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The first `n` real conversations from the shared SFT sets, in order, as `{"messages": [...]}` rows
    (single-turn alpaca/dolly, multi-turn fastchat, then multi-turn hh-rlhf prompt + chosen to fill up).
    Returns (rows, {source: count})."""
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for name, kind in _SFT_SOURCES:
        if len(rows) >= n:
            break
        recs = load_jsonl(shared / "data" / name / f"{name}.jsonl")[: n - len(rows)]
        if kind == "messages":
            rows += [{"messages": r["messages"]} for r in recs]
        else:
            rows += [{"messages": r["prompt"] + r["chosen"]} for r in recs]
        counts[name] = len(recs)
    if len(rows) < n:
        sys.exit(f"only {len(rows)} conversations in the shared SFT sets, {n} requested")
    return rows, counts


def time_once(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call, after a gc and with gc paused so a collection
    does not land in one variant only. CPU time is the steadier number on a machine shared with other jobs
    (it counts every thread of this process, so it exceeds wall time when a thread pool is busy)."""
    gc.collect()
    gc.disable()
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - w0, time.process_time() - c0, out
    finally:
        gc.enable()


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": [...], "cpu": [...]}}: every variant `repeats` times, the order rotated each round so
    drift in machine load is shared between variants."""
    names = list(fns)
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu, _ = time_once(fns[k])
            times[k]["wall"].append(wall)
            times[k]["cpu"].append(cpu)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, columns padded to width."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def run_child(
    script: str | Path, args: Sequence[str], *, python: str = sys.executable, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process and return the JSON object on its last stdout line; on a
    non-zero exit, print the tail of its output and exit (a benchmark variant that fails is not a number)."""
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.run([python, str(script), *args], capture_output=True, text=True, env=full_env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"child {list(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
