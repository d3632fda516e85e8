"""``workbench relabel``: score the pairs of an existing dataset (Pick-a-Pic parquet, a file or a folder of shards, or
pair JSONL) with a registered scorer and add the scores and SmPO soft labels to its files in place
(:mod:`samplers.relabel`): ``score_0``, ``score_1``, ``soft_label_0``, ``soft_label_1``, ``scorer``.

Batched and resumable: scores are appended to a side folder per batch; rerunning the same command continues where
it stopped. Train on the result with ``data.sources[].labels: scorer`` (SmPO needs it; any pairwise objective may
use it, e.g. Diffusion-DPO with AI feedback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="Pick-a-Pic parquet file or folder of shards, or a pair JSONL file")
    parser.add_argument(
        "--format",
        choices=("auto", "pickapic_parquet", "pair_jsonl"),
        default="auto",
        help="auto: .jsonl files are pair_jsonl, anything else pickapic_parquet",
    )
    parser.add_argument(
        "-s",
        "--scorer",
        required=True,
        metavar="NAME",
        help="registered scorer, optionally NAME:key=value,... (see `workbench ls scorers`)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="pairs scored per batch (the unit of resume)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument(
        "--score-range",
        default=None,
        metavar="MIN,MAX",
        help="normalisation constants (default: min and max of the scores of this dataset). SmPO's PickScore "
        "constants in this workbench's units (100 x cosine): 11.543526500463486,28.201571106910706",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard scores of an earlier run in the side folder"
    )
    parser.add_argument(
        "--max-failed",
        type=float,
        default=0.01,
        help="fraction of rows allowed to fail before nothing is written",
    )
    parser.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="pair JSONL: read image paths outside the file's folder (trust this file; the trainer needs "
        "data.sources[].allow_outside_paths=true for it too)",
    )


def main(args: argparse.Namespace) -> int:
    from rewards import build_scorer, parse_scorer_spec
    from rewards.base import resolve_device
    from samplers.relabel import relabel

    path = Path(args.path)
    fmt = args.format
    if fmt == "auto":
        fmt = "pair_jsonl" if path.suffix == ".jsonl" else "pickapic_parquet"
    rng = None
    if args.score_range:
        try:
            lo, hi = (float(v) for v in args.score_range.split(","))
        except ValueError:
            raise ValueError(f"--score-range {args.score_range!r}: give MIN,MAX, two numbers") from None
        rng = (lo, hi)
    name, options = parse_scorer_spec(args.scorer)
    device = str(resolve_device(args.device))
    scorer = build_scorer(name, **options)
    if hasattr(scorer, "to"):
        scorer.to(device)
    result = relabel(
        path,
        fmt,
        scorer,
        args.scorer,
        batch_size=args.batch_size,
        device=device,
        rng=rng,
        fresh=args.fresh,
        max_failed=args.max_failed,
        allow_outside_paths=args.allow_outside_paths,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(
        f"{result.rows} pairs in {len(result.files)} file(s): {result.scored_now} scored now, "
        f"{result.rows - result.scored_now} resumed, {len(result.failed)} failed; score range "
        f"[{result.score_min:.6g}, {result.score_max:.6g}]; {result.seconds:.1f} s"
    )
    for rid, why in result.failed[:10]:
        print(f"  failed {rid}: {why}", file=sys.stderr)
    print(f"train on it with data.sources: [{{format: {fmt}, path: {path}, labels: scorer}}]")
    return 0
