"""`alignkit launch`: the torchrun command for one node and for a 2-node rendezvous, the SLURM script, the SkyPilot
task (checked by SkyPilot's own parser when it is installed), a bad config refused before anything starts, and a
real 2-process job on CPU."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main

LOOP = ["sft", "model=m", "dataset=d.jsonl", "grad_accum=16"]


def _dry(capsys, *args: str) -> str:
    assert main(["launch", *args, "--dry-run", *LOOP]) == 0
    return capsys.readouterr().out


def test_one_node_is_standalone_torchrun(capsys):
    cmd = shlex.split(_dry(capsys, "--nproc", "8"))
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=8"] and "--standalone" in cmd
    assert cmd[cmd.index("-m", 2) :] == ["-m", "alignkit", *LOOP]


def test_two_nodes_use_the_c10d_rendezvous(capsys):
    cmd = shlex.split(_dry(capsys, "--nnodes", "2", "--nproc", "8", "--node-rank", "1", "--rdzv", "head:29500"))
    flags = dict(zip(cmd[4:14:2], cmd[5:15:2]))
    assert flags == {"--nnodes": "2", "--node-rank": "1", "--rdzv-backend": "c10d", "--rdzv-endpoint": "head:29500",
                     "--rdzv-id": "alignkit"}  # fmt: skip
    assert "--standalone" not in cmd
    # several nodes without a rendezvous: refused, naming what is missing
    assert main(["launch", "--nnodes", "2", "--nproc", "8", "--dry-run", *LOOP]) == 2
    assert "--rdzv HOST:PORT and --node-rank" in capsys.readouterr().err


def test_slurm_script(capsys, tmp_path):
    out = _dry(capsys, "--nnodes", "2", "--nproc", "4", "--slurm", str(tmp_path / "job.sh"), "--job-name", "rm")
    assert not (tmp_path / "job.sh").exists()  # dry run: printed only
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --job-name=rm"):  # fmt: skip
        assert line in out
    assert '--rdzv-endpoint "$HEAD:29500" --rdzv-id "$SLURM_JOB_ID" -m alignkit ' + shlex.join(LOOP) in out
    assert main(["launch", "--nnodes", "2", "--nproc", "4", "--slurm", str(tmp_path / "job.sh"), *LOOP]) == 0
    script = (tmp_path / "job.sh").read_text()
    assert script.startswith("#!/bin/bash") and subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    if not any((Path(p) / "sbatch").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        rc = main(["launch", "--nnodes", "2", "--nproc", "4", "--slurm", str(tmp_path / "j2.sh"), "--submit", *LOOP])
        assert rc == 2 and "sbatch is not on PATH" in capsys.readouterr().err


def test_skypilot_task(capsys, tmp_path):
    out = _dry(capsys, "--nnodes", "2", "--nproc", "8", "--skypilot", str(tmp_path / "t.yaml"), "--accelerator", "A100")
    task = yaml.safe_load(out.split("\n", 1)[1])
    assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "A100:8"}
    assert '--node-rank "$SKYPILOT_NODE_RANK"' in task["run"] and "-m alignkit " + shlex.join(LOOP) in task["run"]
    assert main(["launch", "--nnodes", "2", "--nproc", "8", "--skypilot", str(tmp_path / "t.yaml"), *LOOP]) == 0


def test_skypilot_parser_reads_the_task(capsys, tmp_path):
    # SkyPilot pins click<8.2, which huggingface-hub and wandb refuse: it is not in the test venv, only where a user
    # has it (in its own venv)
    sky = pytest.importorskip("sky", reason="SkyPilot is not installed (its click pin conflicts with the test venv)")
    assert main(["launch", "--nnodes", "2", "--nproc", "8", "--skypilot", str(tmp_path / "t.yaml"), *LOOP]) == 0
    task = sky.Task.from_yaml(str(tmp_path / "t.yaml"))
    assert task.num_nodes == 2


def test_bad_config_is_refused_before_launching(capsys):
    rc = main(["launch", "--nproc", "2", "--dry-run", "sft", "model=m", "grad_accum=3"])
    assert rc == 2 and "grad_accum=3: expected a multiple of the WORLD_SIZE=2 ranks" in capsys.readouterr().err
    assert main(["launch", "--nproc", "2", "--dry-run", "nosuchloop"]) == 2


def test_launch_runs_a_two_process_job(tmp_path):
    from alignkit.data.byte_tokenizer import byte_tokenizer
    from alignkit.demo import make_rows
    from alignkit.metrics import read_metrics
    from alignkit.models import build_tiny_model, tiny_llama_config

    tok = byte_tokenizer()
    build_tiny_model(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2, kv_heads=2)).save_pretrained(
        tmp_path / "m"
    )
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in make_rows(32, 2, 0))
    )
    args = ["launch", "--nproc", "2", "sft", f"model={tmp_path / 'm'}", f"dataset={tmp_path / 'd.jsonl'}",
            f"output_dir={tmp_path / 'run'}", "chat_format=chatml", "max_steps=2", "grad_accum=2", "batch_size=4",
            "packing=false", "progress=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "alignkit", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "checkpoint-2" / "dcp").is_dir()  # the ranks saved a sharded checkpoint
