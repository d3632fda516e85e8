"""The toy world: prompt split, deterministic rendering, scene parameters, tokenizer, off-policy pairs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from workbench.toy import world


def test_split_is_fixed_disjoint_and_covers_every_word() -> None:
    assert len(world.ALL_PROMPTS) == 144
    assert len(world.TRAIN_PROMPTS) == 120 and len(world.HELDOUT_PROMPTS) == 24
    assert set(world.TRAIN_PROMPTS).isdisjoint(world.HELDOUT_PROMPTS)
    assert set(world.TRAIN_PROMPTS) | set(world.HELDOUT_PROMPTS) == set(world.ALL_PROMPTS)
    held = [world.attributes_of(p) for p in world.HELDOUT_PROMPTS]
    assert Counter(a.colour for a in held) == dict.fromkeys(world.COLOURS, 3)
    assert Counter(a.shape for a in held) == dict.fromkeys(world.SHAPES, 8)
    assert Counter(a.size for a in held) == dict.fromkeys(world.SIZES, 12)
    assert Counter(a.background for a in held) == dict.fromkeys(world.BACKGROUNDS, 8)
    # the split is part of the contract: pin one held-out and one train prompt
    assert "a small red circle on a white background" in world.HELDOUT_PROMPTS
    assert "a small red circle on a black background" in world.TRAIN_PROMPTS


def test_vocabulary_size() -> None:
    assert len(world.SHAPES) >= 3 and len(world.COLOURS) >= 8 and len(world.BACKGROUNDS) >= 3
    assert set(world.SIZES) == {"small", "large"}


def test_render_is_deterministic_by_seed() -> None:
    a, pa, sa = world.render_batch(range(32), split="all")
    b, pb, sb = world.render_batch(range(32), split="all")
    c, _, _ = world.render_batch(range(100, 132), split="all")
    assert a.shape == (32, 3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and pa == pb and sa == sb
    assert not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_train_split_never_draws_heldout_prompts() -> None:
    _, prompts, _ = world.render_batch(range(3000), split="train", resolution=8)
    assert set(prompts) <= set(world.TRAIN_PROMPTS)
    assert len(set(prompts)) == 120


def test_scene_parameters_describe_the_image() -> None:
    for seed in range(200):
        scene = world.sample_scene(seed, split="all")
        lo, hi = world.SIZES[scene.size]
        assert lo <= scene.side <= hi
        half = scene.side / 2
        assert half <= scene.cx <= 1 - half and half <= scene.cy <= 1 - half
        assert (
            scene.prompt == f"a {scene.size} {scene.colour} {scene.shape} on a {scene.background} background"
        )
    # the pixel at the shape's centre has the shape's colour; a corner far from it has the background's
    scene = world.Scene("large", "blue", "square", "white", side=0.5, cx=0.3, cy=0.3)
    img = np.asarray(world.render_scene(scene, 32), dtype=np.float32) / 255
    assert np.allclose(img[9, 9], world.COLOURS["blue"], atol=0.01)
    assert np.allclose(img[30, 30], world.BACKGROUNDS["white"], atol=0.01)


def test_parse_prompt() -> None:
    assert world.attributes_of("a large pink triangle on a gray background") == world.Attributes(
        "large", "pink", "triangle", "gray"
    )
    assert world.parse_prompt("A small brown circle on a grey background.")["background"] == "gray"
    assert world.parse_prompt("a photo of an astronaut") == dict.fromkeys(
        ["size", "colour", "shape", "background"]
    )
    with pytest.raises(ValueError, match="colour"):
        world.attributes_of("a small circle on a white background")


def test_centering_pairs_differ_only_in_position() -> None:
    win, lose, prompts, scenes = world.render_centering_pairs(64, seed=0)
    win2, lose2, prompts2, _ = world.render_centering_pairs(64, seed=0)
    assert np.array_equal(win, win2) and np.array_equal(lose, lose2) and prompts == prompts2
    assert win.shape == lose.shape == (64, 3, 32, 32)
    assert set(prompts) <= set(world.TRAIN_PROMPTS)
    for sw, sl in scenes:
        assert (sw.cx, sw.cy) == (0.5, 0.5)
        assert ((sl.cx - 0.5) ** 2 + (sl.cy - 0.5) ** 2) ** 0.5 >= 0.15 or sl.side > 0.69
        assert sw.attributes == sl.attributes and sw.side == sl.side
        lo, hi = world.SIZES[sw.size]
        assert lo <= sw.side <= hi  # the sizes the base draws


def test_every_world_word_is_one_token(tmp_path) -> None:
    from workbench.tiny import build_tokenizer
    from workbench.toy.model import TOY_SPEC

    tok = build_tokenizer(TOY_SPEC, tmp_path)
    assert {w: tok.tokenize(w) for w in world.VOCABULARY} == {w: [w + "</w>"] for w in world.VOCABULARY}
    assert max(len(tok(p).input_ids) for p in world.ALL_PROMPTS) <= TOY_SPEC.text_max_length
