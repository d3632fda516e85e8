"""The scorer protocol and the scorer registry.

Contract (DESIGN.md): ``scorer(images, prompts) -> Tensor[B]``; images are RGB float in [0, 1], shape [B, 3, H, W],
any H and W; each scorer owns its preprocessing; batched; weights loaded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.registry import Registry

#: name -> scorer class (or factory). ``rewards.build_scorer(name, **options)`` constructs one.
SCORERS: Registry = Registry("scorer")


class Scorer(torch.nn.Module):
    """Base class: subclasses implement :meth:`score`; ``__call__`` validates inputs and dispatches."""

    #: short human description of what the number means, its scale and range (shown by ``workbench ls``).
    description: str = ""
    #: True when :meth:`score` is differentiable with respect to the images.
    differentiable: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        return self.score(images, list(prompts))
