"""Seeded, batched text-to-image sampling with any diffusers SD / SDXL pipeline.

Only the initial noise and the scheduler are ours (see :mod:`samplers.noise` for the noise rule); the denoising loop
is the pipeline's own ``__call__``, so guidance, text encoding and SDXL micro-conditioning are exactly diffusers'.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samplers.noise import NOISE_RULE, generators, initial_noise
from samplers.schedulers import SAMPLERS, make_scheduler


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn. ``height``/``width`` default to the pipeline's native resolution."""

    sampler: str = "euler"
    steps: int = 20
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            SAMPLERS.get(self.sampler)  # raises with the list of known samplers
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "noise_rule": NOISE_RULE}


def resolution(pipe: Any, cfg: SamplingConfig) -> tuple[int, int]:
    """(height, width) in pixels that ``pipe`` will produce under ``cfg``."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (cfg.height or native, cfg.width or native)


def latent_shape(pipe: Any, cfg: SamplingConfig) -> tuple[int, int, int]:
    height, width = resolution(pipe, cfg)
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} for this VAE, got {height}x{width}")
    return (pipe.unet.config.in_channels, height // f, width // f)


def with_sampler(pipe: Any, name: str, *, unet: Any = None) -> Any:
    """A pipeline sharing ``pipe``'s modules but using sampler ``name`` (and ``unet`` instead of its UNet when
    given: a training policy, a frozen reference); ``pipe`` itself is left unchanged."""
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in pipe.components.items() if k in params}
    # registered config flags (force_zeros_for_empty_prompt, requires_safety_checker, ...)
    kwargs.update({k: pipe.config[k] for k in params if k not in kwargs and k in pipe.config})
    kwargs["scheduler"] = make_scheduler(name, pipe.scheduler.config)
    if unet is not None:
        kwargs["unet"] = unet
    new = type(pipe)(**kwargs)
    new.set_progress_bar_config(disable=True)
    return new


def _module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def cast_floats(x: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``x`` (nested in dicts, lists, tuples) cast to ``dtype``; everything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: cast_floats(v, dtype) for k, v in x.items()}  # SDXL added_cond_kwargs
    if isinstance(x, (list, tuple)):
        return type(x)(cast_floats(v, dtype) for v in x)
    return x


@contextmanager
def matched_dtypes(pipe: Any) -> Iterator[None]:
    """Run the pipeline with components of different dtypes (an fp32 policy beside bf16 text encoders, a bf16
    reference UNet, an fp16 VAE): while active, the UNet casts its floating inputs to its own dtype and its output
    back to the latents' dtype, and the VAE decoder casts its input to its own dtype. Training keeps each component
    in its configured dtype; the diffusers pipelines otherwise assume they all match ("mat1 and mat2 must have the
    same dtype")."""
    handles: list[Any] = []

    def cast_inputs(dtype: torch.dtype) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            return cast_floats(args, dtype), cast_floats(kwargs, dtype)

        return hook

    unet = pipe.unet
    unet_dtype = _module_dtype(unet)
    if unet_dtype is not None:
        caller: dict[str, torch.dtype] = {}

        def remember(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sample_in = args[0] if args else kwargs.get("sample")
            if isinstance(sample_in, torch.Tensor):
                caller["dtype"] = sample_in.dtype

        def restore(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
            dtype = caller.get("dtype")
            if dtype is None:
                return output
            if isinstance(output, tuple):
                return (output[0].to(dtype), *output[1:])
            if hasattr(output, "sample"):
                output.sample = output.sample.to(dtype)
            return output

        handles.append(unet.register_forward_pre_hook(remember, with_kwargs=True))
        handles.append(unet.register_forward_pre_hook(cast_inputs(unet_dtype), with_kwargs=True))
        handles.append(unet.register_forward_hook(restore, with_kwargs=True))
    vae = pipe.vae
    for name in ("post_quant_conv", "decoder"):
        part = getattr(vae, name, None)
        dtype = None if part is None else _module_dtype(part)
        if part is not None and dtype is not None:
            handles.append(part.register_forward_pre_hook(cast_inputs(dtype), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sample(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], cfg: SamplingConfig) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` float32 in [0, 1] on the CPU, one per (prompt, seed), as one batch.

    ``pipe`` should already carry the sampler (see :func:`with_sampler`); the noise of item ``i`` comes from its own
    generator, so the result for an item does not depend on what else is in the batch (up to float round-off of
    batched kernels).
    """
    gens = generators(prompts, seeds)
    noise = initial_noise(latent_shape(pipe, cfg), gens)
    height, width = resolution(pipe, cfg)
    kwargs: dict[str, Any] = {}
    if cfg.negative_prompt is not None:
        kwargs["negative_prompt"] = [cfg.negative_prompt] * len(prompts)
    with matched_dtypes(pipe):
        out = pipe(
            prompt=list(prompts),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            height=height,
            width=width,
            latents=noise.to(pipe.unet.device, pipe.unet.dtype),
            generator=gens,
            output_type="pt",
            **kwargs,
        )
    return out.images.float().clamp(0, 1).cpu()


def batched(n: int, batch_size: int) -> Iterator[range]:
    """Index ranges ``[0, b), [b, 2b), ...`` covering ``n`` items."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


# ---- images on disk -------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] -> ``[B, H, W, 3]`` uint8 (round to nearest)."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """``H x W x 3`` uint8 arrays -> ``[B, 3, H, W]`` float32 in [0, 1]."""
    stacked = np.stack([np.asarray(a, dtype=np.uint8) for a in arrays])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write atomically (temp file + rename), so an interrupted run never leaves a truncated image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png_bytes(array))
    tmp.replace(path)
    return path


def manifest_keys(row: dict[str, Any]) -> tuple[tuple[str, Any], tuple[str, Any, Any, Any]]:
    """What makes a manifest row unique: the image file it describes, and its (checkpoint, prompt, seed)."""
    return ("path", row.get("path")), ("item", row.get("checkpoint"), row.get("prompt"), row.get("seed"))


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL manifest (none when the file does not exist). A line that does not parse (a manifest cut
    short by a kill before writes were atomic) is skipped with a warning naming ``file:line``."""
    import json
    import sys

    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            print(f"[manifest] {path}:{number}: not a JSON object; the line is dropped", file=sys.stderr)
            continue
        rows.append(row)  # pyright: ignore[reportUnknownArgumentType]  # a JSON object
    return rows


def write_manifest(
    path: str | Path, previous: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
) -> int:
    """Write ``previous`` rows that no row of ``rows`` replaces (same image file, or same checkpoint, prompt and
    seed), then ``rows`` (a later row replaces an earlier one of the same key), through a temporary file and a rename:
    a failed or interrupted run leaves the manifest as it was or with every finished image. Returns the row count."""
    import json

    path = Path(path)
    latest: dict[Any, int] = {}
    for i, row in enumerate(rows):
        for key in manifest_keys(row):
            latest[key] = i
    kept = [r for r in previous if not any(k in latest for k in manifest_keys(r))]
    kept += [r for i, r in enumerate(rows) if all(latest[k] == i for k in manifest_keys(r))]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
    return len(kept)


def load_image(path: str | Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
