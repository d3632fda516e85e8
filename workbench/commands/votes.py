"""``workbench votes export|stats``: the app's vote store on the command line.

``export`` writes the active votes (undone ones left out) as ``pickapic.parquet``, ``pairs.jsonl`` and
``rankings.jsonl`` (K-wise votes expanded as :mod:`apps.store` documents), ready for ``workbench train``::

    workbench votes export --db runs/app/votes.sqlite -o runs/app/export
    workbench train configs/toy/dpo.yaml 'data.sources=[{format: pickapic_parquet, path: runs/app/export/pickapic.parquet}]'
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = sub.add_parser("export", help="votes -> Pick-a-Pic parquet, pair JSONL, ranking JSONL")
    ex.add_argument(
        "--db", default="runs/app/votes.sqlite", help="vote store (default runs/app/votes.sqlite)"
    )
    ex.add_argument("-o", "--out", required=True, help="output folder")
    ex.add_argument(
        "--format",
        action="append",
        dest="formats",
        choices=("pickapic", "pairs", "rankings"),
        help="write only these (repeatable; default all three)",
    )
    ex.add_argument("--user", default=None, help="only this user's votes")
    st = sub.add_parser("stats", help="counts, latency, position bias, checkpoint win rates")
    st.add_argument(
        "--db", default="runs/app/votes.sqlite", help="vote store (default runs/app/votes.sqlite)"
    )
    st.add_argument("--user", default=None, help="only this user's votes")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from apps.store import EXPORT_FORMATS, VoteStore, export_votes, format_stats, vote_stats

    if not Path(args.db).is_file():
        raise ValueError(
            f"--db {args.db}: no vote store there; run `workbench app --db {args.db}` and vote first"
        )
    store = VoteStore(args.db)
    if args.action == "export":
        result = export_votes(store, args.out, formats=args.formats or EXPORT_FORMATS, user_id=args.user)
        print(result.summary())
        return 0
    stats = vote_stats(store, user_id=args.user)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
