"""The ``workbench`` command line (also ``python -m workbench``).

Each subcommand lives in ``workbench/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``main(args) -> int``. Command modules import torch and friends inside ``main`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help). Explicit, no discovery.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "workbench.commands.train",
        "fine-tune a model from a YAML config: train CONFIG [key=value ...]",
    ),
    "validate": ("workbench.commands.validate", "check a YAML config (and overrides) without running it"),
    "ls": ("workbench.commands.ls", "list registered objectives, scorers and samplers"),
    "toy": (
        "workbench.commands.toy",
        "toy world: pretrain its pipeline, render images and pairs, measure adherence",
    ),
    "export": (
        "workbench.commands.export",
        "write base + checkpoint as one A1111/ComfyUI single-file checkpoint",
    ),
    "tiny": (
        "workbench.commands.tiny",
        "write tiny SDXL/SD1.5 test pipelines and data (configs/tiny use them)",
    ),
    "generate": (
        "workbench.commands.generate",
        "images from checkpoints with explicit seeds + a JSONL manifest",
    ),
    "eval": (
        "workbench.commands.evaluate",
        "checkpoints x prompts x seeds -> scores, win rates vs base, report",
    ),
    "synth": (
        "workbench.commands.synth",
        "K scored samples per prompt -> preference pairs (parquet) + rankings",
    ),
    "relabel": (
        "workbench.commands.relabel",
        "add scorer scores + SmPO soft labels to a pair dataset in place (resumable)",
    ),
    "demo": ("workbench.commands.demo", "the main job end to end on CPU: toy pairs -> Diffusion-DPO -> eval"),
    "score": (
        "workbench.commands.score",
        "score images or a generate manifest with registered scorers: table + JSON",
    ),
    "app": (
        "workbench.commands.app",
        "the Gradio app: compare checkpoints, arena votes, curate your images (127.0.0.1, no share link)",
    ),
    "votes": ("workbench.commands.votes", "the app's vote store: export for training, statistics"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Diffusion alignment workbench: preference fine-tuning, scoring, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
