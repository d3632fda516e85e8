"""``workbench validate CONFIG [overrides]``: exit 0 when the config is valid and ``workbench train`` would start,
else name the bad key and exit 2 (the ``ConfigError`` is printed by ``workbench.cli``). Beside the schema it checks
what ``train`` checks before loading anything: packages (:func:`workbench.config.check_environment`) and the run
directory (:func:`workbench.rundir.check_run_dir`: a run there already, a resume with a changed config)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--print", action="store_true", help="print the resolved config")


def main(args: argparse.Namespace) -> int:
    from workbench.config import check_environment, load_config, resolved_yaml
    from workbench.rundir import check_run_dir

    cfg = load_config(args.config, args.overrides)
    check_environment(cfg)
    check_run_dir(cfg)
    if args.print:
        print(resolved_yaml(cfg), end="")
    else:
        print(
            f"{args.config}: ok (objective {cfg.objective.name}, {cfg.model.finetune}, {cfg.train.max_steps} steps)"
        )
    return 0
