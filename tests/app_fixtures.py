"""Shared pieces of the app tests: a deterministic fake renderer and PNGs carrying ComfyUI / A1111 metadata."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

A1111_PARAMETERS = (
    "a red circle on a white background, masterpiece\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 32x32, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "detail: 0a1b2c, style: 3d4e5f", '
    "Version: v1.10.1"
)

COMFYUI_GRAPH = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": ["10", 0],
            "steps": 25,
            "cfg": 6.5,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["11", 0], "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly, watermark", "clip": ["4", 1]}},
    "10": {"class_type": "PrimitiveNode", "inputs": {"seed": 987654321}},
    "11": {"class_type": "PrimitiveNode", "inputs": {"string": "a red circle on a white background"}},
}


class FakeRenderer:
    """Deterministic images: the same (checkpoint, prompt, seed) always gives the same pixels, different
    checkpoints differ; counts calls so tests can check what was rendered."""

    def __init__(self, names: Sequence[str] = ("base", "tuned")) -> None:
        self._names = list(names)
        self.calls: list[tuple[str, list[int]]] = []

    def names(self) -> list[str]:
        return list(self._names)

    def add(self, checkpoint: Any) -> None:
        self._names.append(checkpoint.name)

    def identity(self, name: str) -> dict[str, Any]:
        return {"checkpoint": name, "checkpoint_path": None, "checkpoint_hash": f"fake-{name}"}

    def render(
        self, name: str, prompts: Sequence[str], seeds: Sequence[int], cfg: Any, progress: Any = None
    ) -> list[np.ndarray]:
        self.calls.append((name, [int(s) for s in seeds]))
        out = []
        for p, s in zip(prompts, seeds):
            digest = hashlib.sha256(f"{name}|{p}|{s}|{cfg.guidance}".encode()).digest()
            out.append(np.frombuffer(digest * 96, dtype=np.uint8)[: 16 * 16 * 3].reshape(16, 16, 3).copy())
        return out


def write_curate_folder(folder: Path) -> dict[str, Path]:
    """Two ComfyUI PNGs, two A1111 PNGs, one plain PNG with a sidecar caption, one without anything."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for i in range(2):
        info = PngInfo()
        info.add_text("prompt", json.dumps(COMFYUI_GRAPH))
        info.add_text("workflow", json.dumps({"nodes": [], "links": []}))
        path = folder / f"ComfyUI_{i:05d}_.png"
        Image.new("RGB", (32, 32), (200, 30 + 40 * i, 30)).save(path, pnginfo=info)
        files[f"comfy{i}"] = path
    for i in range(2):
        info = PngInfo()
        info.add_text("parameters", A1111_PARAMETERS.replace("Seed: 1234", f"Seed: {1234 + i}"))
        path = folder / "a1111" / f"0000{i}-{1234 + i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (30, 200, 30 + 50 * i)).save(path, pnginfo=info)
        files[f"a1111_{i}"] = path
    plain = folder / "plain.png"
    Image.new("RGB", (32, 32), (90, 90, 220)).save(plain)
    plain.with_suffix(".txt").write_text("a blue square on a black background\n")
    files["sidecar"] = plain
    bare = folder / "bare.png"
    Image.new("RGB", (32, 32), (10, 10, 10)).save(bare)
    files["bare"] = bare
    return files
