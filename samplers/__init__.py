"""Generation with explicit seeds: named samplers, the shared-noise rule, batched sampling, a generation cache.

Every function that draws noise takes (or builds, from the documented rule in :mod:`samplers.noise`) a
``torch.Generator``; the same (prompt, seed) gives the same initial noise for every checkpoint compared.
"""

from samplers import (
    inversion,  # registers the inversion noising methods (ddim_inversion, renoise_inversion)
    truncated,  # registers Self-NPO's truncated_teacher noising
)
from samplers.cache import ImageCache, default_cache_dir
from samplers.checkpoints import Checkpoint, fingerprint, load_pipeline_for, model_id, parse_checkpoints
from samplers.generate import (
    SamplingConfig,
    from_uint8,
    latent_shape,
    load_image,
    png_bytes,
    resolution,
    sample,
    save_png,
    to_uint8,
    with_sampler,
)
from samplers.guidance import NegativeGuidanceUNet, negative_guidance_pipeline
from samplers.jobs import generate_images
from samplers.noise import NOISE_RULE, generators, initial_noise, noise_seed
from samplers.schedulers import SAMPLERS, make_scheduler

__all__ = [
    "NOISE_RULE",
    "SAMPLERS",
    "Checkpoint",
    "ImageCache",
    "NegativeGuidanceUNet",
    "SamplingConfig",
    "default_cache_dir",
    "fingerprint",
    "from_uint8",
    "generate_images",
    "generators",
    "initial_noise",
    "inversion",
    "latent_shape",
    "load_image",
    "load_pipeline_for",
    "make_scheduler",
    "model_id",
    "negative_guidance_pipeline",
    "noise_seed",
    "parse_checkpoints",
    "png_bytes",
    "resolution",
    "sample",
    "save_png",
    "to_uint8",
    "truncated",
    "with_sampler",
]
