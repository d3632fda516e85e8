"""The canonical batch layout, owned here and nowhere else.

Groups are ``[B, K, ...]``: B groups (pairs, or K-wise rankings), K images each, column 0 preferred, rankings
best-first. Models see a flat ``[B*K, ...]`` batch (all K images of a group in one forward); these helpers are the
only place that flattens and restores the group axis, so objectives never ``chunk(2)`` along the batch.

Groups of different K in one batch are padded to the largest K: ``mask[b, k]`` is False for padding columns (their
latents are zeros and their scores NaN), and objectives that accept variable K must ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupBatch:
    latents: torch.Tensor  # [B, K, C, h, w]  x0 (a sample of the VAE posterior, scaled for the UNet)
    prompt_embeds: torch.Tensor  # [B, L, D]  shared by the K images of a group
    pooled_embeds: torch.Tensor | None  # [B, P]  SDXL only
    time_ids: (
        torch.Tensor | None
    )  # [B, K, 6] SDXL micro-conditioning, per image (flip changes the crop offset)
    indices: torch.Tensor  # [B] dataset positions (for reports)
    mask: torch.Tensor | None = None  # [B, K] bool, False = padding; None = every column is real
    pref_prob: torch.Tensor | None = (
        None  # [B] P(column 0 preferred over column 1) in [0.5, 1]; None = hard labels
    )
    scores: torch.Tensor | None = (
        None  # [B, K] per-image scores (higher = better, NaN = unknown); None = none given
    )

    @property
    def shape(self) -> tuple[int, int]:
        return self.latents.shape[0], self.latents.shape[1]

    @property
    def group_sizes(self) -> torch.Tensor:
        """``[B]`` number of real images per group."""
        b, k = self.shape
        if self.mask is None:
            return torch.full((b,), k, dtype=torch.long)
        return self.mask.sum(dim=1)


def flatten_groups(x: torch.Tensor) -> torch.Tensor:
    """``[B, K, ...] -> [B*K, ...]`` (group-major: the K images of group 0 first)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unflatten_groups(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[B*K, ...] -> [B, K, ...]``; inverse of :func:`flatten_groups`."""
    return x.reshape(x.shape[0] // k, k, *x.shape[1:])


def repeat_per_image(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group conditioning ``[B, ...] -> [B*K, ...]`` aligned with :func:`flatten_groups`."""
    return x.repeat_interleave(k, dim=0)
