"""Small helpers shared by the benchmark scripts: find ../shared, load its conversations, time, print tables; and
for the training benchmarks (sft/dpo/grpo_vs_trl, logprobs_memory): the model and tokenizer they share, peak memory
and step clocks inside a child process, TRL's common CPU arguments, a per-part step profile, and the driver's
interleaved child runs and their summary."""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# ChatML with ``{% generation %}`` markers: TRL's ``assistant_only_loss`` needs them; alignkit renders ``chatml`` itself
CHATML_GEN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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


# ---------------------------------------------------------------------------------------------------------------
# Training benchmarks: the shared workload (built inside each child)
# ---------------------------------------------------------------------------------------------------------------


def llama2_tokenizer(chat_template: str) -> Any:
    """The conformance kit's Llama 2 tokenizer (32,000 tokens) with `chat_template`; pad = eos if it has no pad token
    (what TRL picks too)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conformance_kit import load_tokenizer

    tok = load_tokenizer("llama2")
    tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bench_model_config() -> Any:
    """The Llama-shaped config of every training benchmark: hidden 256, 4 layers, 4 heads (head_dim 64), MLP 1024,
    vocab 32,000, untied head (~20.6M parameters)."""
    sys.path.insert(0, str(REPO))
    from alignkit.models import tiny_llama_config

    return tiny_llama_config(32000, hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024, max_positions=2048)


def bench_model(cfg: Any = None) -> Any:
    """The benchmark model (`cfg`, default `bench_model_config()`): random init with seed 0, fp32, sdpa attention."""
    sys.path.insert(0, str(REPO))
    from alignkit.models import build_tiny_model

    return build_tiny_model(bench_model_config() if cfg is None else cfg, seed=0, attn_implementation="sdpa")


# Config fields every alignkit SFT/DPO loop variant shares: constant lr, grad-norm clip 1.0, fp32, sdpa attention, no
# progress bar and no periodic log lines inside the timed steps.
ALIGNKIT_CPU_ARGS: dict[str, Any] = {
    "schedule": "constant",
    "max_grad_norm": 1.0,
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "progress": False,
    "log_every": 10**9,
}

# TrainingArguments every TRL trainer variant shares: one micro-batch per optimizer step, constant lr, grad-norm
# clip 1.0, fp32 on CPU (bf16 set explicitly: TRL's configs default it to True), the sequential sampler (every step
# sees the rows in order), nothing logged, saved or evaluated, seed 0.
TRL_CPU_ARGS: dict[str, Any] = {
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 1.0,
    "bf16": False,
    "fp16": False,
    "use_cpu": True,
    "train_sampling_strategy": "sequential",
    "report_to": "none",
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_strategy": "no",
    "disable_tqdm": True,
    "seed": 0,
}


# ---------------------------------------------------------------------------------------------------------------
# Training benchmarks: memory and step clocks (inside each child)
# ---------------------------------------------------------------------------------------------------------------


def status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``, ...)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakRSS:
    """Peak resident memory since `reset()`, in MB above the RSS at reset. `reset()` resets the kernel's RSS
    high-water mark (``echo 5 > /proc/self/clear_refs`` resets VmHWM) and `peak_mb()` reads ``VmHWM - VmRSS_at_reset``:
    exact (kernel-maintained, no sampling) and, unlike tracemalloc, it sees torch's allocations. Where clear_refs is
    refused it falls back to ``ru_maxrss`` (an upper bound: that high-water mark may predate the reset). `method`
    names which one was used."""

    def reset(self) -> None:
        self.base_kb = status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"

    def peak_mb(self) -> float:
        peak = status_kb("VmHWM") if self.method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - self.base_kb) / 1024


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def intervals(marks: list[tuple[float, float]], first: int, n: int) -> dict[str, list[float]]:
    """Wall and CPU seconds of steps first..first+n-1, where marks[i] is the clock at the end of step i-1."""
    sl = slice(first, first + n)
    return {
        "wall": [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:])][sl],
        "cpu": [b[1] - a[1] for a, b in zip(marks[:-1], marks[1:])][sl],
    }


def step_result(
    marks: list[tuple[float, float]], warmup: int, steps: int, peak_mb: float, **per_step: list[Any]
) -> dict[str, Any]:
    """What a training child reports: wall and CPU seconds of the timed steps (`intervals` of `marks` after `warmup`),
    each list of per-step values in `per_step` cut to the same steps, and `peak_mb`."""
    sl = slice(warmup, warmup + steps)
    return {**intervals(marks, warmup, steps), **{k: v[sl] for k, v in per_step.items()}, "peak_mb": peak_mb}


def trl_step_timer(marks: list[tuple[float, float]], mem: PeakRSS, total: int, peak: dict[str, float]) -> Any:
    """A transformers ``TrainerCallback`` that appends `clock()` to `marks` at the start of training and at the end
    of every optimizer step, and stores ``mem.peak_mb()`` in ``peak["mb"]`` at the end of step `total`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            marks.append(clock())

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            marks.append(clock())
            if state.global_step == total:
                peak["mb"] = mem.peak_mb()

    return StepTimer()


