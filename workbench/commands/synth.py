"""``workbench synth``: K samples per prompt from one or more checkpoints, scored by a scorer or an ensemble, written
as Pick-a-Pic-layout parquet shards (pairs) and ranking JSONL (see :mod:`samplers.synth` for the layout).

Sharded and resumable: rerunning the same command skips finished shards. Under ``accelerate launch -m workbench
synth ...`` each process takes every n-th shard.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.commands.generate import add_model_arguments, add_prompt_arguments, add_sampling_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, checkpoints_default="base")
    add_prompt_arguments(parser)
    parser.add_argument("-k", "--samples", type=int, default=4, help="samples per prompt (K >= 2)")
    parser.add_argument(
        "-s",
        "--scorer",
        action="append",
        dest="scorers",
        metavar="NAME",
        help="registered scorer; repeat for an ensemble (see --ensemble)",
    )
    parser.add_argument(
        "--ensemble",
        default="winrate",
        choices=("winrate", "rank", "zscore"),
        help="how several scorers combine (rewards.ensemble; winrate = Syn-Pic)",
    )
    parser.add_argument(
        "--rank-by",
        default="score",
        choices=("score", "phi"),
        help="order samples by the scorer's / ensemble's value, or by the Syn-Pic phi (RankDPO's data): the win "
        "rate over (scorer, other sample) comparisons, written as the ranking's scores",
    )
    parser.add_argument("--pairs", default="best-worst", choices=("best-worst", "all"))
    parser.add_argument("--min-gap", type=float, default=0.0, help="keep pairs whose score gap exceeds this")
    parser.add_argument("--first-seed", type=int, default=0, help="sample k uses seed first_seed + k")
    parser.add_argument("--shard-size", type=int, default=32, help="prompts per shard (the unit of resume)")
    add_sampling_arguments(parser, steps=20, guidance=5.0)
    parser.add_argument("-o", "--out", required=True, help="dataset folder (created; resumed if it exists)")


def main(args: argparse.Namespace) -> int:
    from rewards import build_ensemble, build_scorer, parse_scorer_spec
    from samplers import load_pipeline_for, parse_checkpoints
    from samplers.synth import SynthPlan, run_synth
    from workbench.commands.generate import resolve_base, resolve_device, resolve_prompts, sampling_config
    from workbench.distributed import process_state
    from workbench.models import DTYPES
    from workbench.paths import writable_folder

    writable_folder(args.out, "-o")  # before any model or scorer loads
    if not args.prompt_list and not args.prompts:
        args.prompts = "toy:train" if args.base == "toy" else None
    if args.negative is not None:
        raise ValueError(
            "--negative adds NPO-CFG twins of each checkpoint, which would split synth's K samples between plain "
            "and NPO CFG; give the negative per checkpoint instead: -c NAME=PATH,negative=NPO_CKPT[,merge=M]"
        )
    prompts, spec = resolve_prompts(args)
    if not args.scorers:
        raise ValueError("--scorer: name a scorer (repeat for an ensemble); see `workbench ls`")
    state = process_state()
    device, dtype = resolve_device(args)
    if state.num_processes > 1:
        device = str(state.device)
    specs = [parse_scorer_spec(spec) for spec in args.scorers]  # "NAME" or "NAME:key=value,..."
    if len(specs) == 1:
        scorer, scorer_name = build_scorer(specs[0][0], **specs[0][1]), specs[0][0]
    else:
        scorer = build_ensemble([{"name": n, **o} for n, o in specs], method=args.ensemble)
        scorer_name = f"ensemble[{args.ensemble}]({','.join(n for n, _ in specs)})"
    if hasattr(scorer, "to"):
        scorer.to(device)
    base = resolve_base(args.base)
    plan = SynthPlan(
        base=base,
        checkpoints=parse_checkpoints(args.checkpoints or ["base"]),
        prompts=prompts,
        k=args.samples,
        sampling=sampling_config(args),
        scorer=scorer_name,
        out_dir=Path(args.out),
        pairs=args.pairs,
        min_gap=args.min_gap,
        first_seed=args.first_seed,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        prompt_set=spec,
        rank_by=args.rank_by,
    )
    result = run_synth(
        plan,
        scorer,
        lambda c: load_pipeline_for(base, c, device=device, dtype=DTYPES[dtype]),
        process_index=state.process_index,
        num_processes=state.num_processes,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        from samplers.synth import merge_rankings

        merged = merge_rankings(plan.out_dir, len(prompts), plan.shard_size)
        if merged and state.num_processes > 1:  # single-process runs labelled them in run_synth
            from samplers.relabel import finalise_synth_pairs

            finalise_synth_pairs(plan.out_dir / "pairs", plan.scorer)
        print(
            f"process {state.process_index}: {result.shards_done} shard(s) written, {result.shards_skipped} "
            f"already done, {result.pairs} pairs in {result.seconds:.0f} s"
        )
        print(f"pairs (Pick-a-Pic parquet): {plan.out_dir / 'pairs'}\nrankings: {merged or '(incomplete)'}")
    return 0
