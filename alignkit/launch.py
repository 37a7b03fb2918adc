"""`alignkit launch`: start a loop on several processes, nodes or a cluster, through the tools the field uses.

Nothing here manages processes: it writes the ``torchrun`` command (one node: ``--standalone``; several: the
c10d rendezvous), an ``sbatch`` script for SLURM, or a SkyPilot task for cloud GPUs, and runs or submits it.

    alignkit launch --nproc 8 sft --config sft.yaml                       # torchrun on this machine
    alignkit launch --nnodes 2 --nproc 8 --node-rank 0 --rdzv head:29500 sft ...   # on each node
    alignkit launch --nnodes 2 --nproc 8 --slurm job.sh [--submit] sft ...        # an sbatch script
    alignkit launch --nnodes 2 --nproc 8 --skypilot task.yaml sft ...             # a SkyPilot task
    alignkit launch --dry-run ...                                                 # print, run nothing
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LaunchPlan", "add_arguments", "plan_from_args", "torchrun_command", "slurm_script", "skypilot_task"]


@dataclass(frozen=True)
class LaunchPlan:
    loop_args: list[str]  # `sft --config x.yaml key=value ...`: what every rank runs after `-m alignkit`
    nproc: int = 1  # processes per node (one per GPU)
    nnodes: int = 1
    node_rank: int | None = None  # this node's rank (torchrun on each node yourself)
    rdzv: str | None = None  # HOST:PORT of the rendezvous (node 0); several nodes need it (SLURM/SkyPilot set it)
    job_name: str = "alignkit"
    gpus_per_node: int | None = None  # SLURM --gpus-per-node / SkyPilot accelerators (default: nproc)
    accelerator: str = "H100"  # SkyPilot accelerator type
    setup: str = "pip install alignkit"  # SkyPilot setup command on every node


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, help="processes per node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (with --rdzv, on each node)")
    p.add_argument("--rdzv", default=None, help="HOST:PORT of node 0 for the c10d rendezvous")
    p.add_argument("--job-name", default="alignkit")
    p.add_argument("--gpus-per-node", type=int, default=None, help="SLURM / SkyPilot GPUs per node (default nproc)")
    p.add_argument("--accelerator", default="H100", help="SkyPilot accelerator type")
    p.add_argument("--setup", default="pip install alignkit", help="SkyPilot setup command")
    p.add_argument("--slurm", metavar="FILE", help="write an sbatch script to FILE (run nothing else)")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit the script with sbatch")
    p.add_argument("--skypilot", metavar="FILE", help="write a SkyPilot task YAML to FILE")
    p.add_argument("--dry-run", action="store_true", help="print what would run or be written; run nothing")
    p.add_argument("loop_args", nargs=argparse.REMAINDER, help="the loop and its arguments: sft --config ... k=v")


def plan_from_args(a: argparse.Namespace) -> LaunchPlan:
    if a.nproc < 1 or a.nnodes < 1:
        raise ValueError(f"--nproc and --nnodes must be >= 1, got {a.nproc} and {a.nnodes}")
    if not a.loop_args:
        raise ValueError("name the loop to launch and its arguments, e.g. `alignkit launch --nproc 2 sft k=v`")
    if a.nnodes > 1 and not (a.slurm or a.skypilot) and (a.rdzv is None or a.node_rank is None):
        raise ValueError("several nodes need --rdzv HOST:PORT and --node-rank (or --slurm / --skypilot to set them)")
    return LaunchPlan(list(a.loop_args), a.nproc, a.nnodes, a.node_rank, a.rdzv, a.job_name, a.gpus_per_node,
                      a.accelerator, a.setup)  # fmt: skip


def _rendezvous(plan: LaunchPlan, endpoint: str, node_rank: str, run_id: str) -> list[str]:
    return ["--nnodes", str(plan.nnodes), "--node-rank", node_rank, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]  # fmt: skip


def torchrun_command(plan: LaunchPlan, python: str = sys.executable) -> list[str]:
    """The torchrun command line of ``plan`` on this node: ``--standalone`` on one node, else the c10d rendezvous."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={plan.nproc}"]
    if plan.nnodes == 1 and plan.rdzv is None:
        cmd.append("--standalone")
    else:
        cmd += _rendezvous(plan, str(plan.rdzv), str(plan.node_rank or 0), plan.job_name)
    return [*cmd, "-m", "alignkit", *plan.loop_args]


def slurm_script(plan: LaunchPlan) -> str:
    """An sbatch script: one task per node, each running torchrun against node 0 of the allocation."""
    gpus = plan.gpus_per_node or plan.nproc
    loop = shlex.join(plan.loop_args)
    return f"""#!/bin/bash
#SBATCH --job-name={plan.job_name}
#SBATCH --nodes={plan.nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --output={plan.job_name}-%j.out
# written by `alignkit launch --slurm`; output_dir must be on a file system every node sees
set -euo pipefail
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {plan.nproc} --node-rank "$SLURM_NODEID" \\
     --rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" --rdzv-id "$SLURM_JOB_ID" -m alignkit {loop}
"""


def skypilot_task(plan: LaunchPlan) -> str:
    """A SkyPilot task YAML: ``num_nodes`` nodes of ``gpus_per_node`` accelerators, torchrun on each against the
    first node's IP (SkyPilot's ``SKYPILOT_NODE_IPS`` / ``SKYPILOT_NODE_RANK``)."""
    import yaml

    gpus = plan.gpus_per_node or plan.nproc
    run = ('HEAD=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)\n'
           f"torchrun --nnodes {plan.nnodes} --nproc-per-node {plan.nproc} --node-rank \"$SKYPILOT_NODE_RANK\" "
           f'--rdzv-backend c10d --rdzv-endpoint "$HEAD:29500" --rdzv-id {plan.job_name} '
           f"-m alignkit {shlex.join(plan.loop_args)}\n")  # fmt: skip
    task = {
        "name": plan.job_name,
        "num_nodes": plan.nnodes,
        "resources": {"accelerators": f"{plan.accelerator}:{gpus}"},
        "setup": plan.setup,
        "run": run,
    }

    class Dumper(yaml.SafeDumper):  # multi-line strings as `|` blocks: the run script reads as a script
        pass

    def block(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)

    Dumper.add_representer(str, block)
    return yaml.dump(task, Dumper=Dumper, sort_keys=False)


def launch(a: argparse.Namespace) -> int:
    """Run ``alignkit launch``: write, print, submit or run what the arguments ask for; returns an exit status."""
    plan = plan_from_args(a)
    if a.slurm or a.skypilot:
        path, text = (Path(a.slurm), slurm_script(plan)) if a.slurm else (Path(a.skypilot), skypilot_task(plan))
        if a.dry_run:
            print(f"# would write {path}\n{text}")
            return 0
        path.write_text(text)
        print(f"[alignkit launch] wrote {path}", file=sys.stderr)
        if a.slurm and a.submit:
            if shutil.which("sbatch") is None:
                raise FileNotFoundError("--submit: sbatch is not on PATH (run `sbatch FILE` on the cluster)")
            return subprocess.call(["sbatch", str(path)])
        return 0
    cmd = torchrun_command(plan)
    if a.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"[alignkit launch] {shlex.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)
