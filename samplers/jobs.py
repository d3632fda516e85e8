"""Orchestration of one generation job: (prompt, seed) items -> uint8 images, in batches, through the cache.

The pipeline is loaded lazily: when every item is already cached, no weights are loaded at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from samplers.cache import ImageCache
from samplers.generate import SamplingConfig, batched, sample, to_uint8, with_sampler


def generate_images(
    load: Callable[[], Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    cfg: SamplingConfig,
    *,
    batch_size: int = 16,
    cache: ImageCache | None = None,
    model_id: str | None = None,
    desc: str | None = "generating",
) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """Yield ``(item indices, H x W x 3 uint8 images)`` batches covering every (prompts[i], seeds[i]) item.

    ``load()`` returns the pipeline (called at most once, only if an item is missing from ``cache``); ``model_id``
    identifies its weights in cache keys (required with a cache). Cached items come first, then fresh batches of
    ``batch_size``; each fresh image is written to the cache as soon as its batch is done (resumable).
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if cache is not None and model_id is None:
        raise ValueError("a cache needs the model_id of the weights that produce the images")
    keys = [ImageCache.key(model_id or "", cfg, p, s) for p, s in zip(prompts, seeds)] if cache else []
    bar = tqdm(total=len(prompts), desc=desc, unit="img", disable=desc is None, leave=False)
    missing: list[int] = []
    hits: list[int] = []
    hit_images: list[np.ndarray] = []
    for i in range(len(prompts)):
        image = cache.get(keys[i]) if cache else None
        if image is None:
            missing.append(i)
        else:
            hits.append(i)
            hit_images.append(image)
        if len(hits) == batch_size:
            bar.update(len(hits))
            yield hits, hit_images
            hits, hit_images = [], []
    if hits:
        bar.update(len(hits))
        yield hits, hit_images
    if missing:
        pipe = with_sampler(load(), cfg.sampler)
        for rows in batched(len(missing), batch_size):
            idx = [missing[r] for r in rows]
            images = list(to_uint8(sample(pipe, [prompts[i] for i in idx], [seeds[i] for i in idx], cfg)))
            if cache:
                for i, image in zip(idx, images):
                    cache.put(keys[i], image)
            bar.update(len(idx))
            yield idx, images
    bar.close()
