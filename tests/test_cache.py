"""The latent cache serves GroupBatch: random crops drawn per step, flip-aware micro-conditioning, the VAE's latent
normalisation, soft labels, per-image scores and padding for groups of different K."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import workbench.cache as cache_mod
from workbench.config import CacheSection, DataSection, DataSource
from workbench.data import read_records
from workbench.tiny import write_tiny_pickapic


def _cfg(fmt: str, path: Path, cache_dir: Path, **kw: Any) -> DataSection:
    return DataSection(
        sources=[DataSource(format=fmt, path=str(path))],  # type: ignore[arg-type]
        resolution=32,
        cache=CacheSection(dir=str(cache_dir)),
        **kw,
    )


def _built(tiny: dict[str, Path], cfg: DataSection, group: str = "pair", vae_config: dict | None = None):
    from workbench.cache import PreferenceCache
    from workbench.models import load_pipeline

    pipe = load_pipeline(str(tiny["sdxl"]))
    if vae_config:
        pipe.vae.register_to_config(**vae_config)
    cache = PreferenceCache(pipe, "sdxl", cfg)
    records, report = read_records(cfg.sources, group=group)  # type: ignore[arg-type]
    cache.build(records, report, show_progress=False)
    return cache


def _noise_image(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_flipped_crop_offset_is_the_offset_in_the_flipped_image():
    """Cropping at ``left`` then flipping equals cropping the flipped image at ``new_w - res - left``."""
    from workbench.data import preprocess_crops

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))  # -> 56 x 32 before cropping
    mirrored = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    asymmetric = 0
    for pixels, info in preprocess_crops([img], 32, crop="random", n_crops=6, rng=np.random.default_rng(1)):
        flip = info.flipped()
        assert flip.time_ids()[:2] == (40, 70) and flip.time_ids()[4:] == (32, 32)
        fixed = _Fixed(*flip.crop_top_left)
        got = preprocess_crops([mirrored], 32, crop="random", n_crops=1, rng=fixed)[0][0]  # type: ignore[arg-type]
        torch.testing.assert_close(got, pixels.flip(-1), atol=2 / 127.5, rtol=0)
        asymmetric += flip.crop_top_left != info.crop_top_left
    assert asymmetric > 0


class _Fixed:
    """A stand-in numpy generator whose ``integers`` returns given values (to crop at a chosen offset)."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def integers(self, lo: int, hi: int) -> int:
        v = self.values.pop(0)
        assert lo <= v < hi
        return v


def test_random_crops_are_cached_and_drawn_per_step_with_matching_time_ids(
    tiny_fixtures: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=3)
    cfg = _cfg("pickapic_parquet", path, tmp_path / "cache", crop="random", random_crops=3, hflip=True)
    cache = _built(tiny_fixtures, cfg)
    item = cache.items[0]
    assert item.time_ids.shape == (3, 2, 6)  # crops x views (plain, flipped)
    h0, w0 = (int(v) for v in item.time_ids[0, 0, :2])
    scale = 32 / min(h0, w0)
    new_w = max(32, round(w0 * scale))
    for c in range(3):  # the flipped view's left offset is measured in the flipped image
        assert int(item.time_ids[c, 1, 3]) == new_w - 32 - int(item.time_ids[c, 0, 3])
        assert torch.equal(item.time_ids[c, 1, [0, 1, 2, 4, 5]], item.time_ids[c, 0, [0, 1, 2, 4, 5]])

    served: list[tuple[int, int]] = []
    real_load = cache_mod._load_params

    def spy(file: Path, crop: int, view: int) -> torch.Tensor:
        served.append((crop, view))
        return real_load(file, crop, view)

    monkeypatch.setattr(cache_mod, "_load_params", spy)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        served.clear()
        batch = cache.batch([0, 1, 2], g, empty_prompt_prob=0.0, hflip=True)
        assert batch.time_ids is not None and batch.time_ids.shape == (3, 2, 6)
        for b, (c, v) in enumerate(served):  # the time ids are those of the crop and view served
            expected = cache.items[b].time_ids[c, v].float()
            assert torch.equal(batch.time_ids[b], expected.expand(2, 6))
    draws: set[tuple[int, int]] = set()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        served.clear()
        cache.batch([0], g, empty_prompt_prob=0.0, hflip=True)
        draws |= set(served)
    assert {c for c, _ in draws} == {0, 1, 2} and {v for _, v in draws} == {0, 1}
    # without hflip only the plain view is served
    served.clear()
    cache.batch([0, 1], g, empty_prompt_prob=0.0, hflip=False)
    assert {v for _, v in served} == {0}


