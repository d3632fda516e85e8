"""``workbench validate CONFIG [overrides]``: exit 0 when the config is valid, else name the bad key and exit 2."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--print", action="store_true", help="print the resolved config")


def main(args: argparse.Namespace) -> int:
    from workbench.config import ConfigError, load_config, resolved_yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print:
        print(resolved_yaml(cfg), end="")
    else:
        print(
            f"{args.config}: ok (objective {cfg.objective.name}, {cfg.model.finetune}, {cfg.train.max_steps} steps)"
        )
    return 0
