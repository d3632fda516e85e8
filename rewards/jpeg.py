"""JPEG (in)compressibility, the prompt-free rewards of DDPO (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning", arXiv 2305.13301, Sec. 6.1; code jannerm/ddpo ``ddpo_pytorch/rewards.py``)::

    size_kb = len(JPEG(round(255 x), quality=95)) / 1000
    jpeg_incompressibility = size_kb          jpeg_compressibility = -size_kb

Not differentiable (the JPEG encoder is a PIL call). Depends on the image size: compare images of the same size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from rewards.base import SCORERS, Scorer


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> JPEG file size in kB (1000 bytes) at ``quality``, ``[B]`` float32."""
    from PIL import Image

    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegScorer(Scorer):
    needs_prompt = False
    sign: float = 1.0

    def __init__(self, quality: int = 95, differentiable: bool = False) -> None:
        super().__init__()
        if differentiable:
            raise ValueError(
                f"{type(self).__name__} is not differentiable (PIL JPEG encoder); set differentiable=false"
            )
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(
                f"{type(self).__name__}: quality={quality!r} must be an integer in 1..100 (DDPO uses 95), "
                "e.g. jpeg_compressibility:quality=90"
            )
        self.quality = int(quality)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality).to(images.device)


@SCORERS.register("jpeg_incompressibility")
class JpegIncompressibility(_JpegScorer):
    description = "JPEG size in kB at quality 95 (DDPO incompressibility); larger = more detail; no prompt"
    sign = 1.0


@SCORERS.register("jpeg_compressibility")
class JpegCompressibility(_JpegScorer):
    description = (
        "minus JPEG size in kB at quality 95 (DDPO compressibility); larger = simpler image; no prompt"
    )
    sign = -1.0
