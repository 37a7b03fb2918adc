"""Command line: `alignkit sft --config file.yaml key=value ...`, `alignkit plot RUN_DIR`, `alignkit demo`."""

from __future__ import annotations

import argparse
import sys

from alignkit.config import ConfigError, load_config

# command -> (module, config dataclass, run function); imported only when that command runs
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("alignkit.loops.sft", "SFTConfig", "train_sft"),
    "dpo": ("alignkit.loops.dpo", "DPOConfig", "train_dpo"),
    "kto": ("alignkit.loops.kto", "KTOConfig", "train_kto"),
    "reward": ("alignkit.loops.reward_model", "RewardConfig", "train_reward"),
    "grpo": ("alignkit.loops.grpo", "GRPOConfig", "train_grpo"),
    "rloo": ("alignkit.loops.rloo", "RLOOConfig", "train_rloo"),
    "prm": ("alignkit.loops.prm", "PRMConfig", "train_prm"),
    "demo": ("alignkit.demo", "DemoConfig", "run_demo"),
}


def _available() -> dict[str, tuple[str, str, str]]:
    import importlib.util

    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="alignkit", description="post-training in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = _available()
    for name in commands:
        p = sub.add_parser(name, help=f"run `{name}` (config keys as key=value)")
        p.add_argument("--config", help="YAML file of config keys")
        p.add_argument("overrides", nargs="*", help="key=value pairs overriding the config file")
    p = sub.add_parser("plot", help="plot RUN_DIR/metrics.jsonl to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.command == "plot":
        from alignkit.plot import plot_run

        print(plot_run(args.run_dir, args.out))
        return 0
    import importlib

    module_name, config_name, run_name = commands[args.command]
    module = importlib.import_module(module_name)
    try:
        cfg = load_config(getattr(module, config_name), args.config, args.overrides)
    except ConfigError as e:
        print(f"alignkit {args.command}: {e}", file=sys.stderr)
        return 2
    getattr(module, run_name)(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
