"""``workbench tiny [DIR]``: write the tiny SDXL/SD1.5 pipelines and Pick-a-Pic parquet that configs/tiny use."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", nargs="?", default=".cache/tiny")


def main(args: argparse.Namespace) -> int:
    from workbench.tiny import write_tiny_fixtures

    for name, path in write_tiny_fixtures(args.directory).items():
        print(f"{name:10s} {path}")
    return 0
