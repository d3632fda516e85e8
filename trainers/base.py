"""Shared pieces of every preference objective: the registry and the per-sample error.

Batch layout contract (owned by :mod:`workbench.batch`): predictions and targets are ``[B, K, C, H, W]``; column 0
is the preferred image, rankings are best-first. Objectives never ``chunk(2)`` along the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.registry import Registry


@dataclass(frozen=True)
class Objective:
    """A registered objective: its pure loss function, its config model, and what the loop must provide."""

    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    config_cls: type
    needs_reference: bool = True
    min_images_per_group: int = 2


OBJECTIVES: Registry[Objective] = Registry("objective")


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over C, H, W in fp32 (every official codebase: ``.mean(dim=[1,2,3])``).

    ``pred``, ``target``: ``[..., C, H, W]`` -> ``[...]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).mean(dim=(-3, -2, -1))
