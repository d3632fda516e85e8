"""open_clip-based scorers: the shared tower wrapper and the CLIP score.

CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", arXiv
2104.08718, Eq. 1: ``CLIP-S(c, v) = w * max(cos(c, v), 0)`` with ``w = 2.5``). We report the torchmetrics
convention ``100 * cos`` (torchmetrics ``CLIPScore``: ``100 * (img * txt).sum(-1)`` on normalised features), per
image, clamped at 0 by default. torchmetrics clamps the *mean* of a batch instead (``max(mean(100 cos), 0)``); for
images that match their prompt both agree. Pass ``clamp=False`` to get the raw ``100 * cos``.

Symbols: ``img``/``txt`` L2-normalised image/text embeddings ``[B, D]``; ``cos = (img * txt).sum(-1)``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
import torch.nn.functional as F

from rewards.base import (
    SCORERS,
    Scorer,
    TextEmbeddingCache,
    autocast,
    chunks,
    resolve_device,
    resolve_dtype,
)
from rewards.preprocess import OPENAI_MEAN, OPENAI_STD, ResizeMode, clip_pixels

if TYPE_CHECKING:
    from open_clip import CLIP, CoCa, CustomTextCLIP

    #: the towers ``open_clip.create_model`` builds (it is annotated as returning a plain ``torch.nn.Module``)
    OpenClipModel: TypeAlias = CLIP | CustomTextCLIP | CoCa

_OPEN_CLIP_MODES: dict[str, ResizeMode] = {
    "shortest": "shortest_crop",
    "longest": "longest_pad",
    "squash": "squash",
}


def create_open_clip(
    arch: str, pretrained: str | None, *, device: str | torch.device = "cpu", option: str = "pretrained"
) -> tuple[Any, Any]:
    """Build an open_clip model + tokenizer, loading ``pretrained`` (a file path or an open_clip tag).

    - ``arch="local-dir:/folder"``: an open_clip folder (``open_clip_config.json`` + ``open_clip_model.safetensors``);
      ``pretrained`` must be None.
    - ``pretrained=/path/file.pt``: a checkpoint file (``{'state_dict': ...}``, plain state dict, ``.safetensors``),
      loaded with ``torch.load(weights_only=True)`` and ``strict=True`` by open_clip's ``load_checkpoint``.
    - ``pretrained=tag`` (e.g. ``laion2b_s32b_b79k``): resolved through the Hugging Face cache (honours
      ``HF_HUB_OFFLINE``/``HF_HOME``).
    - ``pretrained=None``: random init (tests, benchmarks, ``device="meta"`` shape checks).
    """
    import open_clip

    if arch.startswith("local-dir:"):
        folder = arch.removeprefix("local-dir:")
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise ValueError(
                f"arch={arch!r}: no open_clip_config.json in {folder}; point arch at a folder saved in open_clip's "
                "layout (open_clip_config.json + open_clip_model.safetensors)"
            )
        pretrained = None
    elif pretrained is not None and (
        os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    ):
        if not os.path.isfile(pretrained):
            raise ValueError(f"{option}={pretrained!r}: file not found; pass the path of the checkpoint file")
    # on the meta device (shape checks) build every tensor there directly: no init compute, no memory
    on_meta = torch.device(device).type == "meta"
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = open_clip.create_model(
                arch,
                pretrained=pretrained,
                device=device,
                precision="fp32",
                weights_only=True,
                load_weights=True,
            )
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{option}={pretrained!r} holds pickled objects that torch.load(weights_only=True) refuses; re-save it as a "
            "plain state dict (torch.save({'state_dict': sd}, path)) from a trusted environment"
        ) from e
    except RuntimeError as e:
        if "Failed to download" in str(e):
            raise ValueError(
                f"{option}={pretrained!r} is an open_clip tag whose weights are not in the Hugging Face cache and "
                "cannot be downloaded here; download them on a connected machine or pass a local file path"
            ) from e
        raise
    tokenizer = open_clip.get_tokenizer(arch)
    return model, tokenizer


def open_clip_preprocess(model: Any) -> tuple[int, ResizeMode, tuple[float, ...], tuple[float, ...]]:
    """(size, resize mode, mean, std) from an open_clip model's ``preprocess_cfg``."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mode = _OPEN_CLIP_MODES.get(cfg.get("resize_mode", "shortest"), "shortest_crop")
    return size, mode, tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


