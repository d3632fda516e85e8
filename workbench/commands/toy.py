"""``workbench toy``: the toy world's own tools.

* ``workbench toy pretrain [--out DIR] [--total-minutes M | --vae-steps N --unet-steps N ...]``
  pretrains the toy pipeline on CPU (VAE, then UNet + text encoders); see ``workbench/toy/pretrain.py``.
* ``workbench toy render [--out DIR] [--n N] [--split train|heldout|all] [--pairs N]`` writes world images with their
  prompts and scene parameters (``scenes.jsonl``) and a grid, and optionally centring preference pairs.
* ``workbench toy adherence [--pipeline DIR] [--split S] [--seeds K]`` measures prompt adherence of a pipeline (the
  committed one by default) on fixed (prompt, seed) items with the ground-truth rewards; prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)

    # Defaults live in one place, PretrainConfig (workbench/toy/pretrain.py); None here means "use it".
    p = sub.add_parser("pretrain", help="pretrain the toy pipeline on CPU (VAE, then UNet + text encoders)")
    p.add_argument(
        "--out", default=None, help="run directory; the pipeline goes to OUT/pipeline (runs/toy_pretrain)"
    )
    p.add_argument("--seed", type=int, default=None, help="(0)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE step cap (800)")
    p.add_argument(
        "--decoder-steps", type=int, default=None, help="fine-tune the VAE decoder alone first (0)"
    )
    p.add_argument("--unet-steps", type=int, default=None, help="UNet step cap (3000)")
    p.add_argument("--vae-minutes", type=float, default=None, help="VAE time budget in minutes, 0 = none (8)")
    p.add_argument(
        "--vae-target-psnr", type=float, default=None, help="stop the VAE at this train PSNR, dB (30)"
    )
    p.add_argument(
        "--unet-minutes", type=float, default=None, help="UNet time budget in minutes, 0 = none (0)"
    )
    p.add_argument(
        "--total-minutes",
        type=float,
        default=None,
        help="UNet stops when the run reaches this, 0 = none (34)",
    )
    p.add_argument(
        "--pool-size", type=int, default=None, help="world images VAE-encoded for UNet training (16384)"
    )
    p.add_argument(
        "--checkpoint-minutes", type=float, default=None, help="EMA snapshot interval, minutes (5)"
    )
    p.add_argument(
        "--init", default=None, help="continue UNet training from this pipeline folder (skips the VAE)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (2)")

    r = sub.add_parser("render", help="write world images, prompts and scene parameters")
    r.add_argument("--out", default="runs/toy_render", help="output directory")
    r.add_argument("--n", type=int, default=64, help="number of images")
    r.add_argument("--seed", type=int, default=0, help="first seed (image i uses seed + i)")
    r.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    r.add_argument("--resolution", type=int, default=32)
    r.add_argument("--pairs", type=int, default=0, help="also write this many centring preference pairs")

    a = sub.add_parser(
        "adherence", help="measure a toy pipeline's prompt adherence with the ground-truth rewards"
    )
    a.add_argument("--pipeline", default=None, help="pipeline folder (default: the committed toy pipeline)")
    a.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    a.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    a.add_argument("--steps", type=int, default=10, help="sampler steps (the pipeline's Euler scheduler)")
    a.add_argument("--guidance", type=float, default=5.0)
    a.add_argument("--grid", default=None, help="also write the samples as a grid PNG here")
    a.add_argument(
        "--json", default=None, help="also store the result under its split in this JSON file (merged)"
    )


def _pretrain(args: argparse.Namespace) -> int:
    from workbench.toy.pretrain import PretrainConfig, pretrain

    keys = ("out", "seed", "vae_steps", "unet_steps", "vae_minutes", "unet_minutes", "pool_size")
    keys += ("decoder_steps", "vae_target_psnr", "total_minutes", "checkpoint_minutes", "init", "threads")
    cfg = PretrainConfig(**{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    summary = pretrain(cfg)
    print(f"pipeline: {Path(cfg.out) / 'pipeline'}  ({summary['total_wall_s']:.0f} s)")
    return 0


def _render(args: argparse.Namespace) -> int:
    from workbench.toy.world import grid, render_batch, render_centering_pairs, to_pil

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.n))
    images, _, scenes = render_batch(seeds, split=args.split, resolution=args.resolution)
    with (out / "scenes.jsonl").open("w") as f:
        for i, (seed, scene) in enumerate(zip(seeds, scenes)):
            name = f"{i:05d}.png"
            to_pil(images[i]).save(out / name)
            f.write(
                json.dumps({"file": name, "seed": seed, "prompt": scene.prompt, **scene.to_dict()}) + "\n"
            )
    grid(images).save(out / "grid.png")
    print(f"{len(seeds)} images, prompts and scenes in {out} (grid: {out / 'grid.png'})")
    if args.pairs:
        w, lo, ps, pair_scenes = render_centering_pairs(
            args.pairs, seed=args.seed, resolution=args.resolution
        )
        pdir = out / "pairs"
        pdir.mkdir(exist_ok=True)
        with (pdir / "pairs.jsonl").open("w") as f:
            for i, (p, (sw, sl)) in enumerate(zip(ps, pair_scenes)):
                to_pil(w[i]).save(pdir / f"{i:05d}_w.png")
                to_pil(lo[i]).save(pdir / f"{i:05d}_l.png")
                rec = {"prompt": p, "winner": f"{i:05d}_w.png", "loser": f"{i:05d}_l.png"}
                f.write(json.dumps({**rec, "winner_scene": sw.to_dict(), "loser_scene": sl.to_dict()}) + "\n")
        print(f"{args.pairs} centring pairs (winner centred, loser off-centre) in {pdir}")
    return 0


def _adherence(args: argparse.Namespace) -> int:
    import torch

    from workbench.toy.model import adherence_items, generate, load_toy_pipeline
    from workbench.toy.world import grid

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    pipe = load_toy_pipeline(args.pipeline)
    prompts, seeds = adherence_items(args.split, args.seeds)
    images = generate(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance)
    from rewards.toy import adherence

    result = {
        "pipeline": str(args.pipeline or "committed"),
        "split": args.split,
        "seeds_per_prompt": args.seeds,
        "steps": args.steps,
        "guidance": args.guidance,
        "n": len(prompts),
        **adherence(images, prompts),
    }
    if args.grid:
        grid(images.numpy(), ncol=len(set(prompts)) if len(set(prompts)) <= 24 else 24).save(args.grid)
    print(json.dumps(result, indent=2))
    if args.json:
        path = Path(args.json)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        stored[args.split] = result
        path.write_text(json.dumps(stored, indent=2) + "\n")
    return 0


def main(args: argparse.Namespace) -> int:
    actions = {"pretrain": _pretrain, "render": _render, "adherence": _adherence}
    return actions[args.toy_command](args)
