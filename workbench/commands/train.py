"""``workbench train CONFIG [key.sub=value ...]``; multi-GPU: ``accelerate launch -m workbench train CONFIG``.

A run directory that already holds a run is refused unless ``train.resume=latest`` continues it or
``train.overwrite=true`` replaces it (or a new ``run.name`` is given); a resume may not change what is trained
(:mod:`workbench.rundir`). These checks run before anything loads."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.max_steps=20 optimizer.lr=1e-5; into an existing run: "
        "train.resume=latest (continue) or train.overwrite=true (replace)",
    )
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")


def main(args: argparse.Namespace) -> int:
    from workbench.config import check_environment, load_config
    from workbench.train import TrainingError, train

    cfg = load_config(args.config, args.overrides)  # config, data and model errors: workbench.cli prints them
    check_environment(cfg)
    try:
        run_dir = train(cfg, show_progress=not args.no_progress)
    except TrainingError as exc:  # a run that cannot go on (non-finite losses...): a message, not a traceback
        print(f"workbench train: error: {exc}", file=sys.stderr)
        return 2
    print(f"run finished: {run_dir}")
    return 0
