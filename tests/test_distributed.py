"""Several processes on CPU: 2 gloo ranks under torchrun, through the CLI a user runs.

* Exactness: for SFT (packed), DPO (precomputed reference), GRPO, RLOO, the reward model, KTO and the PRM, under
  DDP and FSDP2 (LoRA too), every step's loss equals the one-process run over the same global batch to a relative
  1e-5 and the final weights to 1e-5 absolute (fp32; the only difference is the order of the gradient sums, which
  AdamW's division by sqrt(v) turns into update noise of order lr where a gradient entry is near zero: the RL
  cases train at lr=1e-3 for that reason).
* Checkpoints: both ranks SIGKILLed mid-run resume to the uninterrupted curve; a 2-rank checkpoint resumes in one
  process and a one-process checkpoint on 2 ranks (DDP).
* Failures: a killed rank makes the survivor exit non-zero naming the lost rank within 2 minutes (under torchrun
  and without it); a config that cannot be split over the ranks is refused before any process group exists.

Every subprocess has a timeout, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.data.byte_tokenizer import byte_tokenizer
from alignkit.demo import make_rows
from alignkit.metrics import read_metrics
from alignkit.models import build_tiny_model, tiny_llama_config

from .conftest import preference_rows

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for any one run; a hang fails the test
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # tests.distributed_support
    return env


def _command(cmd: str, args: list[str], nproc: int) -> list[str]:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launch, "-m", "alignkit", cmd, *args]


def alignkit(cmd: str, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """Run ``alignkit CMD ARGS`` in one process or under torchrun with ``nproc`` ranks; fails on a non-zero exit."""
    out = subprocess.run(_command(cmd, args, nproc), capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny Llama with TIED embeddings (FSDP2 must keep embedding and head in one group) and the data files."""
    d = tmp_path_factory.mktemp("dist")
    tok = byte_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # no dropout in the PRM's classifier: each rank draws its own masks, so no world size could repeat another's
    cfg = tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2, tie=True, eos_token_id=end,
                            pad_token_id=tok.pad_token_id, classifier_dropout=0.0)  # fmt: skip
    build_tiny_model(cfg, seed=0).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")

    def jsonl(name: str, rows: list[dict]) -> None:
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("sft.jsonl", [{"messages": r["messages"]} for r in make_rows(64, 2, seed=0)])
    jsonl("pairs.jsonl", preference_rows(32))
    jsonl("unpaired.jsonl", [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                             for p in preference_rows(16) for k in ("chosen", "rejected")])  # fmt: skip
    jsonl("prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(16)])
    jsonl("prm.jsonl", [{"prompt": f"{i}+{i}=?", "completions": [f"step {i}", f"so {2 * i + i % 2}"],
                         "labels": [True, i % 2 == 0]} for i in range(32)])  # fmt: skip
    return d


COMMON = ["chat_format=chatml", "progress=false", "max_steps=3", "save_every=1", "keep_last=5"]
LOOPS: dict[str, tuple[str, list[str]]] = {
    # SFT packs one row of documents per micro-batch: the ranks train on different numbers of tokens
    "sft": ("sft", ["dataset={w}/sft.jsonl", "packing=true", "max_length=64", "batch_size=4", "grad_accum=2",
                    "epochs=8", "lr=3e-3"]),
    "dpo": ("dpo", ["dataset={w}/pairs.jsonl", "batch_size=4", "grad_accum=2", "lr=1e-2",
                    "reference_cache_dir={out}/refcache"]),
    "kto": ("kto", ["dataset={w}/unpaired.jsonl", "batch_size=4", "grad_accum=2", "lr=1e-2",
                    "reference_cache_dir={out}/refcache"]),
    "reward": ("reward", ["dataset={w}/pairs.jsonl", "batch_size=4", "grad_accum=2", "lr=1e-3"]),
    "prm": ("prm", ["dataset={w}/prm.jsonl", "batch_size=4", "grad_accum=2", "lr=1e-3"]),
    # completions are a function of the prompt, so the round does not depend on how the ranks split it; padded
    # scoring everywhere (FSDP2 over ranks cannot share prompts: test_grpo_shared_prefix_under_ddp covers that path)
    "grpo": ("grpo", ["dataset={w}/prompts.jsonl", "backend=tests.distributed_support.prompt_function_generator",
                      "rewards=[tests.distributed_support.even_tokens]", "group_size=4", "prompts_per_step=4",
                      "micro_batch_size=4", "max_new_tokens=6", "lr=1e-3", "kl_coef=0.05",
                      "shared_prefix=false"]),
    "rloo": ("rloo", ["dataset={w}/prompts.jsonl", "backend=tests.distributed_support.prompt_function_generator",
                      "rewards=[tests.distributed_support.even_tokens]", "group_size=4", "prompts_per_step=4",
                      "micro_batch_size=2", "max_new_tokens=6", "lr=1e-3", "steps_per_generation=1",
                      "shared_prefix=false"]),
}  # fmt: skip


def _args(loop: str, work: Path, out: Path, *extra: str) -> tuple[str, list[str]]:
    cmd, args = LOOPS[loop]
    args = [a.format(w=work, out=out) for a in args]
    return cmd, [f"model={work / 'model'}", f"output_dir={out}", *COMMON, *args, *extra]


_baselines: dict[str, Path] = {}


def baseline(loop: str, work: Path, extra: tuple[str, ...] = ()) -> Path:
    """The one-process run of ``loop`` (made once per module)."""
    key = f"{loop}{extra}"
    if key not in _baselines:
        out = work / f"one-{loop}-{len(_baselines)}"
        alignkit(*_args(loop, work, out, *extra))
        _baselines[key] = out
    return _baselines[key]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / f"checkpoint-{step}"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


def assert_same_run(a: Path, b: Path, steps: int = 3) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, steps + 1))
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) <= LOSS_RTOL * max(1.0, abs(x["loss"])), (x["step"], x["loss"], y["loss"])
        for k in ("num_tokens", "num_trained_tokens", "num_pairs"):
            assert x.get(k) == y.get(k), (k, x.get(k), y.get(k))
    wa, wb = weights(a, steps), weights(b, steps)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= WEIGHT_ATOL, worst
    assert ra[-1]["loss"] != ra[0]["loss"]  # the runs trained: equal weights are not just the initial weights


