"""Shared initial noise: the rule that makes "the same (prompt, seed)" mean the same starting latents everywhere.

The rule (``NOISE_RULE``): every image gets its own ``torch.Generator`` on the CPU, seeded with
``noise_seed(prompt, seed)`` = the first 8 bytes (big-endian, top bit cleared) of ``blake2b(f"{seed}\\x00{prompt}")``.
Its first draw, ``torch.randn(latent_shape, generator=g, dtype=float32)``, is the image's initial latent (before the
scheduler's ``init_noise_sigma`` scaling). Consequences:

* the noise depends only on the prompt text and the seed, never on the checkpoint, the batch size, the position of
  the prompt in its file, the device or the dtype, so every checkpoint compared starts from identical noise;
* two prompts with the same seed get different noise (no correlation across the prompts of an eval set);
* the same generator is handed to the scheduler for any noise drawn while sampling (stochastic samplers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

#: bump when the rule changes: generation caches include it in their keys.
NOISE_RULE = "blake2b-prompt-seed-v1"


def noise_seed(prompt: str, seed: int) -> int:
    """The generator seed of one image: a stable 63-bit hash of (seed, prompt)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def generators(prompts: Sequence[str], seeds: Sequence[int]) -> list[torch.Generator]:
    """One fresh CPU generator per (prompt, seed) item."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    return [torch.Generator("cpu").manual_seed(noise_seed(p, s)) for p, s in zip(prompts, seeds)]


def initial_noise(shape: Sequence[int], gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Unit Gaussian latents ``[B, *shape]`` in float32 on the CPU, row ``i`` drawn from ``gens[i]``."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens])
