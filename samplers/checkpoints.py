"""Which weights an image came from: checkpoint specs, their fingerprints, and loading base + checkpoint.

A checkpoint spec on the command line is ``base`` (the base pipeline alone), ``PATH`` or ``NAME=PATH`` where PATH is
anything :func:`workbench.models.apply_checkpoint` applies: a diffusers LoRA folder, a kohya LoRA ``.safetensors``,
a full UNet folder, or a training output (``RUN_DIR``, ``RUN_DIR/final``, ``RUN_DIR/checkpoints/step_XXXXXX``, which
hold ``lora/`` or ``unet/``).

Negative-model guidance (Diffusion-NPO): ``NAME=PATH,negative=NPO_PATH[,merge=M]`` (PATH may be ``base``) renders
with the NPO checkpoint as the unconditional branch of classifier-free guidance and ``theta_neg = theta_base +
delta_npo + (1 - M)(theta_pos - theta_base)`` (:mod:`samplers.guidance`); ``--negative NPO [--negative-merge M]`` on
``generate`` / ``eval`` adds such an "NPO CFG" twin of every checkpoint, so plain and NPO CFG are compared on
identical noise.
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
    negative: str | None = None  # an NPO checkpoint for the unconditional branch of CFG
    negative_merge: float = 0.0  # m in theta_neg = theta_base + delta_npo + (1 - m)(theta_pos - theta_base)

    @property
    def is_base(self) -> bool:
        return self.path is None and self.negative is None

    def identity(self) -> dict[str, Any]:
        """What identifies these weights in a dataset's plan: name and path, plus the negative model only when one
        is used (so plans written before negative guidance existed still match)."""
        out: dict[str, Any] = {"name": self.name, "path": self.path}
        if self.negative is not None:
            out |= {"negative": self.negative, "negative_merge": self.negative_merge}
        return out


def _split_options(spec: str) -> tuple[str, dict[str, str]]:
    """``"x=runs/a,negative=runs/npo,merge=0.5"`` -> ``("x=runs/a", {"negative": ..., "merge": "0.5"})``."""
    head, sep, rest = spec.partition(",negative=")
    if not sep:
        return spec, {}
    options = {"negative": rest}
    neg, sep2, merge = rest.partition(",merge=")
    if sep2:
        options = {"negative": neg, "merge": merge}
    return head, options


def _merge_weight(text: str, spec: str) -> float:
    try:
        m = float(text)
    except ValueError:
        raise ValueError(
            f"checkpoint {spec!r}: merge={text!r} is not a number; use merge=M with M in [0, 1]"
        ) from None
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"checkpoint {spec!r}: merge={m} is outside [0, 1]")
    return m


def with_negative(
    checkpoints: list[Checkpoint], negative: str | None, merge: float = 0.0
) -> list[Checkpoint]:
    """``checkpoints`` plus, when ``negative`` is given, an "NPO CFG" twin ``NAME+npo`` of each (same positive
    weights, ``negative`` in the unconditional branch), so each pair is compared on identical noise."""
    if negative is None:
        return checkpoints
    neg = str(resolve_checkpoint_path(negative))
    m = _merge_weight(str(merge), f"--negative-merge {merge}")
    twins = [Checkpoint(f"{c.name}+npo", c.path, neg, m) for c in checkpoints if c.negative is None]
    return [*checkpoints, *twins]


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
    for full_spec in specs:
        spec, options = (full_spec, {}) if Path(full_spec).exists() else _split_options(full_spec)
        negative = str(resolve_checkpoint_path(options["negative"])) if "negative" in options else None
        merge = _merge_weight(options["merge"], full_spec) if "merge" in options else 0.0
        if spec == "base":
            out.append(Checkpoint("base" if negative is None else "base+npo", None, negative, merge))
            continue
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():  # a path that itself contains '='
            name, path = "", spec
        if path == "base":
            out.append(Checkpoint(name or "base+npo", None, negative, merge))
            continue
        resolved = resolve_checkpoint_path(path)
        default = _default_name(resolved) + ("" if negative is None else "+npo")
        out.append(Checkpoint(name or default, str(resolved), negative, merge))
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
    if checkpoint.negative is not None:  # NPO CFG renders differently: its own cache entries
        ckpt += f"~neg:{fingerprint(checkpoint.negative)}:m{checkpoint.negative_merge:g}"
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
    if checkpoint.negative is not None:
        from samplers.guidance import negative_guidance_pipeline

        return negative_guidance_pipeline(
            pipe, negative=checkpoint.negative, positive=checkpoint.path, merge=checkpoint.negative_merge
        )
    if checkpoint.path is not None:
        pipe = apply_checkpoint(pipe, checkpoint.path)
    return pipe
