"""``workbench eval``: checkpoints x prompt set x seeds -> images -> scorers -> means with 95% intervals and, against
the base, the mean difference, the per-prompt and per-item win rates and a sign test over prompts, all clustered by
prompt (``workbench.stats``: the seeds of a prompt are correlated, so prompts are resampled with all their seeds);
per-item figures (seeds treated as independent) follow as a secondary table. Also a grid PNG, an HTML report and a
JSON file.

Under ``accelerate launch -m workbench eval ...`` each process generates and scores every n-th batch of items and
the main process writes the report: the same images, scores and report as one process (:func:`run_eval`).

The base is always evaluated first; its images are cached (key: weights, sampling settings, prompt, seed), so
evaluating the same base again reuses them bit for bit and only the new checkpoints are generated.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from workbench.commands.generate import add_model_arguments, add_prompt_arguments, add_sampling_arguments

MIN_ITEMS = 200  # below ~200 paired items, gains of a few hundredths are not detectable (toyworld.md)
MIN_PROMPTS = (
    10  # intervals are clustered by prompt: with fewer prompts they are wide whatever the seed count
)
FIRST_EVAL_SEED = 1000  # default eval seeds start here; synth's start at 0, so eval seeds stay held out
TOY_SCORERS: tuple[str, ...] = ("toy/centering", "toy/fidelity")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, checkpoints_default="base only")
    add_prompt_arguments(parser)
    parser.add_argument(
        "--seeds",
        default=None,
        help=f"seeds, e.g. 1000-1009; default: enough seeds from {FIRST_EVAL_SEED} for "
        f">= --min-items (prompt, seed) items",
    )
    parser.add_argument(
        "--min-items", type=int, default=MIN_ITEMS, help="target item count for default seeds"
    )
    parser.add_argument(
        "-s",
        "--scorer",
        action="append",
        dest="scorers",
        metavar="NAME",
        help=f"registered scorer (repeatable; `workbench ls`); default with the toy base: "
        f"{', '.join(TOY_SCORERS)}",
    )
    add_sampling_arguments(parser, steps=20, guidance=5.0)
    parser.add_argument("-o", "--out", default="outputs/eval", help="report folder")
    parser.add_argument(
        "--cache-dir", default=None, help="generation cache (default $WORKBENCH_CACHE/generations)"
    )
    parser.add_argument("--no-cache", action="store_true", help="always regenerate every image")
    parser.add_argument("--grid-items", type=int, default=16, help="columns of the grid PNG")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=5000,  # workbench.stats.N_BOOTSTRAP (not imported here: numpy would slow --help)
        help="bootstrap replicates (each resamples the prompts, with all their seeds)",
    )


def default_seeds(n_prompts: int, min_items: int = MIN_ITEMS, first: int = FIRST_EVAL_SEED) -> list[int]:
    """The fewest consecutive seeds from ``first`` that give at least ``min_items`` (prompt, seed) items."""
    return list(range(first, first + max(1, math.ceil(min_items / max(n_prompts, 1)))))


def main(args: argparse.Namespace) -> int:
    from samplers import default_cache_dir, parse_checkpoints
    from samplers.checkpoints import with_negative
    from workbench.commands.generate import (
        parse_seeds,
        resolve_base,
        resolve_device,
        resolve_prompts,
        sampling_config,
    )
    from workbench.evaluation import EvalPlan, format_table, run_eval
    from workbench.paths import writable_folder

    writable_folder(args.out, "-o")  # before any model or scorer loads
    is_toy = args.base == "toy"
    if not args.prompt_list and not args.prompts:
        args.prompts = "toy:heldout" if is_toy else "parti"
    prompts, spec = resolve_prompts(args)
    seeds = parse_seeds(args.seeds) if args.seeds else default_seeds(len(prompts), args.min_items)
    scorers = args.scorers or (list(TOY_SCORERS) if is_toy else None)
    if not scorers:
        raise ValueError("--scorer: name at least one scorer (see `workbench ls`)")
    from workbench.distributed import process_state

    state = process_state()
    device, dtype = resolve_device(args)
    if state.num_processes > 1:
        device = str(state.device)
    specs = ["base", *[c for c in (args.checkpoints or []) if c != "base"]]
    plan = EvalPlan(
        base=resolve_base(args.base),
        checkpoints=with_negative(parse_checkpoints(specs), args.negative, args.negative_merge),
        prompts=prompts,
        seeds=seeds,
        sampling=sampling_config(args),
        scorers=scorers,
        out_dir=Path(args.out),
        prompt_set=spec,
        batch_size=args.batch_size,
        cache_dir=None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
        device=device,
        dtype=dtype,
        grid_items=args.grid_items,
        n_boot=args.bootstrap,
    )
    n = len(plan.items)
    main_process = state.is_main_process
    if n < MIN_ITEMS and main_process:
        print(f"note: {n} (prompt, seed) items; below ~{MIN_ITEMS} only large differences are detectable")
    if len(prompts) < MIN_PROMPTS and main_process:
        print(
            f"note: {len(prompts)} prompts; intervals resample prompts (the seeds of a prompt are correlated), so "
            f"below ~{MIN_PROMPTS} prompts they are wide however many seeds: add prompts rather than seeds"
        )
    result = run_eval(plan, process_index=state.process_index, num_processes=state.num_processes)
    if not main_process:
        return 0
    print(format_table(result.summary))
    print(f"\nreport: {result.html_path}\ngrid:   {result.grid_path}\njson:   {result.json_path}")
    return 0
