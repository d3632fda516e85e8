"""Preference data readers, joint cropping, bad rows, and the latent/text cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from workbench.config import CacheSection, DataSection, DataSource
from workbench.data import DataError, preprocess_group, read_records
from workbench.tiny import write_tiny_pickapic


def _data_cfg(path: Path, cache_dir: Path, **kw) -> DataSection:
    return DataSection(
        sources=[DataSource(format="pickapic_parquet", path=str(path))],
        resolution=32,
        cache=CacheSection(dir=str(cache_dir)),
        **kw,
    )


def test_pickapic_reader_orders_winner_first_and_drops_ties(tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=8, ties=3)
    records, report = read_records([{"format": "pickapic_parquet", "path": str(path)}])
    assert len(records) == 8 and report.ties_dropped == 3 and report.total == 11
    for rec in records:  # the preferred image is the bright square on a dark background: low pixel variance
        w = Image.open(__import__("io").BytesIO(rec.images[0]))
        assert w.getpixel((0, 0)) == (20, 20, 20)
    kept, report = read_records([{"format": "pickapic_parquet", "path": str(path)}], drop_ties=False)
    assert len(kept) == 11 and report.ties_dropped == 0


def test_folder_of_shards_and_missing_columns(tmp_path: Path):
    write_tiny_pickapic(tmp_path / "shards" / "a.parquet", n=4, seed=1)
    write_tiny_pickapic(tmp_path / "shards" / "b.parquet", n=5, seed=2)
    records, _ = read_records([{"format": "pickapic_parquet", "path": str(tmp_path / "shards")}])
    assert len(records) == 9
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"jpg_0": [b"x"], "caption": ["c"]}), str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="missing Pick-a-Pic columns"):
        read_records([{"format": "pickapic_parquet", "path": str(tmp_path / "bad.parquet")}])


def test_pair_jsonl_and_ranking_jsonl(tmp_path: Path):
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    lines = [
        {"prompt": "p1", "image_0": "a.png", "image_1": "b.png", "prefer_0": 0, "prefer_1": 1},
        {"prompt": "p2", "image_0": "a.png", "image_1": "b.png", "prefer_0": 0.5, "prefer_1": 0.5},
        {"prompt": "p3", "image_0": "a.png"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    records, report = read_records([{"format": "pair_jsonl", "path": str(tmp_path / "pairs.jsonl")}])
    assert len(records) == 1 and records[0].images[0].endswith("b.png")
    assert report.ties_dropped == 1
    assert [r for r, _ in report.skipped] == ["pairs.jsonl:3", "pairs.jsonl:4"]
    (tmp_path / "rank.jsonl").write_text(
        json.dumps({"prompt": "p", "images": ["c.png", "a.png", "b.png"]}) + "\n"
    )
    ranked, _ = read_records(
        [{"format": "ranking_jsonl", "path": str(tmp_path / "rank.jsonl")}], pairwise=False
    )
    assert ranked[0].k == 3
    pairs, _ = read_records(
        [{"format": "ranking_jsonl", "path": str(tmp_path / "rank.jsonl")}], pairwise=True
    )
    assert [Path(p).name for p in pairs[0].images] == ["c.png", "b.png"]  # best vs worst


def test_both_images_get_the_same_crop_and_real_micro_conditioning():
    a = Image.new("RGB", (60, 40), "red")
    b = Image.new("RGB", (50, 50), "blue")  # a different size: resized to the first image's size first
    pixels, crop = preprocess_group([a, b], 32, crop="center")
    assert pixels.shape == (2, 3, 32, 32)
    assert crop.original_size == (40, 60)
    assert crop.crop_top_left == (0, 8)  # 60x40 -> 48x32, centre crop 8 px from the left
    assert pixels.min() >= -1 and pixels.max() <= 1


def _cache(tiny_fixtures: dict[str, Path], cfg: DataSection):
    from workbench.cache import PreferenceCache
    from workbench.models import load_pipeline

    pipe = load_pipeline(str(tiny_fixtures["sdxl"]))
    return PreferenceCache(pipe, "sdxl", cfg)


def test_corrupt_row_is_skipped_and_reported(tiny_fixtures: dict[str, Path], tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=12, corrupt_rows=(3,))
    cfg = _data_cfg(path, tmp_path / "cache", max_bad_fraction=0.2)
    records, report = read_records(cfg.sources)
    cache = _cache(tiny_fixtures, cfg)
    cache.build(records, report, show_progress=False)
    assert len(cache) == 11
    assert [r for r, _ in report.skipped] == ["p.parquet:3"]
    assert "does not decode" in report.skipped[0][1]


def test_too_many_bad_rows_stop_with_an_error(tiny_fixtures: dict[str, Path], tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=10, corrupt_rows=(0, 1, 2))
    cfg = _data_cfg(path, tmp_path / "cache", max_bad_fraction=0.1)
    records, report = read_records(cfg.sources)
    with pytest.raises(DataError, match=r"3 of 10 rows are unusable .*max_bad_fraction"):
        _cache(tiny_fixtures, cfg).build(records, report, show_progress=False)


def test_cache_is_reused_and_invalidated_when_the_model_changes(
    tiny_fixtures: dict[str, Path], tmp_path: Path
):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=6)
    cfg = _data_cfg(path, tmp_path / "cache")
    records, report = read_records(cfg.sources)
    first = _cache(tiny_fixtures, cfg)
    first.build(records, report, show_progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in first.latent_dir.iterdir()}
    again = _cache(tiny_fixtures, cfg)
    again.build(records, report, show_progress=False)
    assert again.latent_dir == first.latent_dir
    assert {p: p.stat().st_mtime_ns for p in again.latent_dir.iterdir()} == stamps  # nothing re-encoded
    changed = _cache(tiny_fixtures, cfg)
    with torch.no_grad():
        next(changed.pipe.vae.parameters()).add_(0.01)
    changed.__init__(changed.pipe, "sdxl", cfg)
    assert changed.latent_dir != first.latent_dir
    g = torch.Generator().manual_seed(0)
    batch = first.batch([0, 1, 2], g, empty_prompt_prob=0.0, hflip=False)
    assert batch.latents.shape == (3, 2, 4, 16, 16)
    assert batch.prompt_embeds.shape[0] == 3 and batch.pooled_embeds is not None
    assert batch.time_ids is not None and batch.time_ids.shape == (3, 6)