CASES = [(loop, p) for loop in LOOPS for p in ("ddp", "fsdp2")]


@pytest.mark.parametrize(("loop", "parallel"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_two_ranks_equal_one_process(work, loop, parallel):
    out = work / f"two-{loop}-{parallel}"
    cmd, args = _args(loop, work, out, f"parallel={parallel}")
    if loop == "sft" and parallel == "ddp":
        alignkit(cmd, [*args, "nproc=2", "progress=true"])  # `nproc=2` starts torchrun; rank 1's bar is disabled
    else:
        alignkit(cmd, args, nproc=2)
    assert_same_run(baseline(loop, work), out)
    ckpt = out / "checkpoint-3"
    assert (ckpt / "dcp").is_dir() and sorted(p.name for p in (ckpt / "ranks").iterdir()) == ["rank-0", "rank-1"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_lora_two_ranks_equal_one_process(work, parallel):
    out = work / f"two-lora-{parallel}"
    cmd, args = _args("sft", work, out, "lora_r=4", f"parallel={parallel}")
    alignkit(cmd, args, nproc=2)
    assert_same_run(baseline("sft", work, ("lora_r=4",)), out)


REFERENCE_CASES = {
    "model": ("reference=model",),  # a frozen copy, sharded like the policy
    "tr_dpo": ("reference=tr_dpo", "tr_dpo_sync_steps=1", "tr_dpo_alpha=0.5"),  # synced every step on every rank
    "lora": ("reference=lora", "lora_r=4"),  # the policy with its adapter off
}


@pytest.mark.parametrize("kind", list(REFERENCE_CASES))
def test_dpo_references_under_fsdp2(work, kind):
    extra = REFERENCE_CASES[kind]
    out = work / f"two-dpo-ref-{kind}"
    cmd, args = _args("dpo", work, out, *extra, "parallel=fsdp2")
    alignkit(cmd, args, nproc=2)
    assert_same_run(baseline("dpo", work, extra), out)
    if kind == "tr_dpo":  # the synced reference is saved gathered and resumed sharded
        _drop_after(out, 1)
        alignkit(cmd, [*args, "resume=true"], nproc=2)
        assert_same_run(baseline("dpo", work, extra), out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_grpo_hf_backend_two_ranks_equal_one_process(work, parallel):
    """The HF backend seeds each sample by its prompt's place in the round, so 2 ranks sample the completions one
    process samples (FSDP2: through the sharded policy, the ranks decoding in step): the same run."""
    extra = ("backend=hf", "max_new_tokens=8")
    out = work / f"two-grpo-hf-{parallel}"
    cmd, args = _args("grpo", work, out, *extra, f"parallel={parallel}")
    alignkit(cmd, args, nproc=2)
    one = baseline("grpo", work, extra)
    assert_same_run(one, out)
    lengths = [r["completions/mean_length"] for r in read_metrics(one)]
    assert lengths == [r["completions/mean_length"] for r in read_metrics(out)] and len(set(lengths)) > 1  # sampled


def test_grpo_shared_prefix_under_ddp(work):
    """Shared-prompt scoring (one prompt pass per group) through DDP's forward equals one process doing the same."""
    out = work / "two-grpo-shared-ddp"
    cmd, args = _args("grpo", work, out, "shared_prefix=true", "parallel=ddp")
    alignkit(cmd, args, nproc=2)
    assert_same_run(baseline("grpo", work, ("shared_prefix=true",)), out)


def test_fsdp2_bf16_mixed_policy(work):
    """precision=bf16-mixed under FSDP2 is its mixed-precision policy (bf16 compute, fp32 reduction, fp32
    sharded weights): the loss curve stays within 3% of fp32's and the exported weights are fp32."""
    out = work / "two-sft-bf16"
    cmd, args = _args("sft", work, out, "parallel=fsdp2", "precision=bf16-mixed")
    alignkit(cmd, args, nproc=2)
    fp32, bf16 = read_metrics(baseline("sft", work)), read_metrics(out)
    assert all(abs(a["loss"] - b["loss"]) <= 0.03 * abs(a["loss"]) for a, b in zip(fp32, bf16)), (fp32, bf16)
    assert all(abs(a["loss"] - b["loss"]) > 0 for a, b in zip(fp32, bf16))  # bf16 really computed
    assert bf16[-1]["loss"] < bf16[0]["loss"]
    assert all(t.dtype == torch.float32 for t in weights(out, 3).values())


def test_ranks_train_on_different_token_counts(work):
    """The packed SFT case above really splits a step unevenly: its two ranks' trained-token counts differ."""
    from alignkit.data.loading import load_rows
    from alignkit.data.tokenize import tokenize_dataset
    from alignkit.logprobs import IGNORE_INDEX
    from alignkit.loops.common import plan_steps
    from alignkit.loops.sft import SFTConfig

    cfg = SFTConfig(model="x", max_length=64, batch_size=4, grad_accum=2, epochs=8, packing=True, max_steps=3)
    ds, _ = tokenize_dataset(load_rows(str(work / "sft.jsonl")), byte_tokenizer(), chat_format="chatml",
                             max_length=64)  # fmt: skip
    train = ds.to_list()
    plan, _ = plan_steps([len(e["input_ids"]) for e in train], cfg, pack_tokens=4 * 64)
    per_rank = [[sum(x != IGNORE_INDEX for i in plan[s][r] for x in train[i]["labels"]) for r in (0, 1)]
                for s in range(3)]  # fmt: skip
    assert any(a != b for a, b in per_rank), per_rank


def test_bad_split_is_refused_before_any_process_group(work):
    cmd, args = _args("sft", work, work / "bad-split", "grad_accum=3")
    out = subprocess.run(_command(cmd, args, 2), capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert out.returncode != 0
    assert "grad_accum=3: expected a multiple of the WORLD_SIZE=2 ranks" in out.stderr
    assert "init_process_group" not in out.stderr and not (work / "bad-split").exists()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: kill, resume, change the world size
# ---------------------------------------------------------------------------------------------------------------


def _drop_after(run: Path, step: int) -> None:
    """Make ``run`` look as if it had stopped after checkpoint ``step``."""
    import shutil

    for p in run.glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    (run / "latest").write_text(f"checkpoint-{step}")


RESIZES = [(2, "fsdp2", 1, "auto"), (2, "ddp", 1, "auto"), (1, "auto", 2, "ddp"), (1, "auto", 2, "fsdp2")]


@pytest.mark.parametrize(("saved_by", "saved_as", "resumed_by", "resumed_as"), RESIZES,
                         ids=[f"{a}{b}-to-{c}{d}" for a, b, c, d in RESIZES])  # fmt: skip
def test_resume_on_another_world_size(work, saved_by, saved_as, resumed_by, resumed_as):
    import shutil

    out = work / f"resize-{saved_by}{saved_as}-{resumed_by}{resumed_as}"
    cmd, args = _args("sft", work, out)
    if saved_by == 1:
        shutil.copytree(baseline("sft", work), out)
    else:
        alignkit(cmd, [*args, f"parallel={saved_as}"], nproc=2)
    _drop_after(out, 1)
    alignkit(cmd, [*args, "resume=true", f"parallel={resumed_as}"], nproc=resumed_by)
    assert_same_run(baseline("sft", work), out)


def _wait_for(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _worker_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the processes below ``launcher`` that run a rank (read from their environment)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            stat = (proc / "stat").read_text().split(")")[-1].split()
        except (OSError, ValueError):
            continue
        if env.get("ALIGNKIT_TEST_LAUNCHER") == str(launcher) and "RANK" in env and stat[0] != "Z":
            out[int(env["RANK"])] = int(proc.name)
    return out


def _start(cmd: str, args: list[str], nproc: int, tag: str) -> subprocess.Popen:
    env = {**_env(), "ALIGNKIT_TEST_LAUNCHER": tag}
    return subprocess.Popen(_command(cmd, args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)  # fmt: skip


def test_sigkill_both_ranks_then_resume_is_exact(work):
    long = ("max_steps=12", "epochs=30")
    ref = work / "kill-ref"
    cmd, args = _args("sft", work, ref, "parallel=fsdp2", *long)
    alignkit(cmd, args, nproc=2)

    out = work / "kill-run"
    cmd, args = _args("sft", work, out, "parallel=fsdp2", *long)
    proc = _start(cmd, args, 2, "kill-run")
    try:
        _wait_for(lambda: (out / "checkpoint-3").is_dir(), TIMEOUT, "checkpoint-3")
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once, mid-run
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = len(read_metrics(out))
    assert 3 <= done < 12, done
    alignkit(cmd, [*args, "resume=true"], nproc=2)
    assert_same_run(ref, out, steps=12)
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(ref)]


@pytest.mark.parametrize("launcher", ["torchrun", "plain"])
def test_killed_rank_fails_the_survivor_naming_it(work, launcher):
    out = work / f"lost-{launcher}"
    cmd, args = _args("sft", work, out, "max_steps=400", "epochs=200", "save_every=1000", "dist_timeout_s=100")
    tag = f"lost-{launcher}"
    if launcher == "torchrun":
        procs = [_start(cmd, args, 2, tag)]
    else:  # two processes started by hand, as a cluster scheduler might: no agent to stop the survivor
        port = str(29500 + os.getpid() % 1000)
        procs = []
        for r in (0, 1):
            env = {**_env(), "ALIGNKIT_TEST_LAUNCHER": tag, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
            procs.append(subprocess.Popen(_command(cmd, args, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, env=env, start_new_session=True))  # fmt: skip
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 2, TIMEOUT, "training")
        pids = _worker_pids(tag) if launcher == "torchrun" else {0: procs[0].pid, 1: procs[1].pid}
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        survivor = procs[0]
        text, _ = survivor.communicate(timeout=120)
        assert time.monotonic() - t0 < 120
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert survivor.returncode != 0
    assert f"rank 1 (pid {pids[1]}" in text, text[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 in one process: a process group of one (CPU here; CUDA + NCCL on a GPU machine, gpu_check.sh)
# ---------------------------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs CUDA (run by benchmarks/gpu_check.sh on a GPU machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])]


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_world_size_one(work, device):
    """parallel=fsdp2 without torchrun: a group of one (NCCL on CUDA), a sharded checkpoint saved and resumed,
    and an HF export that plain transformers loads; in fp32 the run equals the unwrapped one-process run."""
    from transformers import AutoModelForCausalLM

    out = work / f"fsdp2-one-{device}"
    cmd, args = _args("sft", work, out, "parallel=fsdp2", f"device={device}")
    alignkit(cmd, args)
    assert (out / "checkpoint-3" / "dcp").is_dir()
    if device == "cpu":
        assert_same_run(baseline("sft", work), out)
    _drop_after(out, 2)
    alignkit(cmd, [*args, "resume=true"])
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in recs)
    hf = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    assert torch.equal(hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)  # tied, as trained
    exported = weights(out, 3)
    assert all(torch.equal(exported[k], v) for k, v in hf.state_dict().items() if k in exported)
