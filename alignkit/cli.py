"""Command line: `alignkit sft --config file.yaml key=value ...`, `alignkit plot RUN_DIR`, `alignkit demo`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.config import ConfigError, load_config


@dataclass
class Command:
    config_cls: Callable[[], type]
    run: Callable[[Any], Any]
    help: str


def _sft() -> Command:
    from alignkit.loops.sft import SFTConfig, train_sft

    return Command(lambda: SFTConfig, lambda cfg: train_sft(cfg), "supervised fine-tuning")


def _demo() -> Command:
    from alignkit.demo import DemoConfig, run_demo

    return Command(lambda: DemoConfig, run_demo, "embedded tiny-model demo (no downloads, no GPU)")


# Training commands: name -> lazy loader (imports torch only when used)
COMMANDS: dict[str, Callable[[], Command]] = {"sft": _sft, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="alignkit", description="post-training in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
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
    cmd = COMMANDS[args.command]()
    try:
        cfg = load_config(cmd.config_cls(), args.config, args.overrides)
    except ConfigError as e:
        print(f"alignkit {args.command}: {e}", file=sys.stderr)
        return 2
    cmd.run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
