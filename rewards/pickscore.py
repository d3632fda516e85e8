"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation",
arXiv 2305.01569; code yuvalkirstain/PickScore).

A transformers ``CLIPModel`` (CLIP-H/14 fine-tuned on Pick-a-Pic; HF repo ``yuvalkirstain/PickScore_v1``). The official
README scores one prompt against candidate images::

    s_i = exp(logit_scale) * cos(txt, img_i)          # "PickScore", ~18-23 with the trained scale (~100)
    p_i = softmax_i(s_i)                                # preference probability over the candidates of one prompt

``score`` returns ``s`` per (image, prompt) pair; :meth:`PickScore.probabilities` returns ``p`` with the softmax
taken over images that share a prompt (each prompt's probabilities sum to 1).

Symbols: ``txt``/``img`` L2-normalised text/image embeddings; ``logit_scale`` the model's learnt log temperature.

transformers 5 note: ``get_image_features`` / ``get_text_features`` return a ``BaseModelOutputWithPooling`` whose
``pooler_output`` is the projected embedding (they returned a tensor before); :func:`_embedding` handles both.
Preprocessing follows ``CLIPImageProcessor`` (shortest side -> 224 bicubic, centre crop, OpenAI mean/std) on tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rewards.base import (
    SCORERS,
    Scorer,
    TextEmbeddingCache,
    autocast,
    chunks,
    resolve_dtype,
)
from rewards.ensemble import softmax_by_group
from rewards.preprocess import clip_pixels

if TYPE_CHECKING:
    from transformers import CLIPModel


def _embedding(out: Any) -> torch.Tensor:
    """Tensor from ``get_*_features`` on transformers 4 (tensor) and 5 (``BaseModelOutputWithPooling``)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(
            f"unexpected CLIP feature output {type(out).__name__}; expected a tensor or pooler_output"
        )
    return pooled


def _side(size: Any, key: str) -> int:
    """``224`` from an image-processor size field (int, dict or transformers 5 ``SizeDict``)."""
    if isinstance(size, int):
        return size
    value = getattr(size, key, None)
    return int(value if value is not None else size[key])


def _load_pretrained(loader: Any, path: str, option: str, what: str, fix: str) -> Any:
    local = os.path.isdir(path)
    if (
        local
    ):  # transformers reads pytorch_model*.bin with weights_only=True; refuse code here, naming the file
        from pathlib import Path

        from workbench.untrusted import load_torch_file

        for weights in sorted(Path(path).glob("pytorch_model*.bin")):
            load_torch_file(weights, what=f"{what} {option}=", mmap=True)
    try:
        return loader.from_pretrained(path, local_files_only=local)
    except OSError as e:
        raise ValueError(
            f"{what} not found at {path!r} ({e.__class__.__name__}): {fix} and pass {option}=..."
        ) from e


@SCORERS.register("pickscore")
class PickScore(Scorer):
    description = (
        "PickScore: exp(logit_scale) x cosine(image, prompt), CLIP-H fine-tuned on Pick-a-Pic; ~18-23"
    )
    supports_grad = True
    model: CLIPModel  # set by Scorer._hold_model

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Any,
        *,
        image_size: int = 224,
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        max_length: int = 77,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> None:
        super().__init__()
        self._hold_model(
            model, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable
        )
        self.tokenizer = tokenizer
        self.image_size, self.max_length = int(image_size), int(max_length)
        self.mean, self.std = tuple(mean), tuple(std)
        self.text_cache = TextEmbeddingCache(self._encode_text)

    @property
    def device(self) -> torch.device:
        """Where the model lives (follows ``.to()``)."""
        return next(self.model.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype_option, self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        *,
        processor_path: str | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> PickScore:
        """``path``: a ``save_pretrained`` folder (or a cached hub id) of ``yuvalkirstain/PickScore_v1``;
        ``processor_path``: where the processor lives when not beside the model (the official code uses
        ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; the PickScore_v1 repo ships its own processor files too)."""
        from transformers import AutoProcessor, CLIPModel

        fix = "download yuvalkirstain/PickScore_v1 (huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir DIR)"
        if path is None:
            raise ValueError(f"PickScore weights not given: {fix} and pass path=DIR")
        model = _load_pretrained(CLIPModel, path, "path", "PickScore weights", fix)
        processor = _load_pretrained(
            AutoProcessor, processor_path or path, "processor_path", "PickScore processor",
            "save a CLIPProcessor (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K) into a folder",
        )  # fmt: skip
        ip = processor.image_processor
        size = _side(ip.crop_size, "height")
        if _side(ip.size, "shortest_edge") != size:
            raise ValueError(
                f"processor at {processor_path or path}: resize {ip.size} and crop {ip.crop_size} differ; the tensor "
                "preprocessing here supports CLIP's 'shortest side = crop side' layout only"
            )
        return cls(
            model, processor.tokenizer, image_size=size, mean=ip.image_mean, std=ip.image_std, device=device,
            dtype=dtype, batch_size=batch_size, differentiable=differentiable,
        )  # fmt: skip

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with autocast(self.device, self.compute_dtype):
            out = self.model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
            )
        return F.normalize(_embedding(out).float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            for sl in chunks(images.shape[0], self.batch_size):
                pixels = clip_pixels(
                    images[sl].to(self.device),
                    size=self.image_size,
                    mode="shortest_crop",
                    mean=self.mean,
                    std=self.std,
                )
                with autocast(self.device, self.compute_dtype):
                    feats = self.model.get_image_features(pixel_values=pixels)
                out.append(F.normalize(_embedding(feats).float(), dim=-1))
        return torch.cat(out)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = (self.encode_images(images) * self.text_cache(prompts, self.device)).sum(-1)
        return self.model.logit_scale.detach().float().exp() * cos

    def probabilities(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        """Softmax of PickScore over images that share a prompt: ``[B]``, summing to 1 within each prompt."""
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        return softmax_by_group(self(images, prompts), prompts)
