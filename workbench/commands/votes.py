"""``workbench votes export|stats|leaderboard|users``: the app's vote store on the command line.

``export`` writes the active votes (undone ones left out) as ``pickapic.parquet``, ``pairs.jsonl`` and
``rankings.jsonl`` (K-wise votes expanded as :mod:`apps.store` documents), ready for ``workbench train``::

    workbench votes export --db runs/app/votes.sqlite -o runs/app/export
    workbench train configs/toy/dpo.yaml 'data.sources=[{format: pickapic_parquet, path: runs/app/export/pickapic.parquet}]'

``leaderboard`` rates the checkpoints from the votes across checkpoints (:mod:`apps.leaderboard`); ``users`` lists
the voters with their counts and what their ``<store dir>/users/<user>/`` folder holds::

    workbench votes leaderboard --db runs/app/votes.sqlite [--user alice] [--sort openskill] [--ties drop]
    workbench votes users --db runs/app/votes.sqlite
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
    lb = sub.add_parser(
        "leaderboard", help="checkpoint ratings: Plackett-Luce / Bradley-Terry with 95%% intervals, OpenSkill"
    )
    lb.add_argument(
        "--db", default="runs/app/votes.sqlite", help="vote store (default runs/app/votes.sqlite)"
    )
    lb.add_argument("--user", default=None, help="only this user's votes (default: everyone)")
    lb.add_argument(
        "--sort", choices=("rating", "openskill"), default="rating", help="order (default rating)"
    )
    lb.add_argument(
        "--ties",
        choices=("half", "drop"),
        default="half",
        help="ties: half a win each way (default) or left out",
    )
    lb.add_argument(
        "--boot", type=int, default=200, help="bootstrap resamples for the intervals (default 200)"
    )
    lb.add_argument(
        "--resample", choices=("vote", "prompt"), default="vote", help="bootstrap unit (default vote)"
    )
    lb.add_argument("--alpha", type=float, default=0.01, help="choix regularisation (default 0.01)")
    lb.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    lb.add_argument("--json", action="store_true", help="print JSON instead of a table")
    us = sub.add_parser("users", help="users: votes per kind, last activity, their folders (admin view)")
    us.add_argument(
        "--db", default="runs/app/votes.sqlite", help="vote store (default runs/app/votes.sqlite)"
    )


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
    if args.action == "leaderboard":
        from apps.leaderboard import COLUMNS, store_leaderboard

        board = store_leaderboard(
            store,
            user=args.user,
            sort=args.sort,
            ties=args.ties,
            n_boot=args.boot,
            resample=args.resample,
            alpha=args.alpha,
            seed=args.seed,
        )
        if args.json:
            rows = [dict(zip(COLUMNS, r)) for r in board.rows()]
            print(json.dumps({"summary": board.summary(), "standings": rows}, indent=2))
        else:
            print(board.format())
        return 0
    if args.action == "users":
        from apps.leaderboard import format_users, user_overview

        print(format_users(user_overview(store)))
        return 0
    stats = vote_stats(store, user_id=args.user)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
