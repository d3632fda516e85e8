"""HPSv2 / HPSv2.1: Human Preference Score v2 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis", arXiv 2306.09341; code tgxs002/HPSv2).

The model is open_clip ``ViT-H-14`` fine-tuned on HPD v2; the released checkpoints ``HPS_v2_compressed.pt`` /
``HPS_v2.1_compressed.pt`` (HF model repo ``xswu/HPSv2``) are ``{'state_dict': ...}`` files holding every weight, so
no base LAION download is needed. We load them with open_clip 3.x (``torch.load(weights_only=True)``, strict) and do
not import the ``hpsv2`` package (its 1.2.0 wheel lacks the BPE vocabulary, reloads the checkpoint on every call and
pins pytest 7.2.0 / protobuf<4; research/rewards.md §1).

Score, as ``hpsv2.img_score.score`` computes it (``hpsv2/img_score.py``)::

    img = normalize(encode_image(preprocess_val(x)))   # preprocess_val: ResizeMaxSize(224) + zero pad + OpenAI norm
    txt = normalize(encode_text(tokenize(prompt)))
    hps = diag(img @ txt.T) = (img * txt).sum(-1)       # raw cosine, ~0.2-0.35; no logit scale

The published benchmark tables (``evaluate_benchmark``) report ``100 * cos`` (~20-35). ``scale="cosine"`` (default)
returns what ``hpsv2.score`` returns, ``scale="benchmark"`` the table scale. Scores compare images of the *same*
prompt; v2.0 and v2.1 numbers are on different scales (maintainer, tgxs002/HPSv2 issue #9).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from rewards.base import SCORERS, resolve_device
from rewards.clip import OpenClipScorer, create_open_clip
from rewards.preprocess import OPENAI_MEAN, OPENAI_STD

if TYPE_CHECKING:
    from rewards.clip import OpenClipModel

Scale = Literal["cosine", "benchmark"]
_SCALES = {"cosine": 1.0, "benchmark": 100.0}


class HPSScorer(OpenClipScorer):
    """HPS: cosine between open_clip ViT-H-14 (HPS fine-tune) image and prompt embeddings, letterboxed input."""

    #: released checkpoint file name (HF model repo ``xswu/HPSv2``)
    checkpoint_name: str = "HPS_v2.1_compressed.pt"

    def __init__(
        self, model: OpenClipModel, tokenizer: Any, *, scale: Scale = "cosine", **kwargs: Any
    ) -> None:
        if scale not in _SCALES:
            raise ValueError(
                f"scale={scale!r} is unknown; use 'cosine' (hpsv2.score) or 'benchmark' (100 x cosine)"
            )
        kwargs.setdefault("resize_mode", "longest_pad")  # HPS ResizeMaxSize: letterbox, black pad
        kwargs.setdefault("mean", OPENAI_MEAN)
        kwargs.setdefault("std", OPENAI_STD)
        super().__init__(model, tokenizer, **kwargs)
        self.scale = scale

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        *,
        arch: str = "ViT-H-14",
        scale: Scale = "cosine",
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> HPSScorer:
        """Load an HPS checkpoint (``{'state_dict': ...}`` .pt) into open_clip ``arch`` (``ViT-H-14`` for the release)."""
        if path is None or not os.path.isfile(path):
            where = "no path was given" if path is None else f"{path} does not exist"
            raise ValueError(
                f"{cls.__name__} weights not found ({where}): download {cls.checkpoint_name} from the Hugging Face "
                f"model repo xswu/HPSv2 and pass path=/path/to/{cls.checkpoint_name}"
            )
        dev = resolve_device(device)
        model, tokenizer = create_open_clip(arch, path, device=dev, option="path")
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        return cls(
            model, tokenizer, scale=scale, image_size=size, device=dev, dtype=dtype, batch_size=batch_size,
            differentiable=differentiable,
        )  # fmt: skip

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return _SCALES[self.scale] * self.cosine(images, prompts)


@SCORERS.register("hpsv2")
class HPSv2(HPSScorer):
    description = (
        "HPS v2.0: cosine(image, prompt) of the HPS ViT-H-14 (~0.2-0.35; scale='benchmark' gives 100x)"
    )
    checkpoint_name = "HPS_v2_compressed.pt"


@SCORERS.register("hpsv2.1")
class HPSv21(HPSScorer):
    description = (
        "HPS v2.1: cosine(image, prompt) of the HPS ViT-H-14 (~0.2-0.35; scale='benchmark' gives 100x)"
    )
    checkpoint_name = "HPS_v2.1_compressed.pt"
