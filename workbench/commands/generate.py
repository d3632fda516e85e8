"""``workbench generate``: images from one or more checkpoints with explicit seeds, plus a JSONL manifest.

Every (prompt, seed) starts from the same initial noise for every checkpoint (rule: ``samplers/noise.py``), so the
images of two checkpoints are directly comparable. Also home of the argument helpers shared by ``eval`` and
``synth``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SAMPLER_NAMES = (
    "ddim",
    "euler",
    "dpmpp_2m",
)  # mirrors samplers.SAMPLERS; kept literal so --help stays import-free


# ---------------------------------------------------------------------------------------------- shared arguments
def add_model_arguments(parser: argparse.ArgumentParser, *, checkpoints_default: str = "base") -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--base",
        default="toy",
        help="base pipeline: diffusers folder, hub id or single file; "
        "'toy' = the committed toy pipeline (default)",
    )
    g.add_argument(
        "-c",
        "--checkpoint",
        action="append",
        dest="checkpoints",
        metavar="[NAME=]PATH",
        help=f"'base', a LoRA folder / kohya .safetensors / UNet folder, or a training run directory; "
        "',negative=NPO[,merge=M]' after it renders with an NPO model in the unconditional branch of CFG "
        f"(repeatable; default: {checkpoints_default})",
    )
    g.add_argument(
        "--negative",
        default=None,
        metavar="NPO_CKPT",
        help="Diffusion-NPO checkpoint: add an 'NAME+npo' twin of every checkpoint that uses it as the negative "
        "model of classifier-free guidance (same noise, so plain and NPO CFG are compared item by item)",
    )
    g.add_argument(
        "--negative-merge",
        type=float,
        default=0.0,
        metavar="M",
        help="merge weight m in theta_neg = theta_base + delta_npo + (1 - m)(theta_pos - theta_base) (default 0)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="weights dtype (default: fp32 on CPU, fp16 on CUDA)",
    )


def add_sampling_arguments(
    parser: argparse.ArgumentParser, *, steps: int = 20, guidance: float = 5.0
) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--sampler", default="euler", choices=SAMPLER_NAMES)
    g.add_argument("--steps", type=int, default=steps)
    g.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale")
    g.add_argument("--height", type=int, default=None, help="default: the model's native resolution")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--batch-size", type=int, default=16)


def add_prompt_arguments(parser: argparse.ArgumentParser, *, default_set: str | None = None) -> None:
    g = parser.add_argument_group("prompts")
    g.add_argument(
        "-p",
        "--prompt",
        action="append",
        dest="prompt_list",
        metavar="TEXT",
        help="inline prompt (repeatable; replaces --prompts)",
    )
    g.add_argument(
        "--prompts",
        default=default_set,
        metavar="SET",
        help="prompt set: a .txt/.tsv/.jsonl/.json file, 'parti', 'parti:CATEGORY', 'toy:heldout', "
        f"'toy:train', 'toy:all'{f' (default: {default_set})' if default_set else ''}",
    )
    g.add_argument("--max-prompts", type=int, default=None, help="keep the first N prompts of the set")


def parse_seeds(text: str) -> list[int]:
    """``"0-3,10"`` -> ``[0, 1, 2, 3, 10]`` (ranges inclusive; seeds are non-negative, a range ascends)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(
                f"--seeds: cannot read {part!r}; use non-negative integers, e.g. 0-9 or 0,3,7"
            ) from None
        if first > last:
            raise ValueError(f"--seeds: the range {part!r} is empty (it descends); write {last}-{first}")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise ValueError("--seeds: no seeds given; use e.g. 0-9 or 0,3,7")
    return seeds


def resolve_prompts(args: argparse.Namespace) -> tuple[list[str], str]:
    """(prompts, description) from ``--prompt`` / ``--prompts`` / ``--max-prompts``."""
    from workbench.prompts import load_prompts

    if args.prompt_list:
        prompts, spec = list(args.prompt_list), "inline"
    elif args.prompts:
        prompts, spec = load_prompts(args.prompts), args.prompts
    else:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts SET")
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    return prompts, spec


def resolve_device(args: argparse.Namespace) -> tuple[str, str]:
    return device_and_dtype(args.device, args.dtype)


def device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """``auto`` resolved: cuda when available, else cpu; fp32 on the CPU, fp16 on CUDA."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "fp32" if device == "cpu" else "fp16"
    return device, dtype


def resolve_base(base: str) -> str:
    if base == "toy":
        from workbench.toy.model import toy_pipeline_path

        return str(toy_pipeline_path())
    return base


def sampling_config(args: argparse.Namespace) -> Any:
    from samplers import SamplingConfig

    return SamplingConfig(
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
    )


# ------------------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 0-3,10 (default 0)")
    add_sampling_arguments(parser)
    parser.add_argument(
        "-o", "--out", default="outputs/generate", help="output folder (images + manifest.jsonl)"
    )


def main(args: argparse.Namespace) -> int:
    from samplers import generate_images, load_pipeline_for, noise_seed, parse_checkpoints, save_png
    from samplers.checkpoints import with_negative
    from samplers.generate import read_manifest, write_manifest
    from workbench.models import DTYPES

    prompts, _ = resolve_prompts(args)
    seeds = parse_seeds(args.seeds)
    cfg = sampling_config(args)
    device, dtype = resolve_device(args)
    base = resolve_base(args.base)
    checkpoints = with_negative(
        parse_checkpoints(args.checkpoints or ["base"]), args.negative, args.negative_merge
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} is a file; pass a folder for the images and manifest.jsonl")
    out.mkdir(
        parents=True, exist_ok=True
    )  # before the model loads: a bad folder fails fast, named by workbench.cli
    items = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    manifest = out / "manifest.jsonl"
    # The manifest is rewritten (atomically) only once images exist: a re-run that fails before its first image
    # leaves it as it was; rows of earlier runs stay unless an image replaces them (same file, or same checkpoint,
    # prompt and seed).
    previous = read_manifest(manifest)
    rows: list[dict[str, Any]] = []
    total = len(previous)
    for ckpt in checkpoints:
        folder = out / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in ckpt.name)
        batches = generate_images(
            lambda c=ckpt: load_pipeline_for(base, c, device=device, dtype=DTYPES[dtype]),
            [p for _, p, _ in items],
            [s for _, _, s in items],
            cfg,
            batch_size=args.batch_size,
            desc=f"generate {ckpt.name}",
        )
        for idx, images in batches:
            for j, image in zip(idx, images):
                k, prompt, seed = items[j]
                path = save_png(image, folder / f"p{k:04d}_s{seed}.png")
                rows.append(
                    {
                        "path": str(path.relative_to(out)),
                        "prompt": prompt,
                        "seed": seed,
                        "checkpoint": ckpt.name,
                        "checkpoint_path": ckpt.path,
                        "sampler": cfg.sampler,
                        "steps": cfg.steps,
                        "guidance": cfg.guidance,
                        "noise_seed": noise_seed(prompt, seed),
                    }
                )
            total = write_manifest(manifest, previous, rows)
    n = len(rows)
    print(
        f"wrote {n} images for {len(checkpoints)} checkpoint(s) to {out}; manifest: {manifest} ({total} rows)"
    )
    return 0
