"""Which weights an image came from: checkpoint specs, their fingerprints, and loading base + checkpoint.

A checkpoint spec on the command line is ``base`` (the base pipeline alone), ``PATH`` or ``NAME=PATH`` where PATH is
anything :func:`workbench.models.apply_checkpoint` applies: a diffusers LoRA folder, a kohya LoRA ``.safetensors``,
a full UNet folder, or a training output (``RUN_DIR``, ``RUN_DIR/final``, ``RUN_DIR/checkpoints/step_XXXXXX``, which
hold ``lora/`` or ``unet/``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: str | None = None  # None: the base pipeline itself

    @property
    def is_base(self) -> bool:
        return self.path is None


def resolve_checkpoint_path(path: str | Path) -> Path:
    """The weights inside a training output: ``RUN_DIR -> RUN_DIR/final -> .../lora`` (or ``.../unet``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass a LoRA folder, a kohya .safetensors, "
            "a UNet folder or a training run directory"
        )
    if (
        p.is_dir()
        and not (p / "pytorch_lora_weights.safetensors").exists()
        and not (p / "config.json").exists()
    ):
        for child in ("final", "lora", "unet"):
            if (p / child).is_dir():
                return resolve_checkpoint_path(p / child)
        steps = sorted((p / "checkpoints").glob("step_*"))
        if steps:
            raise FileNotFoundError(
                f"{p} is a training run without final/ (unfinished?); pass one of its checkpoints, e.g. {steps[-1]}"
            )
    return p


def _default_name(path: Path) -> str:
    """``runs/x/final/lora -> x/final``, ``runs/x/checkpoints/step_000300 -> x/step_000300``, ``a/b.safetensors -> b``."""
    parts = [x for x in path.parts if x not in ("lora", "unet", "checkpoints")]
    if not parts:
        return str(path)
    last = Path(parts[-1]).stem
    if (last == "final" or last.startswith("step_")) and len(parts) > 1:
        return f"{parts[-2]}/{last}"
    return last


def parse_checkpoints(specs: list[str]) -> list[Checkpoint]:
    """``["base", "tuned=runs/x/final", "runs/y"]`` -> checkpoints with unique names (``base`` always first)."""
    out: list[Checkpoint] = []
    for spec in specs:
        if spec == "base":
            out.append(Checkpoint("base"))
            continue
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():  # a path that itself contains '='
            name, path = "", spec
        resolved = resolve_checkpoint_path(path)
        out.append(Checkpoint(name or _default_name(resolved), str(resolved)))
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"checkpoint names must be unique, got {dupes} more than once; name them as NAME=PATH"
        )
    out.sort(key=lambda c: not c.is_base)
    return out


def fingerprint(source: str | Path) -> str:
    """A cheap identity of weights on disk: relative path, size and mtime of every file (or the string itself for a
    hub id). Changing, retraining or replacing the weights changes it; copying a folder elsewhere keeps it only if the
    mtimes are kept."""
    p = Path(source)
    if not p.exists():
        return f"id:{source}"
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    root = p if p.is_dir() else p.parent
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(json.dumps([str(f.relative_to(root)), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


def model_id(base: str, checkpoint: Checkpoint, *, dtype: str, device: str) -> str:
    """The identity used in generation-cache keys: base weights, applied checkpoint, dtype and device type."""
    ckpt = "base" if checkpoint.path is None else fingerprint(checkpoint.path)
    return f"{fingerprint(base)}+{ckpt}@{dtype}/{device.split(':')[0]}"


def load_pipeline_for(
    base: str,
    checkpoint: Checkpoint,
    *,
    device: str = "cpu",
    dtype: Any = None,
    family: str | None = None,
    vae: str | None = None,
) -> Any:
    """Load the base pipeline and apply ``checkpoint`` (trainer-owned loaders in :mod:`workbench.models`)."""
    import torch

    from workbench.models import apply_checkpoint, load_pipeline

    pipe = load_pipeline(base, family=family, torch_dtype=dtype or torch.float32, device=device, vae=vae)
    if checkpoint.path is not None:
        pipe = apply_checkpoint(pipe, checkpoint.path)
    return pipe
