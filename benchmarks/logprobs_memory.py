"""Peak memory and time of LM-head log-probs: full logits vs alignkit's chunked head (forward + backward).

    python benchmarks/logprobs_memory.py [--repeats 3] [--token-chunks 1024,4096]

Workload: B=8, T=512 (N=4096 tokens), V=32000, H=256, fp32 on CPU; loss = −mean ℓ, then backward to hidden
and weight.

How memory is measured. tracemalloc does not see torch's allocations, and the CPU allocator hands large
blocks straight back to the OS, so process RSS tracks live tensors closely. Each measurement runs in a fresh
subprocess that builds its inputs, then resets the kernel's RSS high-water mark (``echo 5 >
/proc/self/clear_refs`` resets VmHWM) and reports ``VmHWM − VmRSS_before`` after one forward+backward: the
extra memory the step needed on top of inputs and imports. Where clear_refs is unavailable it falls back to
``ru_maxrss`` minus RSS before the step (an under-estimate only if importing peaked higher than the step).
A fresh process per repeat keeps allocator state from one variant out of the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import PeakRSS

B, T, V, H = 8, 512, 32000, 256


def _child(variant: str, token_chunk: int, timing_iters: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from alignkit.logprobs import chunked_token_logps

    torch.manual_seed(0)
    hidden = torch.randn(B * T, H, requires_grad=True)
    weight = (torch.randn(V, H) * H**-0.5).requires_grad_()
    targets = torch.randint(0, V, (B * T,))

    def step() -> None:
        if variant == "naive":
            logps = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
        else:
            logps = chunked_token_logps(hidden, weight, targets, token_chunk=token_chunk)["logps"]
        (-logps.mean()).backward()
        hidden.grad = weight.grad = None

    mem = PeakRSS()
    mem.reset()
    wall, cpu = [], []
    for i in range(1 + timing_iters):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            peak_mb = mem.peak_mb()
    return {"peak_mb": peak_mb, "wall_s": min(wall), "cpu_s": min(cpu), "method": mem.method}


def _run(variant: str, token_chunk: int, timing_iters: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--token-chunks", str(token_chunk)]
    cmd += ["--timing-iters", str(timing_iters)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per variant")
    ap.add_argument("--timing-iters", type=int, default=1, help="extra timed steps per subprocess (min is kept)")
    ap.add_argument("--token-chunks", default="1024", help="comma-separated token_chunk values for 'chunked'")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    chunks = [int(c) for c in args.token_chunks.split(",")]
    if args.child:
        print(json.dumps(_child(args.child, chunks[0], args.timing_iters)))
        return

    variants = [("naive", 0)] + [("chunked", c) for c in chunks]
    results: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleave variants so machine-load drift hits all of them alike
        for v in variants:
            results[v].append(_run(*v, args.timing_iters))

    full_mb = B * T * V * 4 / 2**20
    print(f"B={B} T={T} (N={B * T}) V={V} H={H}, fp32 CPU, forward+backward; one [N,V] fp32 copy = {full_mb:.0f} MB")
    print(f"memory method: {results[variants[0]][0]['method']} delta; medians over {args.repeats} subprocesses")
    med = lambda v, key: statistics.median(r[key] for r in results[v])
    head = ["variant", "peak extra MB", "naive/this", "wall s", "this/naive", "CPU s", "this/naive"]
    print("".join(f"{h:>14}" if i else f"{h:<20}" for i, h in enumerate(head)))
    base = variants[0]
    for v in variants:
        label = v[0] if v[0] == "naive" else f"{v[0]} (C={v[1]})"
        mem, wall, cpu = med(v, "peak_mb"), med(v, "wall_s"), med(v, "cpu_s")
        cells = [
            f"{mem:.0f}",
            f"{med(base, 'peak_mb') / mem:.1f}x",
            f"{wall:.2f}",
            f"{wall / med(base, 'wall_s'):.2f}x",
        ]
        cells += [f"{cpu:.2f}", f"{cpu / med(base, 'cpu_s'):.2f}x"]
        print(f"{label:<20}" + "".join(f"{c:>14}" for c in cells))
    print("wall time is noisy on shared cores; CPU time (process_time, all threads) is the steadier speed signal")


if __name__ == "__main__":
    main()
