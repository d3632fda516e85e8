"""``workbench export``: a base model plus a training output as one original-layout ``.safetensors`` file
(A1111, ComfyUI, Forge), e.g. to share a full Diffusion-DPO fine-tune as users download checkpoints."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base model: diffusers folder, hub id or single file")
    parser.add_argument("output", help="output .safetensors path")
    parser.add_argument(
        "--checkpoint", help="run checkpoint / final folder, LoRA folder or file, or UNet folder"
    )
    parser.add_argument("--fuse-lora", action="store_true", help="fuse a LoRA into the weights before export")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--single-file-config", help="configs for a single-file base (folder or hub id)")


def main(args: argparse.Namespace) -> int:
    from workbench.models import DTYPES, ModelLoadError, apply_checkpoint, load_pipeline
    from workbench.single_file import save_single_file

    try:
        pipe = load_pipeline(args.base, single_file_config=args.single_file_config)
        if args.checkpoint:
            apply_checkpoint(pipe, args.checkpoint)
            if getattr(pipe.unet, "peft_config", None):
                if not args.fuse_lora:
                    print("error: the checkpoint is a LoRA; pass --fuse-lora to bake it in", file=sys.stderr)
                    return 2
                pipe.fuse_lora()
                pipe.unload_lora_weights()
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = save_single_file(pipe, args.output, dtype=DTYPES[args.dtype])
    print(f"wrote {path}")
    return 0
