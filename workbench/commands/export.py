"""``workbench export``: a base model plus a training output as one original-layout ``.safetensors`` file
(A1111, ComfyUI, Forge), e.g. to share a full Diffusion-DPO fine-tune as users download checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base model: diffusers folder, hub id or single file")
    parser.add_argument("output", help="output .safetensors path")
    parser.add_argument(
        "--checkpoint",
        help="training run folder (its final/), run checkpoint / final folder, LoRA folder or file, or UNet folder",
    )
    parser.add_argument("--fuse-lora", action="store_true", help="fuse a LoRA into the weights before export")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--single-file-config", help="configs for a single-file base (folder or hub id)")


def main(args: argparse.Namespace) -> int:
    from samplers.checkpoints import resolve_checkpoint_path
    from workbench.models import DTYPES, apply_checkpoint, load_pipeline
    from workbench.single_file import save_single_file

    # Checked before the base loads: a run folder (RUN -> RUN/final -> lora/ | unet/) as `generate -c` takes it, and
    # an output path whose folder can be written. Errors are ValueErrors / OSErrors that workbench.cli prints.
    checkpoint = resolve_checkpoint_path(args.checkpoint) if args.checkpoint else None
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(
            f"output {output} is a folder; pass a file path such as {output / 'model.safetensors'}"
        )
    if output.parent.exists() and not output.parent.is_dir():
        raise ValueError(f"output {output}: {output.parent} is a file, not a folder")
    pipe = load_pipeline(args.base, single_file_config=args.single_file_config)
    if checkpoint is not None:
        apply_checkpoint(pipe, checkpoint)
        if getattr(pipe.unet, "peft_config", None):
            if not args.fuse_lora:
                raise ValueError(f"--checkpoint {checkpoint} is a LoRA; pass --fuse-lora to bake it in")
            pipe.fuse_lora()
            pipe.unload_lora_weights()
    path = save_single_file(pipe, output, dtype=DTYPES[args.dtype])
    print(f"wrote {path}")
    return 0
