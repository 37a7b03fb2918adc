"""Async vs synchronous GRPO samples per second on the same CPU cores (alignkit ``train_grpo``, HF backend).

    python benchmarks/async_vs_sync_grpo.py [--steps 6] [--warmup 2] [--runs 3] [--max-new-tokens 64]

Workload: ``benchmarks/grpo_vs_trl.py``'s (the ~20.6M-parameter Llama-shaped random model, 4 GSM8K prompts x 8
completions per step, <= 64 new tokens, the digit-share reward, PPO-clip token-mean, lr 1e-6, one optimizer step
per round, the whole step in one micro-batch).

Variants (each in fresh subprocesses, interleaved, ``--runs`` times):
* ``sync_1t`` / ``sync_2t``: synchronous ``train_grpo`` with torch at 1 / 2 threads (``sync-best`` is the faster);
* ``async_s1`` / ``async_s4``: ``async_rollout=true``, ``max_staleness`` 1 / 4: one rollout worker pinned to one
  core with one thread, the trainer pinned to the other with one thread (the 2-core split).

Timing: the wall interval between the ends of consecutive optimizer steps after ``--warmup`` steps (async: its
worker start-up and first round are in the warm-up); samples/s = 32 / step time. The trainer process's CPU time
is printed beside it (async: the worker's CPU is not in it). Reward: the mean reward of the timed steps' rounds,
and the wall time to reach them, to show async trains on samples as good. The script ends with one line per
staleness: ``max_staleness=1: 1.40x sync-best, 1.90x sync-1-thread``.

Last measured (2 shared CPU cores, torch 2.13 CPU; ``--runs 2 --steps 5 --warmup 2``, medians of 10 timed steps):

    variant    wall s/step  samples/s  gen s   trainer wait s
    sync_1t    3.52          9.09      1.58    -
    sync_2t    2.01         15.94      0.94    -
    async_s1   2.01         15.89      1.83    0.00     (staleness 1 every step)
    async_s4   2.02         15.84      1.74    0.00     (staleness 2)
    max_staleness=1: 1.00x sync-best, 1.75x sync-1-thread
    max_staleness=4: 0.99x sync-best, 1.74x sync-1-thread

The trainer never waits: its one-thread half (forward, backward, AdamW: ~2.0 s) is longer than generation on the
other core (~1.8 s, slower than the 1.58 s of the synchronous one-thread run because both cores now share the
memory bandwidth), so async steps at the trainer's pace. On this machine torch scales the synchronous step almost
perfectly to 2 threads (3.52 -> 2.01 s), so the bound for any split of the two cores is ~3.5 / 2 = 1.75 s: the
issue's goal of 1.35x over sync-best (set when sync-2-thread measured 4.1 s) is not reachable here; 1.8x over
one-thread sync is missed by 0.05x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import clock, intervals, print_columns, run_variants
from grpo_vs_trl import GROUP, LR, _load, build_workload, check_prompts, digit_share, prompt_rows

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("sync_1t", "sync_2t", "async_s1", "async_s4")


def child(variant: str, folder: str, n_prompts: int, steps: int, warmup: int, max_new: int) -> dict:
    import torch

    from alignkit.loops.grpo import GRPOConfig, train_grpo

    is_async = variant.startswith("async")
    if not is_async:
        torch.set_num_threads(int(variant[-2]))
    model, tok = _load(folder)
    marks: list[tuple[float, float]] = []
    rewards: list[float] = []
    gen: list[float] = []
    waits: list[float] = []
    stale: list[float] = []

    def mark(step: int, rec: dict) -> None:
        marks.append(clock())
        rewards.append(rec["reward"])
        gen.append(rec.get("gen_time_s", 0.0))
        waits.append(rec.get("async/trainer_wait_s", 0.0))
        stale.append(rec.get("async/staleness", 0.0))

    extra = dict(async_rollout=True, max_staleness=int(variant[-1]), worker_threads=1) if is_async else {}
    total = warmup + steps
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, chat_format="chatml", group_size=GROUP, prompts_per_step=n_prompts,
                         max_new_tokens=max_new, max_prompt_length=None, micro_batch_size=n_prompts * GROUP, lr=LR,
                         max_grad_norm=1.0, max_steps=total + 1, progress=False, seed=0, log_completions_every=0,
                         **extra)  # fmt: skip
        t0 = time.perf_counter()
        marks.append(clock())
        train_grpo(cfg, model=model, tokenizer=tok, train_data=prompt_rows(n_prompts), reward_funcs=[digit_share],
                   callbacks=[mark])  # fmt: skip
    marks = marks[:-1]  # the last step also writes the final checkpoint: not timed
    sl = slice(warmup, total)
    return {**intervals(marks, warmup, steps), "reward": rewards[sl], "gen": gen[sl], "wait": waits[sl],
            "staleness": stale[sl], "to_end_wall": marks[total][0] - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child(a.child, a.folder, a.prompts, a.steps, a.warmup, a.max_new_tokens)))
        return

    variants = [v for v in a.variants.split(",") if v]
    n = a.prompts * GROUP
    with tempfile.TemporaryDirectory(prefix="async_bench_") as folder:
        build_workload(Path(folder))
        lens = check_prompts(Path(folder), prompt_rows(a.prompts))
        print(f"workload: {a.prompts} GSM8K prompts ({lens} tokens) x {GROUP} = {n} completions per step, <= "
              f"{a.max_new_tokens} new tokens; {a.warmup} warm-up + {a.steps} timed steps x {a.runs} runs per "
              f"variant", flush=True)  # fmt: skip
        args = ["--folder", folder, "--prompts", str(a.prompts), "--steps", str(a.steps), "--warmup", str(a.warmup),
                "--max-new-tokens", str(a.max_new_tokens)]  # fmt: skip

        def describe(res: dict) -> str:
            return (f"wall s/step {[round(x, 2) for x in res['wall']]}  gen s {[round(x, 2) for x in res['gen']]}  "
                    f"trainer wait s {[round(x, 2) for x in res['wait']]}  staleness {res['staleness']}")  # fmt: skip

        t_start = time.perf_counter()
        results = run_variants(__file__, variants, a.runs, args, describe, width=10,
                               env={"TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    med = {v: {k: statistics.median(x for r in runs for x in r[k]) for k in ("wall", "cpu", "gen", "wait", "reward")}
           for v, runs in results.items()}  # fmt: skip
    print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s; medians over all timed steps of all runs")
    head = ("wall s/step", "samples/s", "trainer CPU s", "gen s", "trainer wait s", "mean reward")
    cells = {v: [f"{x['wall']:.2f}", f"{n / x['wall']:.2f}", f"{x['cpu']:.2f}", f"{x['gen']:.2f}", f"{x['wait']:.2f}",
                 f"{x['reward']:.4f}"] for v, x in med.items()}  # fmt: skip
    print_columns(head, cells, 12, 15)
    syncs = {v: med[v]["wall"] for v in med if v.startswith("sync")}
    if not syncs:
        return
    best = min(syncs.values())
    one = syncs.get("sync_1t")
    for v in (v for v in med if v.startswith("async")):
        vs_one = f", {one / med[v]['wall']:.2f}x sync-1-thread" if one else ""
        print(f"max_staleness={v[-1]}: {best / med[v]['wall']:.2f}x sync-best{vs_one}")


if __name__ == "__main__":
    main()
