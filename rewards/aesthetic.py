"""LAION "improved aesthetic predictor" v2 (C. Schuhmann, github.com/christophschuhmann/improved-aesthetic-predictor,
``simple_inference.py``; weights ``sac+logos+ava1-l14-linearMSE.pth``), written in-house.

A 5-layer *linear* MLP (dropouts, no activations, as released) on the L2-normalised OpenAI CLIP ViT-L/14 image
embedding::

    e = normalize(clip_l14.encode_image(x))            # [B, 768], OpenAI preprocessing (shortest side 224 + crop)
    aesthetic = mlp(e)                                  # [B], an AVA-like 1-10 rating (generations mostly ~4-7)

State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``. ReLUs and dropouts carry no parameters, so a wrong variant with
ReLUs would still load strictly; the layer list below is the released one. Prompt-independent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rewards.base import SCORERS, resolve_device
from rewards.clip import OpenClipScorer, create_open_clip, open_clip_preprocess

if TYPE_CHECKING:
    from rewards.clip import OpenClipModel


class AestheticMLP(torch.nn.Module):
    """``MLP(768)`` of ``simple_inference.py``: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


def load_aesthetic_mlp(path: str, input_size: int = 768) -> AestheticMLP:
    """Load the released ``.pth`` state dict (``weights_only=True``, strict; a file holding pickled code is refused
    with a message naming it, :func:`workbench.untrusted.load_torch_file`)."""
    from workbench.untrusted import load_torch_file

    mlp = AestheticMLP(input_size)
    state = load_torch_file(path, what="aesthetic MLP weights")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"path={path!r} is not a LAION aesthetic v2 MLP for {input_size}-d embeddings ({e}); use "
            "sac+logos+ava1-l14-linearMSE.pth with a ViT-L/14 backbone"
        ) from e
    return mlp


@SCORERS.register("aesthetic")
class AestheticScorer(OpenClipScorer):
    description = (
        "LAION aesthetic v2: linear MLP on CLIP ViT-L/14 image embeddings; ~1-10 (AVA-like), no prompt"
    )
    needs_prompt = False

    def __init__(self, model: OpenClipModel, tokenizer: Any, mlp: AestheticMLP, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.mlp = mlp.eval().requires_grad_(False)
        if self.device.type != "meta":
            self.mlp.to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        *,
        clip_pretrained: str | None = "openai",
        clip_arch: str = "ViT-L-14-quickgelu",
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> AestheticScorer:
        """``path``: the MLP ``.pth``; ``clip_arch``/``clip_pretrained``: the OpenAI CLIP L/14 backbone as open_clip
        names it (tag ``openai`` from the HF cache, a checkpoint file, or ``clip_arch="local-dir:/folder"``)."""
        if path is None or not os.path.isfile(path):
            where = "no path was given" if path is None else f"{path} does not exist"
            raise ValueError(
                f"aesthetic MLP weights not found ({where}): download sac+logos+ava1-l14-linearMSE.pth from "
                "github.com/christophschuhmann/improved-aesthetic-predictor and pass path=/path/to/it"
            )
        dev = resolve_device(device)
        model, tokenizer = create_open_clip(clip_arch, clip_pretrained, device=dev, option="clip_pretrained")
        size, mode, mean, std = open_clip_preprocess(model)
        embed_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else 768
        mlp = load_aesthetic_mlp(path, input_size=embed_dim)
        return cls(
            model, tokenizer, mlp, image_size=size, resize_mode=mode, mean=mean, std=std, device=dev, dtype=dtype,
            batch_size=batch_size, differentiable=differentiable,
        )  # fmt: skip

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        emb = self.encode_images(images)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            return self.mlp(emb).float()