# ---------------------------------------------------------------------------------------------------------------
# Training benchmarks: profile of one step, piece by piece (inside a child)
# ---------------------------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], reps: int) -> float:
    """Median CPU seconds of `reps` calls of `fn`, after one untimed warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def profile_step(
    forward: Callable[[Callable[[str], None]], tuple[Any, Any]], model: Any, optimizer: Any, reps: int
) -> dict[str, float]:
    """Median CPU seconds of the parts of a training step, over `reps` steps after one warm-up step.
    ``forward(lap)`` runs the forward half, calling ``lap(name)`` at the end of each named part, and returns
    (the backbone's output hidden states, the loss). The backward is split where the gradient reaches the hidden
    states into "LM head backward (recomputes tiles)" and "backbone backward"; then "clip + AdamW (make_optimizer)"
    (grad-norm clip 1.0, `optimizer` step, zero_grad) and "total"."""
    import torch

    parts: dict[str, list[float]] = {}
    stamps: list[float] = []
    for rep in range(reps + 1):
        t = [time.process_time()]
        names: list[str] = []

        def lap(name: str, t: list[float] = t, names: list[str] = names) -> None:
            t.append(time.process_time())
            names.append(name)

        hidden, loss = forward(lap)
        stamps.clear()
        hidden.register_hook(lambda g: stamps.append(time.process_time()))  # grad reaches the backbone output
        loss.backward()
        t.append(time.process_time())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t.append(time.process_time())
        if rep == 0:
            continue  # warm-up
        n = len(names)
        for name, v in (
            *((name, t[i + 1] - t[i]) for i, name in enumerate(names)),
            ("LM head backward (recomputes tiles)", stamps[0] - t[n]),
            ("backbone backward", t[n + 1] - stamps[0]),
            ("clip + AdamW (make_optimizer)", t[n + 2] - t[n + 1]),
            ("total", t[n + 2] - t[0]),
        ):
            parts.setdefault(name, []).append(v)
    return {k: statistics.median(v) for k, v in parts.items()}


def print_profile(profile: dict[str, Any], title: str, alternatives_title: str, width: int) -> None:
    """Print a step profile: `title`, each of ``profile["parts"]`` (from `profile_step`) in seconds and as a share of
    its "total", then `alternatives_title` and each of ``profile["alternatives"]``; names padded to `width`."""
    print(title)
    total = profile["parts"]["total"]
    for k, v in profile["parts"].items():
        print(f"  {k:{width}s} {v:7.3f} s  {100 * v / total:5.1f}%")
    print(alternatives_title)
    for k, v in profile["alternatives"].items():
        print(f"  {k:{width}s} {v:7.3f} s")


# ---------------------------------------------------------------------------------------------------------------
# Training benchmarks: the driver (parent process)
# ---------------------------------------------------------------------------------------------------------------


def run_variants(
    script: str | Path,
    variants: Sequence[str],
    runs: int,
    args: Sequence[str],
    describe: Callable[[dict[str, Any]], str],
    *,
    width: int,
    pythons: Mapping[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{variant: [result of each run]}: each variant `runs` times, every run a fresh ``script --child VARIANT *args``
    process (`run_child`, with ``pythons[variant]`` if given), interleaved (all variants once, then again) so drift
    in machine load is shared; prints ``  run R VARIANT describe(result)`` after each (the name padded to `width`)."""
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(runs):
        for v in variants:
            python = pythons[v] if pythons else sys.executable
            res = run_child(script, ["--child", v, *args], python=python, env=env)
            results[v].append(res)
            print(f"  run {r + 1} {v:{width}s} {describe(res)}", flush=True)
    return results


def step_times(res: dict[str, Any]) -> str:
    """A training child's result in one line: wall and CPU seconds of each timed step, peak memory and its method."""
    return (
        f"wall s/step {[round(x, 2) for x in res['wall']]}  "
        f"CPU s/step {[round(x, 2) for x in res['cpu']]}  peak +{res['peak_mb']:.0f} MB ({res['method']})"
    )


def pooled_medians(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """{key: median over every value of `key` in all `runs`} (e.g. every timed step of every run)."""
    return {k: statistics.median(t for r in runs for t in r[k]) for k in keys}


def print_columns(headers: Sequence[str], rows: Mapping[str, Sequence[str]], name_width: int, width: int) -> None:
    """Plain columns: "variant" and each row's name left-aligned in `name_width`, every other cell right-aligned in
    `width`, one space between."""
    print(f"{'variant':{name_width}s} " + " ".join(f"{h:>{width}s}" for h in headers))
    for name, cells in rows.items():
        print(f"{name:{name_width}s} " + " ".join(f"{c:>{width}s}" for c in cells))
