"""Tiny scorer models saved in the real on-disk formats, built once per test session (no hub, no downloads).

- :func:`tiny_open_clip_arch`: a tiny open_clip architecture registered with ``open_clip.add_model_config``.
- :func:`hps_checkpoint`: random tiny weights saved as ``{'state_dict': ...}`` (the HPS ``.pt`` layout).
- :func:`open_clip_folder`: an open_clip ``local-dir:`` folder (``open_clip_config.json`` + safetensors).
- :func:`pickscore_folder`: a tiny transformers ``CLIPModel`` + ``CLIPProcessor`` written with ``save_pretrained``; the
  tokenizer is the real CLIP BPE rebuilt from open_clip's shipped vocabulary (:func:`workbench.tiny.write_clip_tokenizer`).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

TINY_ARCH = "RewardsTest-Tiny-ViT"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@functools.cache
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="rewards-tests-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def tiny_open_clip_arch() -> str:
    import open_clip

    path = workdir() / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return TINY_ARCH


def tiny_open_clip_model(seed: int = 0) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(tiny_open_clip_arch(), pretrained=None).eval()


@functools.cache
def hps_checkpoint() -> Path:
    """Tiny random weights in the HPS release format (``torch.save({'state_dict': sd})``), seed 0."""
    path = workdir() / "HPS_tiny.pt"
    torch.save({"state_dict": tiny_open_clip_model(0).state_dict()}, path)
    return path


@functools.cache
def open_clip_folder() -> Path:
    """Tiny random weights (seed 1) as an open_clip ``local-dir:`` folder, resize mode ``shortest``."""
    from safetensors.torch import save_file

    d = workdir() / "openclip-tiny"
    d.mkdir()
    pre = {
        "size": [224, 224],
        "mode": "RGB",
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": pre}))
    sd = {k: v.contiguous() for k, v in tiny_open_clip_model(1).state_dict().items()}
    save_file(sd, str(d / "open_clip_model.safetensors"))
    return d


def tiny_hf_clip_config(projection_dim: int = 16):
    from transformers import CLIPConfig

    return CLIPConfig(
        projection_dim=projection_dim,
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
            "hidden_act": "gelu",
        },
    )


@functools.cache
def pickscore_folder() -> Path:
    """A ``save_pretrained`` folder with a tiny ``CLIPModel`` (seed 0) and a real-vocabulary ``CLIPProcessor``."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from workbench.tiny import write_clip_tokenizer

    d = workdir() / "pickscore-tiny"
    tok_dir = workdir() / "clip-tokenizer"
    write_clip_tokenizer(tok_dir, n_merges=49152 - 256 - 2, model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    torch.manual_seed(0)
    model = CLIPModel(tiny_hf_clip_config())
    model.save_pretrained(str(d))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(d))
    return d


def images(n: int, h: int = 64, w: int = 48, seed: int = 0) -> torch.Tensor:
    """``[n, 3, h, w]`` random RGB in [0, 1] quantised to 1/255 (as decoded from an 8-bit file)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g) * 255).round() / 255


def hps_resize_max_size(x: torch.Tensor, max_size: int) -> torch.Tensor:
    """``ResizeMaxSize.forward`` of hpsv2's vendored open_clip 2.16 ``transform.py``, restated on a CHW tensor."""
    height, width = x.shape[1:]
    scale = max_size / float(max(height, width))
    new_size = tuple(round(dim * scale) for dim in (height, width))
    x = TF.resize(x, list(new_size), InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = max_size - new_size[0], max_size - new_size[1]
    return TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
