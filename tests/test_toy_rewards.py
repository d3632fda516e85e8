"""Ground-truth toy rewards: high on the world's own images, low for mismatched prompts, in [0, 1], batched."""

from __future__ import annotations

import random

import pytest
import torch

import rewards.toy as toy_rewards
from rewards.base import SCORERS
from workbench.toy import world

NAMES = [
    "toy/colour",
    "toy/shape",
    "toy/size",
    "toy/background",
    "toy/fidelity",
    "toy/centering",
    "toy/saturation",
    "toy/clean_background",
]


@pytest.fixture(scope="module")
def rendered() -> tuple[torch.Tensor, list[str], list[world.Scene]]:
    images, prompts, scenes = world.render_batch(range(600), split="all")
    return torch.from_numpy(images), prompts, scenes


def _swap(prompt: str, key: str, seed: int) -> str:
    """The same prompt with attribute ``key`` replaced by a different word of its vocabulary."""
    a = world.attributes_of(prompt)
    vocab = {
        "colour": world.COLOURS,
        "shape": world.SHAPES,
        "size": world.SIZES,
        "background": world.BACKGROUNDS,
    }
    other = random.Random(seed).choice([w for w in vocab[key] if w != getattr(a, key)])
    return world.Attributes(**{**a.__dict__, key: other}).prompt


def test_registered_and_constructible_without_arguments(rendered) -> None:
    images, prompts, _ = rendered
    for name in NAMES:
        scorer = SCORERS.get(name)()
        out = scorer(images[:7], prompts[:7])
        assert out.shape == (7,) and out.dtype == torch.float32
        assert bool(((out >= 0) & (out <= 1)).all()), name
        assert scorer.description


def test_high_on_the_worlds_own_images(rendered) -> None:
    images, prompts, _ = rendered
    means = {n: float(SCORERS.get(n)()(images, prompts).mean()) for n in NAMES}
    assert means["toy/colour"] > 0.97 and means["toy/background"] > 0.99 and means["toy/size"] > 0.97
    assert means["toy/shape"] > 0.85
    assert means["toy/fidelity"] > 0.95
    assert means["toy/clean_background"] > 0.97
    stats = toy_rewards.adherence(images, prompts)
    assert stats["acc/colour"] == stats["acc/background"] == stats["acc/size"] == 1.0
    assert stats["acc/shape"] > 0.97


@pytest.mark.parametrize("key", ["colour", "shape", "size", "background"])
def test_low_for_mismatched_prompts(rendered, key: str) -> None:
    images, prompts, _ = rendered
    wrong = [_swap(p, key, i) for i, p in enumerate(prompts)]
    scorer = SCORERS.get(f"toy/{key}")()
    right, bad = scorer(images, prompts).mean(), scorer(images, wrong).mean()
    assert float(bad) < {"colour": 0.1, "shape": 0.35, "size": 0.2, "background": 0.1}[key]
    assert float(right - bad) > 0.5
    fid = SCORERS.get("toy/fidelity")()
    assert float(fid(images, prompts).mean() - fid(images, wrong).mean()) > 0.1


def test_fidelity_of_random_other_prompts_is_low(rendered) -> None:
    images, prompts, _ = rendered
    rng = random.Random(0)
    others = [rng.choice([q for q in world.ALL_PROMPTS if q != p]) for p in prompts]
    assert float(SCORERS.get("toy/fidelity")()(images, others).mean()) < 0.4


def test_taste_rewards_ignore_the_prompt_and_measure_what_they_say() -> None:
    centred = world.render_scene(
        world.sample_scene(3, "a large red square on a white background", centred=True)
    )
    x = torch.from_numpy(world.to_array([centred]))
    off = world.render_scene(world.Scene("large", "red", "square", "white", side=0.55, cx=0.3, cy=0.3))
    y = torch.from_numpy(world.to_array([off]))
    c = SCORERS.get("toy/centering")()
    assert float(c(x, ["anything"])) > 0.95 and float(c(y, ["anything"])) < 0.1
    assert float(c(x, ["a"])) == float(c(x, ["a small blue circle on a black background"]))
    noisy = (x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    clean = SCORERS.get("toy/clean_background")()
    assert float(clean(x, [""])) > 0.99 and float(clean(noisy, [""])) < 0.3
    sat = SCORERS.get("toy/saturation")()
    assert float(sat(x, [""])) == pytest.approx(0.8 / 0.9, abs=0.02)  # red (0.9, 0.1, 0.1)
    assert float(sat(x.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous(), [""])) < 0.05  # greyscale


def test_empty_image_and_free_text_prompts() -> None:
    flat = torch.full((2, 3, 32, 32), 0.5)
    out = {
        n: SCORERS.get(n)()(flat, ["a photo of a cat", "a small red circle on a gray background"])
        for n in NAMES
    }
    assert float(out["toy/fidelity"][0]) == 0.0  # names no world attribute
    assert float(out["toy/colour"][1]) == 0.0 and float(out["toy/centering"][1]) == 0.0  # nothing drawn
    assert float(out["toy/background"][1]) == pytest.approx(1.0)
    assert float(out["toy/clean_background"][0]) == pytest.approx(1.0)


def test_any_resolution(rendered) -> None:
    _, prompts, _ = rendered
    big, _, _ = world.render_batch(range(16), prompts[:16], resolution=96)
    out = SCORERS.get("toy/fidelity")()(torch.from_numpy(big), prompts[:16])
    assert float(out.mean()) > 0.95


def test_colour_and_background_are_differentiable(rendered) -> None:
    images, prompts, _ = rendered
    noise = 0.03 * torch.randn(images[:8].shape, generator=torch.Generator().manual_seed(0))
    x = (images[:8] * 0.9 + 0.05 + noise).requires_grad_(
        True
    )  # a flat background has zero gradient: add texture
    for name in ("toy/colour", "toy/background", "toy/saturation", "toy/clean_background"):
        scorer = SCORERS.get(name)()
        assert scorer.differentiable
        (grad,) = torch.autograd.grad(scorer(x, prompts[:8]).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
