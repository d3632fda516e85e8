"""The scorer protocol and the scorer registry.

Contract (DESIGN.md): ``scorer(images, prompts) -> Tensor[B]``; images are RGB float in [0, 1], shape [B, 3, H, W],
any H and W; each scorer owns its preprocessing; batched; weights loaded once.

Real-weight scorers expose ``from_pretrained(path, **options)``; their constructors take already-built modules
(constructor injection, used by tests). ``rewards.build_scorer(name, **options)`` is the one entry point for YAML.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch

from workbench.registry import Registry

#: name -> scorer class (or factory). ``rewards.build_scorer(name, **options)`` constructs one.
SCORERS: Registry = Registry("scorer")


class Scorer(torch.nn.Module):
    """Base class: subclasses implement :meth:`score`; ``__call__`` validates inputs and dispatches."""

    #: short human description of what the number means, its scale and range (shown by ``workbench ls``).
    description: str = ""
    #: True when :meth:`score` is differentiable with respect to the images (for model scorers: the instance was
    #: built with ``differentiable=True``; ``supports_grad`` says whether that is possible at all).
    differentiable: bool = False
    #: True when the scorer can be built with ``differentiable=True`` (tensor preprocessing, no PIL round trip).
    supports_grad: bool = False
    #: False for prompt-independent scorers (aesthetic, JPEG size); they ignore ``prompts``.
    needs_prompt: bool = True

    def score(
        self, images: torch.Tensor, prompts: Sequence[str]
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        return self.score(images, list(prompts))

    def _hold_model(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        batch_size: int,
        differentiable: bool,
    ) -> None:
        """Shared set-up of the model scorers: validate options, freeze the model, move it to ``device``."""
        target = resolve_device(device)
        self.dtype_option = dtype
        resolve_dtype(dtype, target)  # validate now, resolve per call (the scorer may be moved with .to())
        self.batch_size = check_batch_size(batch_size)
        self.differentiable = bool(differentiable)
        self.model = model.eval().requires_grad_(False)
        if target.type != "meta":
            self.model.to(target)


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the model scorers: device / dtype options, autocast, batching, a text-embedding cache


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"`` -> cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"device={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'auto'"
        ) from e


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DTYPES |= {"float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute dtype of the towers. ``None`` / ``"auto"`` -> bf16 on CUDA, fp32 elsewhere.

    Weights stay fp32; lower precision is applied with autocast, and the final normalisation and dot products run in
    fp32 (research/rewards.md §5.3), so scores stay comparable across dtypes to ~1e-2.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[object]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return int(batch_size)


class TextEmbeddingCache:
    """LRU cache ``prompt -> normalised fp32 text embedding`` (prompts repeat across steps, seeds and checkpoints).

    Embeddings are computed under ``no_grad``: prompts are never optimised (as in HPS / PickScore training).
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_items: int = 16384) -> None:
        self._encode = encode
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_items = max_items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def __call__(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._items))
        if missing:
            with torch.no_grad():
                emb = self._encode(missing).float()
            for p, e in zip(missing, emb):
                self._items[p] = e.detach()
        for p in prompts:
            self._items.move_to_end(p)
        out = torch.stack([self._items[p] for p in prompts]).to(device)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return out
