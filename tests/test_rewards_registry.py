"""The scorer registry and ``build_scorer``: names, options as plain values, errors that name the fix."""

from __future__ import annotations

import inspect

import pytest
import torch

import rewards
from rewards.base import Scorer

OURS = [
    "aesthetic",
    "clipscore",
    "ensemble",
    "hpsv2",
    "hpsv2.1",
    "jpeg_compressibility",
    "jpeg_incompressibility",
]
OURS += ["personal", "pickscore"]


def test_every_scorer_is_registered_with_a_description():
    for name in OURS:
        assert name in rewards.SCORERS
    for name, entry in rewards.SCORERS.items():
        assert isinstance(entry, type) and issubclass(entry, Scorer), name
        assert entry.description, f"{name} has no description"


def test_options_are_plain_yaml_values():
    plain = (str, int, float, bool, type(None))
    for name in rewards.SCORERS.names():
        for option, default in rewards.scorer_options(name).items():
            assert default is inspect.Parameter.empty or isinstance(default, plain), (name, option, default)


def test_unknown_names_and_options_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown scorer 'hps'.*hpsv2\.1"):
        rewards.build_scorer("hps")
    with pytest.raises(ValueError, match=r"has no option.*qualty.*accepted options: quality"):
        rewards.build_scorer("jpeg_compressibility", qualty=90)
    with pytest.raises(ValueError, match=r"'toy/colour' has no option.*accepted options: \(none\)"):
        rewards.build_scorer("toy/colour", colour="red")
    with pytest.raises(ValueError, match="not differentiable"):
        rewards.build_scorer("jpeg_compressibility", differentiable=True)


def test_jpeg_compressibility_is_minus_file_size():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([flat, noisy])
    size = rewards.build_scorer("jpeg_incompressibility")(x, "")
    assert size[1] > 5 * size[0] > 0
    torch.testing.assert_close(rewards.build_scorer("jpeg_compressibility")(x, ""), -size)


def test_analytic_rewards_prefer_the_matching_prompt():
    """A rendered "red circle on white" scores higher for its own prompt than for a prompt naming other attributes."""
    from workbench.toy import world

    names = [n for n in rewards.SCORERS.names() if n.startswith("toy/")]
    fidelity = [
        n for n in names if n in ("toy/colour", "toy/shape", "toy/size", "toy/background", "toy/fidelity")
    ]
    assert fidelity
    scene = world.sample_scene(0, "a large red circle on a white background", centred=True)
    x = torch.from_numpy(world.to_array([world.render_scene(scene, 32)]))
    wrong = "a small blue triangle on a black background"
    for name in fidelity:
        s = rewards.build_scorer(name)
        assert float(s(x, scene.prompt)) > float(s(x, wrong)), name
