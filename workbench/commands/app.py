"""``workbench app``: the Gradio app (Compare, Arena, Curate, Votes) on the toy world by default.

Binds 127.0.0.1 unless ``--host`` says otherwise and never opens a share link; ``--auth user:pass`` (repeatable)
turns on login, and votes are then stored under the logged-in user. Needs the ``app`` extra (``pip install -e
'.[app]'``; ``make venv`` installs it).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML of app settings (fields of apps.handlers.AppSettings)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)"
    )
    parser.add_argument(
        "--auth", action="append", default=[], metavar="USER:PASS", help="require login (repeatable)"
    )
    parser.add_argument("--db", default=None, help="vote store (default runs/app/votes.sqlite)")
    parser.add_argument("--base", default=None, help="base pipeline ('toy' = the committed toy pipeline)")
    parser.add_argument(
        "-c",
        "--checkpoint",
        action="append",
        dest="checkpoints",
        metavar="[NAME=]PATH",
        help="'base', a LoRA folder / kohya file / UNet folder / training run (repeatable; runs under --runs-dir "
        "are added)",
    )
    parser.add_argument("--runs-dir", default=None, help="offer the training runs found here (default runs)")
    parser.add_argument(
        "--scorer",
        action="append",
        dest="scorers",
        metavar="NAME[:k=v,...]",
        help="scorers shown under images",
    )
    parser.add_argument(
        "--prompts", action="append", dest="prompt_sets", metavar="SET", help="prompt sets to draw from"
    )
    parser.add_argument("--curate-root", default=None, help="only folders inside this one may be curated")
    parser.add_argument(
        "--checkpoint-root", default=None, help="only checkpoints inside this folder may be added in the app"
    )
    parser.add_argument("--steps", type=int, default=None, help="default sampling steps")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the app's draws (prompts, seeds, order)"
    )


def parse_auth(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, password = value.partition(":")
        if not sep or not name or not password:
            raise ValueError(f"--auth {value!r}: use USER:PASS with both parts non-empty")
        out.append((name, password))
    return out


def main(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the app needs gradio: pip install -e '.[app]' (make venv installs it)", file=sys.stderr)
        return 2
    from apps.app import launch
    from apps.handlers import AppContext, load_settings

    auth = parse_auth(args.auth)
    settings = load_settings(
        args.config,
        db=args.db,
        base=args.base,
        checkpoints=args.checkpoints,
        runs_dir=args.runs_dir,
        scorers=args.scorers,
        prompt_sets=args.prompt_sets,
        curate_root=args.curate_root,
        checkpoint_root=args.checkpoint_root,
        steps=args.steps,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: binding {args.host}: the app is reachable from other machines"
            + ("" if auth else " and has no login (add --auth USER:PASS)"),
            file=sys.stderr,
        )
        what = {"--curate-root": "curate folders", "--checkpoint-root": "add checkpoints"}
        unconfined = [
            f for f, root in zip(what, (settings.curate_root, settings.checkpoint_root)) if root is None
        ]
        if unconfined:
            print(
                f"warning: users can {' and '.join(what[f] for f in unconfined)} from any path on this machine; "
                f"confine them with {' and '.join(unconfined)}",
                file=sys.stderr,
            )
    ctx = AppContext(settings)
    print(f"votes go to {settings.db}; checkpoints: {', '.join(ctx.renderer.names())}")
    launch(ctx, host=args.host, port=args.port, auth=auth, block=True)
    return 0
