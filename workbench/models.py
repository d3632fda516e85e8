"""Model loading: SDXL and SD1.5/2.x pipelines from a diffusers folder, a hub id or a single-file checkpoint;
LoRA adapters through peft; training outputs (LoRA in diffusers and kohya formats, full UNets) saved and applied.

Everything is written for real checkpoints and exercised in tests on tiny models built by :mod:`workbench.tiny`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the source and the fix."""


def _pipeline_class(family: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline
    if family == "sd15":
        return StableDiffusionPipeline
    raise ModelLoadError(f"unsupported model family {family!r}: use 'sdxl' or 'sd15' (SD1.5 and SD2.x)")


def detect_family(source: str) -> str:
    """Family of a diffusers folder (model_index.json) or a single-file checkpoint (its keys)."""
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"{path} is a folder but has no model_index.json: not a diffusers pipeline folder"
            )
        try:
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a diffusers model_index.json ({exc})") from exc
        if "XL" in cls:
            return "sdxl"
        if cls.startswith("StableDiffusion"):
            return "sd15"
        raise ModelLoadError(f"{index}: pipeline class {cls!r} is not supported (SDXL, SD1.5, SD2.x are)")
    if path.is_file():
        if path.suffix == ".safetensors":
            keys = _safetensors_keys(path)
        else:
            raise ModelLoadError(
                f"{path}: cannot detect the family of a non-safetensors file; set model.family"
            )
        if any(k.startswith("conditioner.embedders.1") for k in keys):
            return "sdxl"
        if any(k.startswith("model.diffusion_model.") for k in keys):
            return "sd15"
        raise ModelLoadError(f"{path}: {_not_a_checkpoint(keys)}")
    raise ModelLoadError(f"cannot detect the family of hub id {source!r}; set model.family to sdxl or sd15")


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"{path}: not a readable safetensors file ({exc}); it may be truncated (re-download it) or another format"
        ) from exc


def _not_a_checkpoint(keys: list[str]) -> str:
    """Why a safetensors file is no SDXL / SD1.5 checkpoint, with a hint from its keys."""
    if not keys:
        return "holds no tensors: not a model checkpoint"
    if any(".lora_" in k or k.startswith("lora_") for k in keys):
        return (
            "is a LoRA, not a base model: give the base as model.source (or --base) and the LoRA as a checkpoint "
            "(workbench generate/eval -c NAME=PATH)"
        )
    return (
        f"keys look like neither an SDXL nor an SD1.5/2.x checkpoint (first keys: {', '.join(sorted(keys)[:3])}); "
        "give a full single-file checkpoint or a diffusers folder"
    )


#: components the loader does without (``load_pipeline`` passes ``safety_checker=None`` for SD1.5)
_OPTIONAL_COMPONENTS = frozenset({"safety_checker", "feature_extractor", "image_encoder"})


