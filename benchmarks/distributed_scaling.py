"""1 vs 2 processes on this machine: SFT tokens/s, and the training state each rank holds under DDP vs FSDP2.

Two measurements, each in fresh processes started by torchrun (2 gloo ranks) or plainly (1 process):

1. **Throughput**: `alignkit sft` (packed, fp32) on a Llama-shaped 256x4 model, the same global batch per step
   in every configuration; tokens/s from `metrics.jsonl` (median of the steps after the first), wall time and
   the CPU time of all processes per step. The fair baseline on a 2-core machine is one process with 2 intra-op
   threads (`1 x none x 2`); two 1-thread ranks use the same cores, so the ratio says what splitting the batch
   over processes (and the gloo all-reduces) costs or gains against threads.
2. **State per rank**: a bigger model (hidden 512, 8 layers) parallelized with `alignkit.distributed.parallelize`,
   one AdamW step: the bytes of parameters, gradients and optimizer state that each rank holds locally (DTensor
   shards counted by their local size), and each rank's peak RSS. FSDP2 should hold about half of DDP's at 2 ranks.

    python benchmarks/distributed_scaling.py [--repeats 3] [--steps 8]

Last measured (2 shared CPU cores, 3 interleaved runs, medians): one process 4,476 tokens/s with 1 thread and
8,539 with 2; two 1-thread ranks 7,670 (DDP, 0.90x the 2-thread process) and 6,682 (FSDP2, 0.78x), CPU
2.2 / 2.9 / 3.2 s per step (1x2 / DDP / FSDP2). State per rank, 512x8 model: 488 MB in one process and under
DDP, 244 MB under FSDP2 (0.50x: params 61, grads 61, AdamW moments 122 MB); peak RSS 871 / 1,023 / 944 MB,
not halved, because each rank builds the whole model before sharding it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(threads: int = 1) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _launch(nproc: int, args: list[str], threads: int = 1) -> tuple[float, float]:
    """Run ``args`` (a python -m ... command tail) on ``nproc`` ranks; returns (wall s, CPU s of all processes)."""
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([*launch, *args], capture_output=True, text=True, env=_env(threads), timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{out.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _setup(d: Path) -> None:
    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.demo import make_rows
    from alignkit.models import build_tiny_model, tiny_llama_config

    tok = byte_tokenizer()
    build_tiny_model(tiny_llama_config(len(tok), hidden=256, layers=4, heads=4, kv_heads=2, tie=True)).save_pretrained(
        d / "model"
    )
    tok.save_pretrained(d / "model")
    rows = [{"messages": r["messages"]} for r in make_rows(2000, 4, seed=0)]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def throughput(d: Path, nproc: int, parallel: str, threads: int, steps: int, run: int) -> dict[str, float]:
    out = d / f"run-{nproc}-{parallel}-{threads}-{run}"
    args = ["-m", "alignkit", "sft", f"model={d / 'model'}", f"dataset={d / 'sft.jsonl'}", f"output_dir={out}",
            "chat_format=chatml", "packing=true", "max_length=256", "batch_size=8", "grad_accum=4",
            f"max_steps={steps}", "lr=1e-4", "progress=false", "save_every=100000", f"parallel={parallel}"]  # fmt: skip
    wall, cpu = _launch(nproc, args, threads)
    from alignkit.metrics import read_metrics

    recs = read_metrics(out)[1:]  # the first step pays for warm-up
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
        "step_s": statistics.median(r["step_time_s"] for r in recs),
        "cpu_s_per_step": cpu / steps,  # every process, start-up included
        "wall_s": wall,
    }


def state_worker(parallel: str, result: str) -> None:
    """One rank of the state measurement (run under torchrun, or plainly for one process)."""
    import torch

    from alignkit import distributed
    from alignkit.loops.common import make_optimizer
    from alignkit.loops.sft import SFTConfig
    from alignkit.models import build_tiny_model, tiny_llama_config

    cfg = SFTConfig(model="x", parallel=parallel, device="cpu", grad_accum=2)
    distributed.init(cfg, torch.device("cpu"))
    model = build_tiny_model(tiny_llama_config(1024, hidden=512, layers=8, heads=8, kv_heads=4, tie=True))
    distributed.parallelize(model, cfg)
    opt = make_optimizer(model, 1e-4)
    ids = torch.randint(0, 1024, (2, 128))
    with distributed.grad_sync(model, last=True):
        from alignkit.scoring import model_token_logps

        out = model_token_logps(model, ids, ids)
        distributed.backward(-(out["logps"].sum() / ids.numel()))

    def local_bytes(ts) -> int:  # noqa: ANN001
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in ts)

    grads = local_bytes([p.grad for p in model.parameters() if p.grad is not None])
    opt.step()
    optim = local_bytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0])
    mine = {
        "params_mb": local_bytes(list(model.parameters())) / 2**20,
        "grads_mb": grads / 2**20,
        "optim_mb": optim / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    every = distributed.all_gather_objects(mine)
    if distributed.is_main():
        Path(result).write_text(json.dumps(every))
    distributed.shutdown()


def state(d: Path, nproc: int, parallel: str) -> dict[str, float]:
    result = d / f"state-{nproc}-{parallel}.json"
    _launch(nproc, [str(Path(__file__).resolve()), "--state-worker", parallel, str(result)])
    ranks = json.loads(result.read_text())
    return {k: max(r[k] for r in ranks) for k in ranks[0]}  # the most any rank holds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--state-worker", nargs=2, metavar=("PARALLEL", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.state_worker:
        return state_worker(*a.state_worker)
    # (processes, parallel, threads per process): one process may use both cores through its intra-op threads
    configs = [(1, "none", 1), (1, "none", 2), (2, "ddp", 1), (2, "fsdp2", 1)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _setup(d)
        runs: dict[tuple[int, str], list[dict[str, float]]] = {c: [] for c in configs}
        for r in range(a.repeats):  # interleaved, so a noisy neighbour hurts every configuration alike
            for c in configs:
                runs[c].append(throughput(d, *c, a.steps, r))
        med = {c: {k: statistics.median(x[k] for x in v) for k in v[0]} for c, v in runs.items()}
        base = med[(1, "none", 2)]
        print(f"SFT, Llama 256x4 (tied), packed 8x256 tokens x 4 micro-batches per step, {a.repeats} runs:")
        print(f"{'procs x parallel x threads':>27} {'tokens/s':>10} {'vs 1x2':>7} {'step s':>8} {'CPU s/step':>10}")
        for (n, p, t), m in med.items():
            ratio = m["tokens_per_s"] / base["tokens_per_s"]
            print(f"{n:>14} x {p:>5} x {t} {m['tokens_per_s']:10.0f} {ratio:6.2f}x {m['step_s']:8.3f} "
                  f"{m['cpu_s_per_step']:10.2f}")  # fmt: skip
        mem = {(n, p): state(d, n, p) for n, p in [(1, "none"), (2, "ddp"), (2, "fsdp2")]}
        print("\nTraining state per rank, Llama 512x8 (tied, V=1024), one AdamW step (MB; the rank holding most):")
        print(f"{'config':>12} {'params':>8} {'grads':>8} {'optim':>8} {'total':>8} {'peak RSS':>9}")
        for (n, p), m in mem.items():
            total = m["params_mb"] + m["grads_mb"] + m["optim_mb"]
            print(f"{n} x {p:>8} {m['params_mb']:8.1f} {m['grads_mb']:8.1f} {m['optim_mb']:8.1f} {total:8.1f} "
                  f"{m['peak_rss_mb']:9.0f}")  # fmt: skip
        ddp, fsdp = mem[(2, "ddp")], mem[(2, "fsdp2")]
        keys = ("params_mb", "grads_mb", "optim_mb")
        print(f"\nFSDP2 / DDP state per rank at 2 ranks: {sum(fsdp[k] for k in keys) / sum(ddp[k] for k in keys):.2f}")
        print(json.dumps({"throughput": {f"{n}x{p}x{t}": m for (n, p, t), m in med.items()},
                          "state": {f"{n}x{p}": m for (n, p), m in mem.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
