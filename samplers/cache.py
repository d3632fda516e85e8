"""A content-addressed cache of generated images, so that re-evaluating the same base (same weights, prompts, seeds
and sampling settings) reuses its images bit for bit instead of regenerating them.

Key = sha256 of (model id, sampling config incl. the noise rule, prompt, seed); value = the PNG that was scored.
Images are stored as 8-bit PNGs and everything downstream (scores, grids, reports) reads those same bytes, so a
cached and a fresh evaluation produce identical numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from samplers.generate import SamplingConfig, load_image, save_png


def default_cache_dir() -> Path:
    """``$WORKBENCH_CACHE/generations`` (default ``~/.cache/workbench/generations``)."""
    root = os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench"
    return Path(root) / "generations"


class ImageCache:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    @staticmethod
    def key(model_id: str, cfg: SamplingConfig, prompt: str, seed: int) -> str:
        payload = json.dumps([model_id, cfg.to_dict(), prompt, int(seed)], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            return load_image(p)
        except OSError:  # a corrupt entry is regenerated, not trusted
            return None

    def put(self, key: str, image: np.ndarray) -> Path:
        return save_png(image, self.path(key))
