"""``workbench train CONFIG [key.sub=value ...]``; multi-GPU: ``accelerate launch -m workbench train CONFIG``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 optimizer.lr=1e-5"
    )
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")


def main(args: argparse.Namespace) -> int:
    from workbench.config import ConfigError, load_config
    from workbench.data import DataError
    from workbench.models import ModelLoadError
    from workbench.train import TrainingError, train

    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = train(cfg, show_progress=not args.no_progress)
    except (ConfigError, DataError, ModelLoadError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run finished: {run_dir}")
    return 0