def test_cache_key_includes_the_number_of_crops(tiny_fixtures: dict[str, Path], tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=2)
    two = _built(tiny_fixtures, _cfg("pickapic_parquet", path, tmp_path / "c", crop="random", random_crops=2))
    three = _built(
        tiny_fixtures, _cfg("pickapic_parquet", path, tmp_path / "c", crop="random", random_crops=3)
    )
    assert two.items[0].latent_file != three.items[0].latent_file
    assert three.items[0].time_ids.shape == (3, 1, 6)
    default = _cfg("pickapic_parquet", path, tmp_path / "c", crop="random")
    assert default.n_crops == 4
    with pytest.raises(ValueError, match="random_crops=2 needs crop=random"):
        _cfg("pickapic_parquet", path, tmp_path / "c", random_crops=2)


def test_vae_latents_mean_and_std_are_applied_as_the_sdxl_pipeline_decodes(
    tiny_fixtures: dict[str, Path], tmp_path: Path
):
    """StableDiffusionXLPipeline decodes ``latents * latents_std / scaling_factor + latents_mean``, so the UNet's
    x0 must be ``(z - latents_mean) * scaling_factor / latents_std`` for a posterior sample ``z``."""
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=2)
    cfg = _cfg("pickapic_parquet", path, tmp_path / "cache")
    plain = _built(tiny_fixtures, cfg)
    mean, std = [0.5, -0.25, 1.0, 0.0], [2.0, 0.5, 1.0, 4.0]
    normed = _built(tiny_fixtures, cfg, vae_config={"latents_mean": mean, "latents_std": std})
    scaling = float(plain.pipe.vae.config.scaling_factor)
    x_plain = plain.batch(
        [0, 1], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False
    ).latents
    x_norm = normed.batch(
        [0, 1], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False
    ).latents
    z = x_plain / scaling  # the same posterior sample (same generator)
    m, s = torch.tensor(mean).view(1, 1, 4, 1, 1), torch.tensor(std).view(1, 1, 4, 1, 1)
    torch.testing.assert_close(x_norm, (z - m) * scaling / s)
    torch.testing.assert_close(x_norm * s / scaling + m, z)  # what the pipeline's decode undoes


def _ranking_files(tmp_path: Path) -> Path:
    for i, (w, h) in enumerate([(40, 48), (48, 40), (44, 44), (52, 40), (40, 40)]):
        _noise_image(tmp_path / f"{i}.png", w, h, seed=i)
    rows = [
        {"prompt": "three", "images": ["0.png", "1.png", "2.png"], "scores": [0.9, 0.5, 0.1]},
        {"prompt": "two", "images": ["3.png", "4.png"], "scores": [0.7, 0.2]},
        {"prompt": "no scores", "images": ["4.png", "0.png"]},
    ]
    path = tmp_path / "rank.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_groups_of_different_k_are_padded_and_masked_with_scores(
    tiny_fixtures: dict[str, Path], tmp_path: Path
):
    cache = _built(
        tiny_fixtures, _cfg("ranking_jsonl", _ranking_files(tmp_path), tmp_path / "c"), group="ranking"
    )
    g = torch.Generator().manual_seed(0)
    batch = cache.batch([0, 1, 2], g, empty_prompt_prob=0.0, hflip=False)
    assert batch.latents.shape == (3, 3, 4, 16, 16)
    assert batch.mask is not None and batch.mask.tolist() == [
        [True] * 3,
        [True, True, False],
        [True, True, False],
    ]
    assert batch.group_sizes.tolist() == [3, 2, 2]
    assert torch.all(batch.latents[1:, 2] == 0) and torch.all(batch.latents[0, 2] != 0)
    assert batch.scores is not None
    torch.testing.assert_close(
        batch.scores[:2], torch.tensor([[0.9, 0.5, 0.1], [0.7, 0.2, float("nan")]]), equal_nan=True
    )
    assert torch.isnan(batch.scores[2]).all()
    assert batch.time_ids is not None and batch.time_ids.shape == (3, 3, 6)
    assert batch.pref_prob is not None and batch.pref_prob.tolist() == [1.0, 1.0, 1.0]
    same_k = cache.batch([1, 2], g, empty_prompt_prob=0.0, hflip=False)
    assert same_k.mask is None and same_k.latents.shape[1] == 2


def test_soft_labels_reach_the_batch_and_scores_are_none_without_any(
    tiny_fixtures: dict[str, Path], tmp_path: Path
):
    for i in range(2):
        _noise_image(tmp_path / f"{i}.png", 40 + 8 * i, 44, seed=i)
    rows = [
        {"prompt": "soft", "image_0": "0.png", "image_1": "1.png", "prefer_0": 0.3, "prefer_1": 0.7},
        {"prompt": "hard", "image_0": "1.png", "image_1": "0.png", "prefer_0": 1, "prefer_1": 0},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = _built(tiny_fixtures, _cfg("pair_jsonl", tmp_path / "pairs.jsonl", tmp_path / "c"))
    batch = cache.batch([0, 1], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False)
    assert batch.pref_prob is not None and batch.pref_prob.tolist() == pytest.approx([0.7, 1.0])
    assert batch.scores is None and batch.mask is None
    # both records hold the same two images in the same order (0.7 puts 1.png first): one latent file
    assert cache.items[0].latent_file == cache.items[1].latent_file
