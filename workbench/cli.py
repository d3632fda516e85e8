"""The ``workbench`` command line (also ``python -m workbench``).

Each subcommand lives in ``workbench/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``main(args) -> int``. Command modules import torch and friends inside ``main`` so that ``--help`` stays fast.

Errors: a user error (a ``ValueError`` such as ``ConfigError`` / ``DataError`` / ``ModelLoadError``, a missing or
unreadable file, a non-UTF-8 text file, broken YAML) is one line ``workbench COMMAND: error: ...`` on stderr and exit
code 2; anything else is a bug and keeps its traceback, followed by a line saying so (exit code 1).
``WORKBENCH_TRACEBACK=1`` prints the traceback for user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path
from types import TracebackType

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
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `train CONFIG --no-progress a.b=c`: argparse fills the `overrides` positional before the flag and leaves
        # what follows it over; those are overrides too. Anything else stays an argparse error (exit code 2).
        if isinstance(getattr(args, "overrides", None), list) and not any(x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report_error(exc, args.command)


#: OSErrors that mean "this path is wrong", not "the machine is broken"; ValueError covers ConfigError, DataError,
#: ModelLoadError, StoreError, InputError and UnicodeDecodeError.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix (bad input, named in its message) rather than a bug."""
    import yaml

    return isinstance(exc, (ValueError, yaml.YAMLError, *_USER_OS_ERRORS))


def report_error(exc: BaseException, command: str) -> int:
    """Print ``exc`` for the user and return the exit code: 2 for user errors, 1 (with the traceback) for bugs."""
    if not is_user_error(exc):
        traceback.print_exception(exc)
        print(
            f"workbench {command}: unexpected error ({type(exc).__name__}): this is a bug in the workbench; please "
            "report it with the command line and the traceback above.",
            file=sys.stderr,
        )
        return 1
    if os.environ.get("WORKBENCH_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no"):
        traceback.print_exception(exc)
    print(f"workbench {command}: error: {describe_user_error(exc)}", file=sys.stderr)
    return 2


def describe_user_error(exc: BaseException) -> str:
    """The message of a user error: its own text, with the file named where Python's text does not say it."""
    if isinstance(exc, UnicodeDecodeError):
        where = _file_being_read(exc.__traceback__)
        byte = exc.object[exc.start : exc.start + 1]
        return (
            f"{where or 'a text file'}: not valid {exc.encoding} text (byte {byte!r} at offset {exc.start}); "
            "re-save it as UTF-8"
        )
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{target}: {exc.strerror}"
    return str(exc).strip() or type(exc).__name__


def _file_being_read(tb: TracebackType | None) -> str | None:
    """The innermost frame's local naming an existing file (``path``, ``p``, ``file``...): where a decode failed."""
    found = None
    while tb is not None:
        for name in ("path", "p", "file", "filename", "fname", "source"):
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, (str, Path)) and value and _is_file(value):
                found = str(value)
                break
        tb = tb.tb_next
    return found


def _is_file(path: str | Path) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a text that is no path (too long, NUL bytes)
        return False


if __name__ == "__main__":
    raise SystemExit(main())
