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
    """One batch of B groups of K images. Shapes: ``latents [B, K, C, h, w]`` (x0, a posterior sample scaled for the
    UNet); ``prompt_embeds [B, L, D]`` and ``pooled_embeds [B, P]`` (SDXL), shared by a group's K images;
    ``time_ids [B, K, 6]`` (SDXL micro-conditioning, per image: a flip changes the crop offset); ``indices [B]``
    (dataset positions); ``mask [B, K]`` (False = padding; None = every column is real); ``pref_prob [B]``
    (P(column 0 preferred over column 1), in [0.5, 1]; None = hard labels); ``scores [B, K]`` (per-image scores,
    higher = better, NaN = unknown; None = none given)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None
    time_ids: torch.Tensor | None
    indices: torch.Tensor
    mask: torch.Tensor | None = None
    pref_prob: torch.Tensor | None = None
    scores: torch.Tensor | None = None

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


def first_column(batch: GroupBatch) -> GroupBatch:
    """The batch reduced to column 0 (the preferred image) of every group, ``K = 1``: for objectives that use only
    the winners (SFT) or no preference at all (Self-NPO), so the other images are never run through a model. Every
    random draw that built ``batch`` is unchanged."""
    return GroupBatch(
        latents=batch.latents[:, :1],
        prompt_embeds=batch.prompt_embeds,
        pooled_embeds=batch.pooled_embeds,
        time_ids=None if batch.time_ids is None else batch.time_ids[:, :1],
        indices=batch.indices,
        mask=None,
        pref_prob=None,
        scores=None if batch.scores is None else batch.scores[:, :1],
    )