def _check_pipeline_folder(path: Path) -> None:
    """A diffusers folder has a subfolder for each component its model_index.json lists; name a missing one."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # detect_family (family=auto) names it; from_pretrained reports it otherwise
    if not isinstance(index, dict):
        return
    missing = [
        name
        for name, spec in index.items()
        if not name.startswith("_")
        and name not in _OPTIONAL_COMPONENTS
        and isinstance(spec, list)
        and len(spec) == 2
        and spec[0] is not None
        and not (path / name).is_dir()
    ]
    if missing:
        raise ModelLoadError(
            f"{path}: the pipeline folder has no {', '.join(f'{m}/' for m in missing)} (model_index.json lists "
            f"{'it' if len(missing) == 1 else 'them'}); copy the complete pipeline folder"
        )


def load_pipeline(
    source: str,
    *,
    family: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae: str | None = None,
    single_file_config: str | None = None,
) -> Any:
    """Load an SDXL or SD1.5/2.x pipeline from a diffusers folder, a hub id, or a single-file checkpoint.

    ``vae`` optionally replaces the pipeline's VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``); it is loaded in fp32 by
    the training loader when ``vae_dtype: fp32``. ``single_file_config`` is a diffusers folder or hub id whose
    component configs describe a single-file checkpoint (required offline: diffusers otherwise fetches them).
    """
    path = Path(source)
    looks_local = path.exists() or source.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES
    if looks_local and not path.exists():
        raise ModelLoadError(
            f"model.source: {source} does not exist; give a diffusers folder, a hub id or a file"
        )
    fam = family if family not in (None, "auto") else detect_family(source)
    cls = _pipeline_class(fam)
    if path.is_dir():
        _check_pipeline_folder(path)
    elif path.is_file() and path.suffix == ".safetensors" and family not in (None, "auto"):
        keys = _safetensors_keys(path)  # a damaged file is named here, not by a Rust error from diffusers
        if not keys or any(".lora_" in k or k.startswith("lora_") for k in keys):
            raise ModelLoadError(f"{path}: {_not_a_checkpoint(keys)}")
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if fam == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if path.is_file():
            if path.suffix != ".safetensors":  # .ckpt/.pt/.bin are pickles: one holding code is refused unrun
                from workbench.untrusted import load_torch_file

                load_torch_file(path, what="model.source", mmap=True)
            if single_file_config is not None:
                kwargs["config"] = single_file_config
            pipe = cls.from_single_file(str(path), **kwargs)
        else:
            pipe = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        hint = (
            " (no network: download the model on a connected machine and point model.source at the folder)"
            if not looks_local
            else ""
        )
        raise ModelLoadError(f"could not load {source!r} as a {fam} pipeline: {exc}{hint}") from exc
    if vae is not None:
        from diffusers import AutoencoderKL

        try:
            pipe.vae = AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model.vae: could not load VAE {vae!r}: {exc}") from exc
    return pipe.to(device)


def fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """Content fingerprint of a module: its config plus a digest of every parameter (for cache keys)."""
    h = hashlib.sha256(extra.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        flat = p.detach().float().flatten()
        h.update(
            torch.stack([flat.sum(), flat.abs().sum(), flat[:64].sum()]).double().cpu().numpy().tobytes()
        )
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ training setup
@dataclass
class Components:
    """What the training loop needs from a pipeline. ``pipe`` is kept for validation images."""

    family: str
    pipe: Any
    unet: torch.nn.Module
    prediction_type: str


def add_lora(
    unet: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float, init: str
) -> None:
    """Attach a peft LoRA adapter named 'default' to the UNet (diffusers' PeftAdapterMixin.add_adapter)."""
    from diffusers.loaders import PeftAdapterMixin
    from peft import LoraConfig

    if not isinstance(unet, PeftAdapterMixin):
        raise ModelLoadError(f"LoRA needs a diffusers UNet (PeftAdapterMixin), got {type(unet).__name__}")
    config = LoraConfig(
        r=rank,
        # peft annotates lora_alpha as int but only divides by it (scaling = lora_alpha / r); model.lora.alpha is a
        # float on purpose (fractional alphas are valid)
        lora_alpha=alpha,  # pyright: ignore[reportArgumentType]
        lora_dropout=dropout,
        init_lora_weights=True if init == "default" else "gaussian",
        target_modules=target_modules,
    )
    try:
        unet.add_adapter(config)
    except ValueError as exc:
        raise ModelLoadError(f"model.lora.target_modules {target_modules}: {exc}") from exc


def peft_lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights with peft keys (``down_blocks...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(unet: torch.nn.Module, directory: Path, family: str) -> None:
    """Save the UNet LoRA twice: diffusers format (``pipe.load_lora_weights(dir)``) and kohya/A1111 keys.

    The kohya file uses the diffusers module names with the ``lora_unet_`` prefix and explicit ``.alpha`` tensors,
    the layout kohya sd-scripts writes for SD1.5 and that ComfyUI, A1111/Forge and ``load_lora_weights`` all read.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    # peft sets ``peft_config`` (adapter name -> config) on the module when the adapter is injected
    peft_config = getattr(unet, "peft_config", {}).get("default")
    if not isinstance(peft_config, LoraConfig):
        raise ModelLoadError("the UNet has no LoRA adapter named 'default' to save (add it with add_lora)")
    directory.mkdir(parents=True, exist_ok=True)
    # peft keys (``X.lora_A.weight``) as they are: diffusers' convert_state_dict_to_diffusers renames only attention
    # keys, and a file mixing both layouts makes load_lora_weights silently drop the attention adapters.
    peft_state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in peft_lora_state_dict(unet).items()
    }
    _pipeline_class(family).save_lora_weights(
        str(directory),
        unet_lora_layers=peft_state,
        weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=peft_config.to_dict(),
    )
    save_file(to_kohya(peft_state, float(peft_config.lora_alpha)), str(directory / KOHYA_WEIGHT_NAME))


def to_kohya(peft_lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft LoRA keys (``X.lora_A.weight``) -> kohya keys (``lora_unet_X.lora_down.weight`` + ``.alpha``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_lora.items():
        module, kind = key.rsplit(".lora_", 1)  # "unet.down_blocks.0...to_q", "A.weight"
        module = module.removeprefix("unet.")
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        out[f"{base}.alpha"] = torch.tensor(alpha)
    return out


def setup_training_components(model_cfg: Any, device: str | torch.device = "cpu") -> Components:
    """Load the pipeline and prepare the UNet for training (LoRA or full).

    The reference model (LoRA disabled, or a frozen copy for full fine-tunes) is the trainer's business
    (:mod:`workbench.references`). Frozen parts (VAE, text encoders) get their configured dtypes; the trainable
    UNet stays fp32 (AMP master).
    """
    pipe = load_pipeline(
        model_cfg.source,
        family=model_cfg.family,
        vae=model_cfg.vae,
        single_file_config=model_cfg.single_file_config,
        device=device,
    )
    family = "sdxl" if "XL" in type(pipe).__name__ else "sd15"
    pipe.vae.to(dtype=DTYPES[model_cfg.vae_dtype]).requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            enc.to(dtype=DTYPES[model_cfg.text_encoder_dtype]).requires_grad_(False)
    unet = pipe.unet
    prediction_type = (
        pipe.scheduler.config.prediction_type
        if model_cfg.prediction_type == "auto"
        else model_cfg.prediction_type
    )
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    if model_cfg.finetune == "lora":
        unet.requires_grad_(False)
        lc = model_cfg.lora
        add_lora(unet, lc.rank, lc.alpha, lc.target_modules, lc.dropout, lc.init)
    else:
        unet.requires_grad_(True)
    return Components(family=family, pipe=pipe, unet=unet, prediction_type=prediction_type)


# ------------------------------------------------------------------------------------------- applying checkpoints
def apply_checkpoint(pipe: Any, checkpoint: str | Path, adapter_name: str = "tuned") -> Any:
    """Apply a training output to a base pipeline, in place, and return it.

    Accepts: a run's checkpoint folder (``lora/`` or ``unet/`` inside), a LoRA folder in diffusers format, a
    kohya-format LoRA ``.safetensors`` file, or a full UNet folder (``diffusion_pytorch_model.safetensors``).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    if path.is_dir():
        for sub in ("lora", "unet"):
            if (path / sub).is_dir():
                return apply_checkpoint(pipe, path / sub, adapter_name)
        if (path / LORA_WEIGHT_NAME).is_file():
            pipe.load_lora_weights(str(path), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
            return pipe
        if (path / "diffusion_pytorch_model.safetensors").is_file() or (path / "config.json").is_file():
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=pipe.unet.dtype)
            pipe.unet = unet.to(pipe.unet.device)
            return pipe
        raise ModelLoadError(f"{path}: no {LORA_WEIGHT_NAME}, lora/, unet/ or UNet weights inside")
    if path.suffix == ".safetensors":
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
        return pipe
    raise ModelLoadError(f"{path}: expected a folder or a .safetensors LoRA file")
