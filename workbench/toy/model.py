"""The committed toy pipeline: where it lives, how to load it, and how to measure its prompt adherence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workbench.tiny import TinySpec
from workbench.toy.world import VOCABULARY, prompts

#: The world's words in the order the tokenizer adds their merge chains. Without the real CLIP merges (``n_merges=0``)
#: every word must still become one token; chains are ranked in this order, and "background", "green" and "black"
#: must come first or an earlier word's merge ("r"+"e" from "red", ...) splits them. A test checks every word.
_FIRST = ("background", "green", "black")
TOKENIZER_WORDS: tuple[str, ...] = (*_FIRST, *(w for w in VOCABULARY if w not in _FIRST))

#: Sizes of the toy pipeline (research/toyworld.md "Configs that worked", plus its two fixes: a linear beta schedule
#: with trailing timestep spacing instead of SDXL's scaled_linear/leading, which biased samples to grey; strong text
#: conditioning comes from pretraining, see :mod:`workbench.toy.pretrain`).
TOY_SPEC = TinySpec(
    family="sdxl",
    resolution=32,
    vae_channels=(32, 64),
    unet_channels=(64, 128),
    attention_head_dim=(2, 4),
    text_hidden=32,
    text_max_length=16,
    pooled_dim=32,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    timestep_spacing="trailing",
    n_merges=0,
    extra_words=TOKENIZER_WORDS,
    seed=0,
)

#: micro-conditioning ids the SDXL pipeline builds for 32x32: (original size, crop top-left, target size).
TIME_IDS = (32.0, 32.0, 0.0, 0.0, 32.0, 32.0)


def toy_pipeline_path() -> Path:
    """The committed, pretrained toy pipeline: a diffusers ``StableDiffusionXLPipeline`` folder."""
    return Path(__file__).parent / "assets" / "pipeline"


def load_toy_pipeline(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> Any:
    """Load the toy pipeline (the committed one unless ``path`` is given) as a stock ``StableDiffusionXLPipeline``."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path) if path is not None else toy_pipeline_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline at {path} (model_index.json missing); run `workbench toy pretrain --out {path}`"
        )
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(
    pipe: Any,
    prompts_: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 10,
    guidance: float = 5.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images ``[B, 3, 32, 32]`` in [0, 1], one per (prompt, seed), through the one renderer
    (:func:`samplers.sample`: Euler, the toy pipeline's own scheduler, and the samplers' noise rule, so an item's
    noise depends only on its prompt and seed, never on its batch or the checkpoint)."""
    from samplers import SamplingConfig, sample, with_sampler
    from samplers.generate import batched

    if len(prompts_) != len(seeds):
        raise ValueError(f"got {len(prompts_)} prompts but {len(seeds)} seeds")
    res = TOY_SPEC.resolution
    cfg = SamplingConfig(sampler="euler", steps=steps, guidance=guidance, height=res, width=res)
    view = with_sampler(pipe, "euler")
    out = [
        sample(view, [prompts_[i] for i in part], [int(seeds[i]) for i in part], cfg)
        for part in batched(len(prompts_), batch_size)
    ]
    return torch.cat(out)


def adherence_items(split: str, seeds_per_prompt: int, first_seed: int = 1000) -> tuple[list[str], list[int]]:
    """The fixed (prompt, seed) items of an adherence measurement: every prompt of ``split`` x ``seeds_per_prompt``
    seeds; item seed = (first_seed + k) * 1000 + prompt index."""
    ps = prompts(split)
    items = [(p, (first_seed + k) * 1000 + i) for k in range(seeds_per_prompt) for i, p in enumerate(ps)]
    return [p for p, _ in items], [s for _, s in items]


def measure_adherence(
    pipe: Any, split: str, seeds_per_prompt: int, *, steps: int = 10, guidance: float = 5.0
) -> dict[str, float]:
    """Hard-label accuracies (colour, shape, size, background, all four) and mean ground-truth rewards of the
    pipeline's samples on the fixed items of :func:`adherence_items`."""
    from rewards.toy import adherence

    p, s = adherence_items(split, seeds_per_prompt)
    images = generate(pipe, p, s, steps=steps, guidance=guidance)
    return {"n": float(len(p)), **adherence(images, p)}
