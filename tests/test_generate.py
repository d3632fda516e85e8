"""Seeded generation: the shared-noise rule, samplers, checkpoints (zero LoRA == base), the cache, the command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from samplers import (
    SAMPLERS,
    Checkpoint,
    ImageCache,
    SamplingConfig,
    generate_images,
    generators,
    initial_noise,
    load_pipeline_for,
    noise_seed,
    parse_checkpoints,
    sample,
    with_sampler,
)

FAST = SamplingConfig(sampler="euler", steps=3, guidance=3.0)


@pytest.fixture(scope="module")
def base_dir(tiny_fixtures: dict[str, Path]) -> Path:
    return tiny_fixtures["sdxl"]


@pytest.fixture(scope="module")
def pipe(base_dir: Path):
    return load_pipeline_for(str(base_dir), Checkpoint("base"))


@pytest.fixture(scope="module")
def zero_lora(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA exactly as training starts it (B = 0), saved in the trainer's diffusers format."""
    from workbench.models import add_lora, save_lora

    fresh = load_pipeline_for(str(base_dir), Checkpoint("base"))
    add_lora(fresh.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], 0.0, "gaussian")
    out = tmp_path_factory.mktemp("lora") / "run" / "final" / "lora"
    save_lora(fresh.unet, out, "sdxl")
    return out


def test_noise_rule_depends_only_on_prompt_and_seed() -> None:
    a = noise_seed("a red circle", 3)
    assert a == noise_seed("a red circle", 3)
    assert len({a, noise_seed("a red circle", 4), noise_seed("a blue circle", 3)}) == 3
    # the noise of an item does not depend on the other items of its batch, nor on its position
    batch = initial_noise((4, 8, 8), generators(["x", "a red circle", "y"], [0, 3, 1]))
    alone = initial_noise((4, 8, 8), generators(["a red circle"], [3]))
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[2])


def test_same_prompt_and_seed_give_the_same_image(pipe) -> None:
    p = with_sampler(pipe, "euler")
    first = sample(p, ["a red circle", "a blue square"], [0, 1], FAST)
    again = sample(p, ["a red circle", "a blue square"], [0, 1], FAST)
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, again)
    # a different batch composition: same noise, so the same image up to batched-kernel round-off
    alone = sample(p, ["a blue square"], [1], FAST)
    torch.testing.assert_close(alone[0], first[1], atol=1e-4, rtol=0)
    assert not torch.allclose(first[0], first[1])


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_every_sampler_generates_and_leaves_the_pipeline_alone(pipe, name: str) -> None:
    before = type(pipe.scheduler)
    images = sample(
        with_sampler(pipe, name), ["a green triangle"], [7], SamplingConfig(sampler=name, steps=3)
    )
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert type(pipe.scheduler) is before
    assert name in SAMPLERS


def test_unknown_sampler_lists_the_known_ones() -> None:
    from workbench.commands.generate import SAMPLER_NAMES

    assert sorted(SAMPLER_NAMES) == SAMPLERS.names()  # the CLI's literal choices mirror the registry
    with pytest.raises(KeyError, match="dpmpp_2m"):
        SamplingConfig(sampler="heun")


def test_zero_initialised_lora_gives_images_identical_to_the_base(
    base_dir: Path, zero_lora: Path, pipe
) -> None:
    (ckpt,) = parse_checkpoints([str(zero_lora.parent.parent)])  # a run directory resolves to final/lora
    assert ckpt.path == str(zero_lora) and ckpt.name == "run/final"
    tuned = load_pipeline_for(str(base_dir), ckpt)
    assert any("lora" in n for n, _ in tuned.unet.named_parameters())
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    base_images = sample(with_sampler(pipe, "euler"), prompts, seeds, FAST)
    tuned_images = sample(with_sampler(tuned, "euler"), prompts, seeds, FAST)
    assert torch.equal(base_images, tuned_images)


def test_a_trained_lora_saved_and_applied_reproduces_the_in_memory_adapter(
    base_dir: Path, pipe, tmp_path: Path
) -> None:
    """What generate/eval show for a run must be what training produced: the demo's target modules, non-zero B."""
    from workbench.models import add_lora, save_lora

    trained = load_pipeline_for(str(base_dir), Checkpoint("base"))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    add_lora(trained.unet, 4, 4.0, targets, 0.0, "gaussian")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_lora(trained.unet, tmp_path / "lora", "sdxl")
    applied = load_pipeline_for(str(base_dir), Checkpoint("t", str(tmp_path / "lora")))
    expected = sample(with_sampler(trained, "euler"), ["a red circle"], [0], FAST)
    got = sample(with_sampler(applied, "euler"), ["a red circle"], [0], FAST)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_cached_items_are_reused_without_loading_the_model(pipe, tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    loads: list[int] = []

    def load():
        loads.append(1)
        return pipe

    prompts, seeds = ["a", "b", "c"], [0, 0, 1]
    first = dict(
        _collect(generate_images(load, prompts, seeds, FAST, batch_size=2, cache=cache, model_id="m"))
    )
    second = dict(
        _collect(generate_images(load, prompts, seeds, FAST, batch_size=2, cache=cache, model_id="m"))
    )
    assert len(loads) == 1
    assert all((first[i] == second[i]).all() for i in range(3))
    other = dict(_collect(generate_images(load, prompts[:1], seeds[:1], FAST, cache=cache, model_id="other")))
    assert len(loads) == 2  # a different model id is a cache miss
    assert abs(other[0].astype(int) - first[0].astype(int)).max() <= 1  # batch of 1 vs 2: round-off only


def _collect(batches):
    for idx, images in batches:
        yield from zip(idx, images)


def test_generate_command_writes_images_and_manifest(base_dir: Path, zero_lora: Path, tmp_path: Path) -> None:
    from workbench.commands import generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "--base",
            str(base_dir),
            "-c",
            "base",
            "-c",
            f"zero={zero_lora}",
            "-p",
            "a red circle",
            "-p",
            "a blue square",
            "--seeds",
            "0-1",
            "--steps",
            "2",
            "--sampler",
            "dpmpp_2m",
            "--batch-size",
            "3",
            "-o",
            str(out),
        ]
    )
    assert generate.main(args) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert {r["checkpoint"] for r in rows} == {"base", "zero"}
    assert set(rows[0]) >= {"path", "prompt", "seed", "checkpoint", "sampler", "steps", "guidance"}
    assert all((out / r["path"]).is_file() for r in rows)
    by_key = {(r["checkpoint"], r["prompt"], r["seed"]): (out / r["path"]).read_bytes() for r in rows}
    assert by_key[("base", "a red circle", 1)] == by_key[("zero", "a red circle", 1)]


def test_seed_ranges_parse() -> None:
    from workbench.commands.generate import parse_seeds

    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("a-b")