class OpenClipScorer(Scorer):
    """An open_clip model kept resident, with batched tensor preprocessing and a text-embedding cache.

    Subclasses turn ``(img, txt)`` embeddings into a score. ``model`` and ``tokenizer`` are injected (tests build tiny
    ones); ``from_pretrained`` in subclasses loads real weights.
    """

    supports_grad = True
    model: OpenClipModel  # set by Scorer._hold_model

    def __init__(
        self,
        model: OpenClipModel,
        tokenizer: Any,
        *,
        image_size: int = 224,
        resize_mode: ResizeMode = "shortest_crop",
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
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
        self.image_size = int(image_size)
        self.resize_mode: ResizeMode = resize_mode
        self.mean, self.std = tuple(mean), tuple(std)
        self.text_cache = TextEmbeddingCache(self._encode_text)

    @property
    def device(self) -> torch.device:
        """Where the model lives (follows ``.to()``)."""
        return next(self.model.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype_option, self.device)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        with autocast(self.device, self.compute_dtype):
            feats = self.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return clip_pixels(images, size=self.image_size, mode=self.resize_mode, mean=self.mean, std=self.std)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> L2-normalised fp32 embeddings ``[B, D]`` (grad iff ``differentiable``)."""
        out = []
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            for sl in chunks(images.shape[0], self.batch_size):
                pixels = self.preprocess(images[sl].to(self.device))
                with autocast(self.device, self.compute_dtype):
                    feats = self.model.encode_image(pixels)
                out.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text_cache(prompts, self.device)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``cos(image_i, prompt_i)`` per pair, ``[B]`` fp32."""
        return (self.encode_images(images) * self.encode_texts(prompts)).sum(-1)


@SCORERS.register("clipscore")
class CLIPScore(OpenClipScorer):
    """CLIP score: ``100 * cos(image, prompt)``, clamped at 0 (torchmetrics scale; Hessel's CLIP-S = 2.5 cos)."""

    description = (
        "CLIP score: 100 x cosine(image, prompt) with an open_clip model, clamped at 0; ~15-35 for matches"
    )

    def __init__(self, model: OpenClipModel, tokenizer: Any, *, clamp: bool = True, **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.clamp = bool(clamp)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = "openai",
        *,
        arch: str = "ViT-L-14-quickgelu",
        clamp: bool = True,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> CLIPScore:
        """``arch`` + ``pretrained`` as open_clip names them: ``ViT-L-14-quickgelu`` + ``openai`` (OpenAI CLIP L/14;
        use the ``-quickgelu`` arch, open_clip 3 builds GELU for plain ``ViT-L-14``), ``ViT-H-14`` +
        ``laion2b_s32b_b79k``, a checkpoint file path, or ``arch="local-dir:/folder"``."""
        if pretrained is None and not arch.startswith("local-dir:"):
            raise ValueError(
                "clipscore needs weights: pass pretrained=<open_clip tag or checkpoint file> (e.g. 'openai' with "
                "arch='ViT-L-14-quickgelu') or arch='local-dir:/folder'"
            )
        dev = resolve_device(device)
        model, tokenizer = create_open_clip(arch, pretrained, device=dev)
        size, mode, mean, std = open_clip_preprocess(model)
        return cls(
            model, tokenizer, clamp=clamp, image_size=size, resize_mode=mode, mean=mean, std=std, device=dev,
            dtype=dtype, batch_size=batch_size, differentiable=differentiable,
        )  # fmt: skip

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        s = 100.0 * self.cosine(images, prompts)
        return s.clamp_min(0.0) if self.clamp else s
